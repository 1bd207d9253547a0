"""The slicegpt pass on tiny LLaMA-family models: computational invariance (fusion, 0 % slicing,
rotations orthogonal), save → load equals the in-memory result, schedules, parameter counts, the
manifest, composition with GPTQ, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

import compress
from compress.checkpoint import CheckpointReader
from compress.algos.slicegpt import orthonormality_error, sliced_width
from compress.errors import CompressError
from compress.modules.quant_linear import QuantLinear
from compress.modules.sliced import ProjectedRMSNorm, SlicedEmbedding
from compress.passes.slicegpt import SliceGPTPass
from compress.recipe import parse_recipe
from compress.runner import load_calibration, run_recipe
from tests.conftest import make_llama

CAL = {"protocol": "brown-128-smoke", "batch_size": 4}


def _recipe(*stages: dict):
    return parse_recipe({"calibration": CAL, "stages": list(stages)})


def _slice(**cfg: object) -> dict:
    return {"pass": "slicegpt", "config": cfg}


def _ids(n: int = 2, L: int = 37) -> torch.Tensor:
    return torch.randint(0, 400, (n, L), generator=torch.Generator().manual_seed(5))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _dense(path: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() counts a tied table once


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slice")
    return {"tied": make_llama(root / "tied", tie=True),
            "untied": make_llama(root / "untied", tie=False, seed=1),
            "qwen2": make_llama(root / "qwen2", tie=False, seed=2, model_type="qwen2")}


@pytest.mark.parametrize("name", ["tied", "untied", "qwen2"])
def test_rotations_without_slicing_preserve_the_function(name: str, models: dict[str, Path], tmp_path: Path) -> None:
    """Norm fusion + a PCA rotation at every point, nothing sliced: same logits, orthogonal maps."""
    src = models[name]
    out = run_recipe(_recipe(_slice(sparsity=0.0, rotate_unsliced=True)), src, tmp_path / "o")
    model = compress.load(out)
    ids = _ids()
    want, got = _logits(_dense(src), ids), _logits(model, ids)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4
    for layer in model.model.layers:
        for sc in (layer.attn_shortcut, layer.mlp_shortcut):
            assert sc is not None and orthonormality_error(sc.weight.detach()) < 1e-6


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_zero_slicing_is_the_dense_model(name: str, models: dict[str, Path], tmp_path: Path) -> None:
    """0 % slicing keeps every point in the original basis: no shortcut, dense parameter count."""
    src = models[name]
    model = compress.load(run_recipe(_recipe(_slice(sparsity=0.0)), src, tmp_path / "o"))
    dense = _dense(src)
    ids = _ids()
    assert torch.allclose(_logits(model, ids), _logits(dense, ids), rtol=1e-5, atol=1e-5)
    assert _params(model) == _params(dense)
    assert all(layer.attn_shortcut is None and layer.mlp_shortcut is None for layer in model.model.layers)


def test_saved_model_equals_the_in_memory_result(models: dict[str, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The activations the pass propagated after block 0 (its in-memory sliced block) equal what
    the loaded checkpoint computes on the same windows: save → load changes nothing."""
    seen: dict[str, torch.Tensor] = {}
    original = SliceGPTPass.process_layer

    def spy(self, ctx, run):  # noqa: ANN001, ANN202
        records = original(self, ctx, run)
        if ctx.index == 0:
            st = ctx.state
            seen["h"] = torch.cat([st.batch(b).clone() for b in st.batches()])
        return records

    monkeypatch.setattr(SliceGPTPass, "process_layer", spy)
    src = models["untied"]
    recipe = _recipe(_slice(sparsity=0.3))
    windows = load_calibration(src, recipe.calibration, CheckpointReader(src).config).windows
    out = run_recipe(recipe, src, tmp_path / "o")
    model = compress.load(out)
    got = []
    hook = model.model.layers[0].register_forward_hook(lambda _m, _a, o: got.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        for b in windows.split(CAL["batch_size"]):
            model(input_ids=b, use_cache=False)
    hook.remove()
    h = torch.cat(got)
    assert h.shape == seen["h"].shape
    assert float((h - seen["h"]).abs().max() / seen["h"].abs().max()) < 1e-5


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_slicing_shrinks_every_point_and_the_parameter_count(name: str, models: dict[str, Path],
                                                             tmp_path: Path) -> None:
    src = models[name]
    dense = _dense(src)
    D = dense.config.hidden_size
    out = run_recipe(_recipe(_slice(sparsity=0.25)), src, tmp_path / "o")
    model = compress.load(out)
    d = sliced_width(D, 0.25, 8)
    assert _params(model) < _params(dense)
    logits = _logits(model, _ids())
    assert torch.isfinite(logits).all() and logits.shape[-1] == dense.config.vocab_size
    layers = model.model.layers
    assert layers[1].self_attn.q_proj.in_features == d and layers[0].mlp.down_proj.out_features == d
    # the last block's output keeps the full width (head not sliced by default)
    assert layers[-1].mlp.down_proj.out_features == D
    emb = model.model.embed_tokens
    assert isinstance(emb, SlicedEmbedding)
    if name == "tied":  # the point stays whole by default: the table is stored whole anyway
        assert emb.width == D and emb.weight.shape[1] == D and model.lm_head.weight is emb.weight
        assert layers[0].self_attn.q_proj.in_features == D
    else:
        assert emb.width == d and emb.weight.shape[1] == d
        assert layers[0].self_attn.q_proj.in_features == d
    spec = next(t for t in json.loads((out / "compression.json").read_text())["transforms"] if t["kind"] == "slicegpt")
    assert spec["tied_head"] is (name == "tied")
    assert [entry["in"] for entry in spec["layers"]] == [D if name == "tied" else d, d, d]


def test_sliced_embedding_point_with_a_tied_head_keeps_it_tied(models: dict[str, Path], tmp_path: Path) -> None:
    """Slicing the embedding point of a tied model: the table stays whole and tied, the final
    norm maps the last residual basis into the table's basis."""
    out = run_recipe(_recipe(_slice(sparsity=0.25, embedding_sparsity=0.25)), models["tied"], tmp_path / "o")
    model = compress.load(out)
    emb = model.model.embed_tokens
    assert emb.width == sliced_width(64, 0.25, 8) and emb.weight.shape[1] == 64
    assert model.lm_head.weight is emb.weight and isinstance(model.model.norm, ProjectedRMSNorm)
    assert torch.isfinite(_logits(model, _ids())).all()


def test_slice_head_narrows_the_last_point_and_a_tied_table(models: dict[str, Path], tmp_path: Path) -> None:
    out = run_recipe(_recipe(_slice(sparsity=0.25, slice_head=True, embedding_sparsity=0.25)), models["tied"],
                     tmp_path / "o")
    model = compress.load(out)
    d = sliced_width(64, 0.25, 8)
    assert model.model.layers[-1].mlp.down_proj.out_features == d
    assert model.model.embed_tokens.weight.shape[1] == d and model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.isfinite(_logits(model, _ids())).all()


def test_schedule_sets_per_block_widths(models: dict[str, Path], tmp_path: Path) -> None:
    sched = tmp_path / "sched.yaml"
    sched.write_text("- 0.5\n- 0.0\n- 0.25\n")
    out = run_recipe(_recipe(_slice(schedule=str(sched), round_to=4)), models["untied"], tmp_path / "o")
    spec = next(t for t in json.loads((out / "compression.json").read_text())["transforms"] if t["kind"] == "slicegpt")
    mids = [entry["mid"] for entry in spec["layers"]]
    assert mids == [32, 64, 48]
    assert spec["embedding"]["width"] == 32  # untied: the embedding point follows block 0
    assert torch.isfinite(_logits(compress.load(out), _ids())).all()


def test_slicing_quality_degrades_gracefully_with_the_fraction(models: dict[str, Path], tmp_path: Path) -> None:
    """More slicing, more error vs dense (measured as KL on held-out ids)."""
    src = models["untied"]
    ids = _ids(3, 48)
    ref = torch.log_softmax(_logits(_dense(src), ids), -1)
    kls = []
    for f in (0.0, 0.25, 0.5):
        out = run_recipe(_recipe(_slice(sparsity=f, round_to=4)), src, tmp_path / f"o{f}")
        lp = torch.log_softmax(_logits(compress.load(out), ids), -1)
        kls.append(float((ref.exp() * (ref - lp)).sum(-1).mean()))
    assert kls[0] < 1e-6 and kls[0] < kls[1] < kls[2]


def test_slice_then_gptq_composes(models: dict[str, Path], tmp_path: Path) -> None:
    out = run_recipe(_recipe(_slice(sparsity=0.25), {"pass": "gptq", "config": {"bits": 4, "group_size": 16}}),
                     models["tied"], tmp_path / "o")
    model = compress.load(out)
    q = model.model.layers[1].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.in_features == sliced_width(64, 0.25, 8)
    sc = model.model.layers[1].attn_shortcut
    assert sc is not None and type(sc) is torch.nn.Linear  # shortcuts stay dense
    assert torch.isfinite(_logits(model, _ids())).all()


def test_slicing_after_a_quantisation_stage_is_refused_before_any_work(models: dict[str, Path], tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import compress.runner as runner

    def no_work(*_a: object, **_k: object) -> None:
        raise AssertionError("a stage ran although a later stage is refused")
    monkeypatch.setattr(runner, "run_stage", no_work)
    recipe = _recipe({"pass": "rtn", "config": {"bits": 4, "group_size": 16}}, _slice(sparsity=0.25))
    with pytest.raises(CompressError, match=r"stage 1 \(slicegpt\): .*cannot be rotated") as e:
        run_recipe(recipe, models["untied"], tmp_path / "o")
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()
    from compress.arch import get_adapter
    from compress.summary import stage_estimates

    reader = CheckpointReader(models["untied"])
    with pytest.raises(CompressError, match=r"stage 1 \(slicegpt\)"):  # `compress plan` says the same
        stage_estimates(recipe, reader, get_adapter(reader.config))


def test_slicing_a_sliced_or_quantised_checkpoint_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    sliced = run_recipe(_recipe(_slice(sparsity=0.25)), models["untied"], tmp_path / "s")
    with pytest.raises(CompressError, match="already sliced"):
        run_recipe(_recipe(_slice(sparsity=0.25)), sliced, tmp_path / "s2")
    q = run_recipe(parse_recipe({"stages": [{"pass": "rtn", "config": {"bits": 4, "group_size": 16}}]}),
                   models["untied"], tmp_path / "q")
    with pytest.raises(CompressError, match="cannot be rotated"):
        run_recipe(_recipe(_slice(sparsity=0.25)), q, tmp_path / "q2")
    assert not (tmp_path / "s2").exists() and not (tmp_path / "q2").exists()
