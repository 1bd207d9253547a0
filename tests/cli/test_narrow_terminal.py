"""`quantize` and `validate` in an 80-column terminal (issue 9, item 5): every line fits, no cell is
cut with "…", the per-layer table shows short names with their weight error on one line.

Runs the installed console script with ``COLUMNS=80``, as a user's terminal sets it. Lines that
name a path on this machine are exempt from the width limit: the CLI prints them unbroken
(``soft_wrap``) so the terminal wraps them and a copied path stays whole."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).parent / "compress"


def _run(args: list[str], cwd: Path) -> list[str]:
    """The lines the command printed (stdout and stderr) at 80 columns; it must succeed."""
    if not SCRIPT.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "80"}
    p = subprocess.run([str(SCRIPT), *args], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stdout + p.stderr
    return (p.stdout + p.stderr).splitlines()


def _assert_fits(lines: list[str], paths: Path) -> None:
    wide = [line for line in lines if len(line) > 80 and str(paths) not in line]
    assert not wide, wide
    assert not any("…" in line for line in lines), "\n".join(lines)


def test_quantize_and_validate_fit_80_columns(tiny_llama: Path, tmp_path: Path,
                                              tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.getbasetemp()  # holds the input and the output
    out = tmp_path / "w4"
    lines = _run(["quantize", str(tiny_llama), "--method", "rtn", "--bits", "4", "-o", str(out)], tmp_path)
    _assert_fits(lines, base)
    assert any("rel. W err" in line for line in lines), "\n".join(lines)
    assert any(line.startswith("L2 mlp.down") and "e-0" in line for line in lines), "\n".join(lines)
    lines = _run(["validate", str(out), "--dtype", "fp32", "--dtype", "bf16", "--dtype", "fp16"], tmp_path)
    _assert_fits(lines, base)
    assert any(line.startswith("quant") and " 21 " in line for line in lines), "\n".join(lines)
