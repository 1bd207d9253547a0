"""The layer-streaming runner on tiny models: the streamed result equals a slow, obvious
whole-model reference; outputs load back; runs are deterministic; adapters cover encoders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

import compress
from compress.algos.gptq import gptq_quantize
from compress.algos.quant import QuantSpec
from compress.arch import LLAMA
from compress.calib.hessian import GramAccumulator
from compress.checkpoint import CheckpointReader
from compress.recipe import parse_recipe
from compress.runner import load_calibration, run_recipe
from tests.conftest import dir_hash, make_llama

CAL = {"protocol": "brown-128-smoke", "batch_size": 3}


def _recipe(pass_name: str, **cfg: object):
    return parse_recipe({"calibration": CAL, "stages": [{"pass": pass_name, "config": cfg}]})


def _reference_gptq(model_dir: Path, windows: torch.Tensor, spec: QuantSpec) -> transformers.PreTrainedModel:
    """Whole model in memory, full forwards from the embeddings for every group: slow and obvious."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for layer in model.model.layers:
        for group in LLAMA.groups:
            first = layer.get_submodule(group[0])
            acc = GramAccumulator(first.in_features)
            h = first.register_forward_pre_hook(lambda _m, a: acc.add(a[0]))
            with torch.no_grad():
                for b in windows.split(3):
                    model(input_ids=b)
            h.remove()
            mods = [layer.get_submodule(n) for n in group]
            W = torch.cat([m.weight.detach() for m in mods])
            qw, _ = gptq_quantize(W, acc.mean(), spec)
            deq = qw.dequantize()
            start = 0
            for m in mods:
                rows = m.weight.shape[0]
                m.weight.data = deq[start:start + rows].clone()
                start += rows
    return model


