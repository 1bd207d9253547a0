"""GPTQ/RTN on the real SmolLM2: quality gates, loading back, and plain transformers interop."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import compress
from compress.eval import eval_token_windows, score
from tests.conftest import run_cli

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
CI_GPTQ = ROOT / "recipes" / "ci" / "gptq-w4g64-smoke.yaml"  # run once by the smollm2_w4_gated fixture


def test_ci_gptq_recipe_passes_its_gates_and_quality(smollm2_w4_gated: tuple[Path, object]) -> None:
    """The gates of recipes/ci/gptq-w4g64-smoke.yaml, checked as ``compress.run`` checks them,
    and the figures behind them (brown-512-smoke)."""
    _, report = smollm2_w4_gated
    assert report.passed, report.failures
    res = report.result
    assert report.protocol == "brown-512-smoke" and res.protocol == "brown-512-smoke"
    assert res.dense_ppl is not None and res.ppl < 1.35 * res.dense_ppl
    assert res.top1_agreement > 0.65 and 4.0 < res.effective_bits < 5.0
    assert res.bytes_on_disk < 0.4 * res.dense_bytes_on_disk


def test_plain_transformers_loads_our_int4(smollm2_w4: Path) -> None:
    """compressed-tensors + transformers read the pack-quantized output; PPL equals ours."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    windows = eval_token_windows(smollm2_w4, "brown-128-smoke", None)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_w4, dtype=torch.float32).eval()
    ours = compress.load(smollm2_w4)
    a, b = score(hf, windows), score(ours, windows)
    ppl_hf, ppl_ours = math.exp(a["nll"] / a["tokens"]), math.exp(b["nll"] / b["tokens"])
    assert abs(ppl_hf - ppl_ours) / ppl_ours < 0.005


@pytest.mark.parametrize("recipe", sorted(p for p in (ROOT / "recipes" / "ci").glob("*.yaml") if p != CI_GPTQ),
                         ids=lambda p: p.stem)
def test_other_ci_recipes_pass_their_gates_through_the_cli(recipe: Path, smollm2: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_cli(["run", str(recipe), str(smollm2), "-o", str(tmp_path / "out")], monkeypatch, capsys)
    assert code == 0, out + err
    assert "gates passed" in err
