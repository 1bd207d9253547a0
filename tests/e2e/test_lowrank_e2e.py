"""Low-rank + FlashSVD on the real models (smoke protocols, kept fast): SmolLM2 with whitened
factors in two blocks (explicit ranks), all-MiniLM-L6-v2 at ratio 0.5 (whitened vs plain);
fused == unfused in fp32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import compress
from compress.eval import evaluate
from compress.modules.flashsvd import enable_flashsvd
from compress.recipe import parse_recipe
from compress.runner import run_recipe

pytestmark = pytest.mark.e2e
TOL = 1e-4


def _run(src: Path, out: Path, protocol: str, **cfg: object) -> Path:
    rec = parse_recipe({"calibration": {"protocol": protocol},
                        "stages": [{"pass": "lowrank", "config": cfg}]})
    return run_recipe(rec, src, out)


def _masked_rel(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    keep = mask.bool()[..., None]
    return float(((a - b).abs() * keep).max() / (b.abs() * keep).max())


def test_smollm2_whitened_blocks_fused_equal_unfused(smollm2: Path, tmp_path: Path) -> None:
    ranks = {f"model.layers.{i}.{rel}": r for i in (0, 29)
             for rel, r in (("self_attn.q_proj", 144), ("self_attn.k_proj", 72), ("self_attn.v_proj", 72),
                            ("mlp.gate_proj", 209), ("mlp.up_proj", 209), ("mlp.down_proj", 209))}
    out = _run(smollm2, tmp_path / "lr", "brown-128-smoke", ranks=ranks)
    records = json.loads((out / "reports" / "report.json").read_text())
    assert len(records) == 12 and all(r["kind"] == "lowrank" and 0 < r["error"] < 0.5 for r in records)
    model = compress.load(out)
    ids = torch.randint(0, 49152, (2, 200), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[1, 150:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am, use_cache=False).logits
        rep = enable_flashsvd(model)
        got = model(input_ids=ids, attention_mask=am, use_cache=False).logits
    assert rep.fused == {"mlp": 2, "attention": 2}
    assert _masked_rel(got, ref, am) < TOL


def test_minilm_ratio_half_served_fused(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from compress.assets import materialize

    src = materialize("minilm-l6")
    out = _run(src, tmp_path / "lr", "brown-128-smoke", ratio=0.5)
    model = compress.load(out)
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(["A short one.", "A somewhat longer sentence about the weather in the county."],
              padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).last_hidden_state
        assert enable_flashsvd(model).fused == {"mlp": 6, "attention": 6}
        got = model(**enc).last_hidden_state
    assert _masked_rel(got, ref, enc["attention_mask"]) < TOL
    res = evaluate(out, src, protocol="brown-512-smoke")
    assert res.protocol == "brown-sentences-64-smoke" and res.served == "flashsvd"
    assert 15.0 < res.effective_bits <= 16.0
    plain = evaluate(_run(src, tmp_path / "plain", "brown-128-smoke", ratio=0.5, whiten=False), src,
                     protocol="brown-512-smoke")
    assert plain.cosine_mean + 0.1 < res.cosine_mean < 1.0  # whitening: far better, not marginally
