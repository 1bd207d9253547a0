"""End to end on the real SmolLM2 (protocol brown-128-smoke): the int4 model served through the
kernel dispatcher has the perplexity of the dense model carrying its dequantized weights, on both
of the CPU twin's paths, and every module passes ``compress validate``. ``smollm2_w4`` (GPTQ W4 g64)
comes from tests/e2e/conftest.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
PROTOCOL = "brown-128-smoke"


def _ppl(s: dict) -> float:
    return math.exp(s["nll"] / s["tokens"])


def test_dispatcher_ppl_matches_the_dequantized_reference(smollm2_w4: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from compress import load
    from compress.eval import eval_token_windows, score
    from compress.validate import dense_reference
    from compress.kernels import quant_matmul_torch

    windows = eval_token_windows(smollm2_w4, PROTOCOL, None)
    served, reference = load(smollm2_w4), load(smollm2_w4)
    assert dense_reference(reference) == 30 * 7
    s_planes = score(served, windows, dense=reference)  # 128 rows per call: the twin's plane path
    p_ref = _ppl(score(reference, windows))
    monkeypatch.setattr(quant_matmul_torch, "PLANES_MAX_M", 0)  # the twin's dequant + matmul path
    p_dense_path = _ppl(score(served, windows))
    assert abs(_ppl(s_planes) - p_ref) / p_ref <= 1e-3
    assert abs(p_dense_path - p_ref) / p_ref <= 1e-3
    assert s_planes["kl"] / s_planes["tokens"] < 1e-6 and s_planes["agree"] / s_planes["tokens"] > 0.99


def test_validate_every_module(smollm2_w4: Path) -> None:
    from compress.validate import validate

    rep = validate(smollm2_w4, ms=[1, 300], dtypes=["fp32"])
    assert rep.ok and len(rep.checks) == 30 * 7 * 2 and not rep.unvalidated
    assert max(c.rel_err for c in rep.checks) < 1e-5
