"""Kernel tests run the Triton kernels on CPU through Triton's interpreter.

``TRITON_INTERPRET`` must be set before Triton is first imported; the kernel modules import it
lazily, so setting it here (at collection time) is early enough.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def force_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route the public dispatchers to Triton (under the interpreter) for the duration of a test."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("COMPRESS_KERNELS", "triton")
