"""The lowrank pass on tiny models: streamed result vs a slow whole-model reference, rank rules,
explicit ranks, per-head layout, encoders, and the records it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

import compress
from compress.algos import svd
from compress.arch import LLAMA
from compress.calib.hessian import GramAccumulator
from compress.checkpoint import CheckpointReader
from compress.modules.lowrank import LowRankLinear
from compress.recipe import parse_recipe
from compress.runner import load_calibration, run_recipe

CAL = {"protocol": "brown-128-smoke", "batch_size": 3}


def _recipe(**cfg: object):
    return parse_recipe({"calibration": CAL, "stages": [{"pass": "lowrank", "config": cfg}]})


def _reference_whitened(model_dir: Path, ratio: float, damp: float) -> transformers.PreTrainedModel:
    """Whole model in memory; block by block, Gram matrices from full forwards of the partially
    factored model, every linear replaced by its dense rank-r product. Slow and obvious."""
    calib = load_calibration(model_dir, _recipe(ratio=ratio).calibration, CheckpointReader(model_dir).config)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for layer in model.model.layers:
        accs, hooks = {}, []
        for group in LLAMA.groups:
            first = layer.get_submodule(group[0])
            accs[group] = GramAccumulator(first.in_features)
            hooks.append(first.register_forward_pre_hook(lambda _m, a, acc=accs[group]: acc.add(a[0])))
        with torch.no_grad():
            for b in calib.windows.split(3):
                model(input_ids=b)
        for h in hooks:
            h.remove()
        for group, acc in accs.items():
            for name in group:
                lin = layer.get_submodule(name)
                W = lin.weight.detach()
                r = svd.rank_for_ratio(W.shape[1], W.shape[0], ratio)
                lin.weight.data = svd.truncated_svd(W, r, acc.mean(), damp).weight().float()
    return model


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _ids(n: int = 3, L: int = 40) -> torch.Tensor:
    return torch.randint(0, 400, (n, L), generator=torch.Generator().manual_seed(3))


def test_streamed_whitened_pass_equals_the_whole_model_reference(tiny_llama: Path, tmp_path: Path) -> None:
    out = run_recipe(_recipe(ratio=0.5, damp=1e-4), tiny_llama, tmp_path / "lr")
    model = compress.load(out)
    ref = _reference_whitened(tiny_llama, 0.5, 1e-4)
    for i in range(len(model.model.layers)):
        for rel in LLAMA.linears:
            name = f"model.layers.{i}.{rel}"
            got = model.get_submodule(name)
            assert isinstance(got, LowRankLinear), name
            want = ref.get_submodule(name).weight.detach()
            assert float((got.dense_weight() - want).norm() / want.norm()) < 1e-4, name
    ids = _ids()
    a, b = _logits(model, ids), _logits(ref, ids)
    assert float((a - b).abs().max() / b.abs().max()) < 1e-4


def test_whitened_beats_plain_end_to_end(tiny_llama: Path, tmp_path: Path) -> None:
    dense = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = _ids()
    ref = _logits(dense, ids)
    errs = {}
    for whiten in (True, False):
        out = run_recipe(_recipe(ratio=0.4, whiten=whiten), tiny_llama, tmp_path / f"w{whiten}")
        errs[whiten] = float((_logits(compress.load(out), ids) - ref).norm() / ref.norm())
    assert 0 < errs[True] < errs[False]


def test_parameter_ratio_is_honest_and_records_are_written(tiny_llama: Path, tmp_path: Path) -> None:
    out = run_recipe(_recipe(ratio=0.5, whiten=False), tiny_llama, tmp_path / "p")
    manifest = json.loads((out / "compression.json").read_text())
    reader = CheckpointReader(out)
    dense_params = stored = 0
    for name, entry in manifest["modules"].items():
        assert entry["kind"] == "lowrank" and entry["layout"] == "whole"
        u, v = reader.get(f"{name}.U"), reader.get(f"{name}.V")
        assert u.shape == (entry["in_features"], entry["rank"]) and v.shape == (entry["rank"], entry["out_features"])
        dense_params += entry["in_features"] * entry["out_features"]
        stored += u.numel() + v.numel()
    assert len(manifest["modules"]) == 3 * 7 and stored <= 0.5 * dense_params
    records = json.loads((out / "reports" / "report.json").read_text())
    assert len(records) == 21 and all(r["kind"] == "lowrank" and r["error"] is None for r in records)
    assert all(0 < r["weight_error"] < 1 for r in records)  # data-free: the report shows the weight error
    assert all(r["extra"]["param_ratio"] <= 0.5 for r in records)


def test_ratio_one_keeps_square_layers_dense_and_says_why(tiny_llama: Path, tmp_path: Path) -> None:
    out = run_recipe(_recipe(ratio=1.0, whiten=False), tiny_llama, tmp_path / "one")
    records = json.loads((out / "reports" / "report.json").read_text())
    q = [r for r in records if r["module"].endswith("q_proj")]
    assert q and all(r["kind"] == "dense" and "smaller than the dense weight" in r["extra"]["reason"] for r in q)
    assert all(r["weight_error"] == 0.0 and r["error"] is None for r in q)  # unchanged; no data: not measured
    k = [r for r in records if r["module"].endswith("k_proj")]  # 64x32: rank 21 · 96 < 2048
    assert all(r["kind"] == "lowrank" for r in k)
    model = compress.load(out)
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)


def test_explicit_ranks_from_a_file_win_and_the_rest_stays_dense(tiny_llama: Path, tmp_path: Path) -> None:
    ranks = tmp_path / "ranks.yaml"
    ranks.write_text("model.layers.1.mlp.down_proj: 5\nmodel.layers.0.self_attn.q_proj: 3\n")
    out = run_recipe(_recipe(ranks=str(ranks), whiten=False), tiny_llama, tmp_path / "r")
    mods = json.loads((out / "compression.json").read_text())["modules"]
    assert {k: v["rank"] for k, v in mods.items()} == {"model.layers.1.mlp.down_proj": 5,
                                                      "model.layers.0.self_attn.q_proj": 3}
    saved = (out / "recipe.yaml").read_text()
    assert "down_proj: 5" in saved  # the resolved mapping is recorded, not the file path


def test_energy_rule_keeps_the_requested_energy(tiny_llama: Path, tmp_path: Path) -> None:
    out = run_recipe(_recipe(energy=0.9), tiny_llama, tmp_path / "e")
    records = json.loads((out / "reports" / "report.json").read_text())
    lowrank = [r for r in records if r["kind"] == "lowrank"]
    assert lowrank and all(r["extra"]["energy_kept"] >= 0.9 for r in lowrank)
    assert all(r["error"] is not None and r["error"] <= 0.1 + 1e-6 for r in lowrank)  # whitened: energy = output


def test_per_head_layout_loads_and_serves(tiny_llama: Path, tmp_path: Path) -> None:
    out = run_recipe(_recipe(ratio=0.5, per_head=True), tiny_llama, tmp_path / "h")
    mods = json.loads((out / "compression.json").read_text())["modules"]
    q, k = mods["model.layers.0.self_attn.q_proj"], mods["model.layers.0.self_attn.k_proj"]
    assert (q["heads"], q["layout"], k["heads"]) == (4, "per_head", 2)
    assert q["rank"] == svd.rank_for_ratio(64, 16, 0.5)  # per head: [16, 64] blocks
    assert mods["model.layers.0.mlp.up_proj"]["heads"] == 1
    model = compress.load(out)
    lin = model.model.layers[0].self_attn.q_proj
    assert lin.V.shape == (4, q["rank"], 16)
    x = torch.randn(2, 5, 64)
    assert torch.allclose(lin(x).double(), lin.reference_forward(x), atol=1e-5)


def test_encoder_pass_runs_and_loads(tiny_bert: Path, tmp_path: Path) -> None:
    out = run_recipe(_recipe(ratio=0.6), tiny_bert, tmp_path / "b")
    model = compress.load(out)
    layer = model.encoder.layer[0]
    assert isinstance(layer.attention.self.query, LowRankLinear)
    assert isinstance(layer.output.dense, LowRankLinear)
    records = json.loads((out / "reports" / "report.json").read_text())
    assert all(r["error"] is not None and 0 <= r["error"] < 1 for r in records)


def test_plain_pass_needs_no_calibration(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import compress.runner as runner

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("plain SVD must not load calibration data")

    monkeypatch.setattr(runner, "load_calibration", refuse)
    run_recipe(_recipe(ratio=0.5, whiten=False), tiny_llama, tmp_path / "nc")
