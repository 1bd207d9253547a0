"""Quality gates in the library: ``compress.run`` checks a recipe's gates like ``compress run``."""

from __future__ import annotations

from pathlib import Path

import pytest

import compress
from compress.gates import GateFailure, check_gates
from compress.recipe import Gates


def _recipe(gates: dict) -> dict:
    return {"stages": [{"pass": "rtn", "config": {"bits": 2, "group_size": 32}}],
            "gates": {"protocol": "brown-128-smoke", **gates}}


def test_run_raises_on_a_failed_gate_and_keeps_the_output(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    with pytest.raises(GateFailure) as e:
        compress.run(_recipe({"max_kl": 1e-12}), tiny_llama, out)
    assert e.value.exit_code == 1 and "KL" in str(e.value) and str(out) in str(e.value)
    assert (out / "compression.json").is_file()  # a valid output, only not good enough
    assert e.value.report.failures and not e.value.report.passed


def test_gates_can_be_skipped_and_can_pass(tiny_llama: Path, tmp_path: Path) -> None:
    out = compress.run(_recipe({"max_kl": 1e-12}), tiny_llama, tmp_path / "skip", gates=False)
    assert (out / "compression.json").is_file()
    report = check_gates(Gates(protocol="brown-128-smoke", max_ppl_ratio=1e6, min_top1=0.0), out, tiny_llama)
    assert report.passed and report.ppl_ratio > 0 and report.protocol == "brown-128-smoke"
    assert compress.run(_recipe({"max_ppl_ratio": 1e6}), tiny_llama, tmp_path / "pass") == (tmp_path / "pass").resolve()