def _logit_error(model: torch.nn.Module, dense: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, dense(input_ids=ids).logits
    return float((a - b).norm() / b.norm())


def test_streamed_gptq_equals_whole_model_reference(tiny_llama: Path, tmp_path: Path) -> None:
    """Block 0 must match exactly; later blocks differ only by GPTQ's chaotic response to
    1-ulp float differences (BLAS paths depend on alignment), so compare end-to-end fidelity."""
    out = run_recipe(_recipe("gptq", bits=4, group_size=32, sequential="true", act_order=False, mse=False),
                     tiny_llama, tmp_path / "q")
    calib = load_calibration(tiny_llama, parse_recipe({"calibration": CAL, "stages": [{"pass": "rtn"}]}).calibration,
                             CheckpointReader(tiny_llama).config)
    ref = _reference_gptq(tiny_llama, calib.windows, QuantSpec(4, 32, True))
    model = compress.load(out)
    for rel in LLAMA.linears[:3]:
        name = f"model.layers.0.{rel}"
        assert torch.allclose(model.get_submodule(name).dequantized_weight(),
                              ref.get_submodule(name).weight, atol=1e-6), name
    dense = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = torch.randint(0, 400, (4, 64), generator=torch.Generator().manual_seed(1))
    ours, theirs = _logit_error(model, dense, ids), _logit_error(ref, dense, ids)
    assert 0 < ours < 1.1 * theirs and theirs < 1.1 * ours


@pytest.mark.parametrize("pass_name,cfg", [
    ("rtn", {"bits": 4, "group_size": 32}),
    ("rtn", {"bits": 3, "group_size": 40, "symmetric": False}),
    ("gptq", {"bits": 4, "group_size": 32, "act_order": True, "sequential": "layer"}),
    ("gptq", {"bits": 2, "group_size": None}),
    ("gptq", {"bits": 8, "group_size": None, "symmetric": False}),
])
def test_outputs_load_and_match_their_dequantised_weights(tiny_llama: Path, tmp_path: Path,
                                                          pass_name: str, cfg: dict) -> None:
    out = run_recipe(_recipe(pass_name, **cfg), tiny_llama, tmp_path / "o")
    model = compress.load(out)
    dense = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    qmods = {n: m for n, m in model.named_modules() if type(m).__name__ == "QuantLinear"}
    assert len(qmods) == 7 * 3
    for n, m in qmods.items():
        dense.get_submodule(n).weight.data = m.dequantized_weight()
    ids = torch.randint(0, 400, (2, 33))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, dense(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    manifest = model.compress_manifest
    assert manifest["tool"]["name"] == "compress" and manifest["input"]["sha256"]
    assert (out / "recipe.yaml").is_file() and (out / "reports" / "report.csv").is_file()
    assert (out / "reports" / "report.png").stat().st_size > 1000
    if pass_name == "gptq":
        assert manifest["calibration"]["fingerprint"]


def test_same_recipe_and_seed_give_identical_tensors(tiny_llama: Path, tmp_path: Path) -> None:
    rec = _recipe("gptq", bits=4, group_size=32, act_order=True)
    a = run_recipe(rec, tiny_llama, tmp_path / "a")
    b = run_recipe(rec, tiny_llama, tmp_path / "b")
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    assert ra.keys() == rb.keys()
    assert all(torch.equal(ra.get(k), rb.get(k)) for k in ra.keys())


def test_input_is_never_modified(tiny_llama: Path, tmp_path: Path) -> None:
    before = dir_hash(tiny_llama)
    run_recipe(_recipe("gptq", bits=4, group_size=32), tiny_llama, tmp_path / "x")
    assert dir_hash(tiny_llama) == before


def test_untied_head_and_bias_and_qwen2(tmp_path: Path) -> None:
    for kind, kw in (("llama", {"tie": False, "bias": True}), ("qwen2", {}), ("mistral", {})):
        src = make_llama(tmp_path / kind, layers=2, model_type=kind, **kw)
        out = run_recipe(_recipe("gptq", bits=4, group_size=32), src, tmp_path / f"{kind}-q")
        model = compress.load(out)
        with torch.no_grad():
            logits = model(input_ids=torch.randint(0, 400, (1, 20))).logits
        assert torch.isfinite(logits).all()


def test_bert_encoder(tiny_bert: Path, tmp_path: Path) -> None:
    out = run_recipe(_recipe("gptq", bits=8, group_size=None), tiny_bert, tmp_path / "b")
    model = compress.load(out)
    dense = transformers.AutoModel.from_pretrained(tiny_bert).eval()
    ids = torch.randint(0, 400, (2, 17))
    with torch.no_grad():
        a, b = model(input_ids=ids).last_hidden_state, dense(input_ids=ids).last_hidden_state
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999


def test_two_stage_recipe_composes(tiny_llama: Path, tmp_path: Path) -> None:
    rec = parse_recipe({"calibration": CAL, "stages": [
        {"pass": "rtn", "config": {"bits": 8, "group_size": None, "targets": ["mlp"]}},
        {"pass": "gptq", "config": {"bits": 4, "group_size": 32, "targets": ["self_attn"]}}]})
    out = run_recipe(rec, tiny_llama, tmp_path / "chain")
    m = compress.load(out)
    assert m.model.layers[0].mlp.down_proj.bits == 8
    assert m.model.layers[0].self_attn.q_proj.bits == 4
    hist = m.compress_manifest["history"]
    assert [h["pass"] for h in hist] == ["rtn", "gptq"]
    assert not list(tmp_path.glob(".chain.stages-*"))  # intermediates are cleaned up


@pytest.mark.parametrize("model_type,targets", [("llama", []), ("qwen2", ["mlp", "o_proj"]), ("phi3", [])])
def test_staged_true_sequential_equals_generic_path(model_type: str, targets: list[str], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The staged pre-norm path is an optimisation only: bit-identical tensors."""
    import compress.passes.quantize as quantize

    src = make_llama(tmp_path / "m", layers=3, model_type=model_type)
    rec = _recipe("gptq", bits=4, group_size=32, sequential="true", targets=targets)
    staged = run_recipe(rec, src, tmp_path / "staged")
    monkeypatch.setattr(quantize, "supports_staged", lambda ctx: False)
    generic = run_recipe(rec, src, tmp_path / "generic")
    ra, rb = CheckpointReader(staged), CheckpointReader(generic)
    assert ra.keys() == rb.keys()
    assert all(torch.equal(ra.get(k), rb.get(k)) for k in ra.keys())
