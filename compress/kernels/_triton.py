"""Backend selection shared by every kernel: Triton on CUDA, the torch twin elsewhere.

``COMPRESS_KERNELS=torch`` forces the twins everywhere; ``COMPRESS_KERNELS=triton`` forces the
Triton path even for CPU tensors, which only works under ``TRITON_INTERPRET=1`` (that is how the
tests run the Triton code without a GPU).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def has_triton() -> bool:
    """True when the ``triton`` package can be imported (it is never imported eagerly)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Pick the backend for a tensor: Triton for CUDA tensors (or when forced), else torch."""
    mode = os.environ.get("COMPRESS_KERNELS", "auto").lower()
    if mode == "torch" or not has_triton():
        return False
    if mode == "triton":
        return t.is_cuda or interpreting()
    return t.is_cuda
