"""The StructPrune pass end to end on tiny random decoders (LLaMA with GQA, OPT with biases):
the physically shrunk checkpoint computes what the masked dense model computes, 0 % is the
identity, the budget is spent exactly, ADMM lowers every reconstructed linear's output error,
and bad input is refused in one line before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

import compress
from compress.errors import CompressError
from compress.recipe import parse_recipe
from compress.runner import run_recipe
from tests.conftest import make_llama, make_opt, run_cli

CAL = {"protocol": "brown-128-smoke", "n_samples": 8}
IDS = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sp")
    return {"llama": make_llama(root / "llama", layers=3, tie=True, seed=4), "opt": make_opt(root / "opt", seed=4)}


def _prune(src: Path, out: Path, **config: object) -> Path:
    recipe = parse_recipe({"calibration": CAL, "stages": [{"pass": "structprune", "config": config}]})
    return run_recipe(recipe, src, out, cache=False, device="cpu")


def _masked(src: Path, out: Path) -> torch.nn.Module:
    """The dense model with every removed row/column zeroed and the kept weights the output's."""
    dense = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    pruned = compress.load(out)
    adapter = pruned.compress_adapter
    plan = json.loads((out / "plan.json").read_text())
    cfg = dense.config
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    hd = cfg.hidden_size // heads
    r = heads // kv
    for i, lp in enumerate(plan["layers"]):
        layer, small = dense.get_submodule(adapter.layers)[i], pruned.get_submodule(adapter.layers)[i]
        keep: dict[str, tuple[list[int] | None, list[int] | None]] = {}
        if lp["heads"] is not None:
            q = [g * r * hd + j for g in lp["heads"] for j in range(r * hd)]
            kvr = [g * hd + j for g in lp["heads"] for j in range(hd)]
            keep |= {adapter.role("q"): (q, None), adapter.role("k"): (kvr, None), adapter.role("v"): (kvr, None),
                     adapter.role("o"): (None, q)}
        if lp["channels"] is not None:
            ch = lp["channels"]
            keep |= {adapter.role(x): (ch, None) for x in ("gate", "up") if x in adapter.roles}
            keep[adapter.role("down")] = (None, ch)
        for rel, (rows, cols) in keep.items():
            lin, got = layer.get_submodule(rel), small.get_submodule(rel)
            w = torch.zeros_like(lin.weight)
            ri = torch.tensor(rows) if rows is not None else torch.arange(w.shape[0])
            ci = torch.tensor(cols) if cols is not None else torch.arange(w.shape[1])
            w[ri[:, None], ci[None, :]] = got.weight.detach()
            lin.weight.data = w
            if lin.bias is not None:
                b = torch.zeros_like(lin.bias) if rows is not None else lin.bias.detach().clone()
                b[ri] = got.bias.detach()
                lin.bias.data = b
    return dense


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("reconstruct", ["none", "admm"])
def test_shrunk_equals_masked(family: str, reconstruct: str, models: dict[str, Path], tmp_path: Path) -> None:
    out = _prune(models[family], tmp_path / "o", sparsity=0.3, reconstruct=reconstruct)
    with torch.no_grad():
        got = compress.load(out)(input_ids=IDS).logits
        want = _masked(models[family], out)(input_ids=IDS).logits
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5
    kinds = {e["kind"] for e in json.loads((out / "compression.json").read_text())["modules"].values()}
    assert kinds == {"pruned"}


def test_zero_sparsity_is_the_identity(models: dict[str, Path], tmp_path: Path) -> None:
    out = _prune(models["llama"], tmp_path / "o", sparsity=0.0)
    dense = transformers.AutoModelForCausalLM.from_pretrained(models["llama"], dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(compress.load(out)(input_ids=IDS).logits, dense(input_ids=IDS).logits)
    assert json.loads((out / "compression.json").read_text())["modules"] == {}


@pytest.mark.parametrize("allocation", ["softmax", "uniform", "global"])
def test_the_budget_is_spent_and_the_checkpoint_shrinks(allocation: str, models: dict[str, Path],
                                                         tmp_path: Path) -> None:
    src = models["llama"]
    out = _prune(src, tmp_path / "o", sparsity=0.25, allocation=allocation, multiple_of=8)
    plan = json.loads((out / "plan.json").read_text())
    dense = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    block = sum(p.numel() for n, p in dense.model.layers.named_parameters() if n.endswith("proj.weight"))
    assert plan["target_params"] == round(0.25 * block)
    small = compress.load(out)
    left = sum(p.numel() for n, p in small.model.layers.named_parameters() if n.endswith("proj.weight"))
    assert block - left == plan["removed_params"]
    heads_cost = 64 * 16 * 4  # a KV group of this model: 2 query heads + k + v rows, o columns
    assert abs(plan["removed_params"] - plan["target_params"]) <= heads_cost / 2
    for lp in plan["layers"]:
        assert lp["channels"] is None or len(lp["channels"]) % 8 == 0
    assert (out / "reports" / "allocation.png").read_bytes()[:4] == b"\x89PNG"
    records = json.loads((out / "reports" / "report.json").read_text())
    for r in records:
        assert r["error"] <= r["extra"]["error_before_admm"] + 1e-9  # ADMM never loses to the mask


@pytest.mark.parametrize("args, words", [
    (["--sparsity", "0.95"], "--sparsity 0.95"),
    (["--structures", "ffn", "--min-keep", "0.9", "--sparsity", "0.5"], "outside what the per-layer limits allow"),
    (["--multiple-of", "7"], "does not divide the FFN width"),
])
def test_bad_options_are_one_line(args: list[str], words: str, models: dict[str, Path], tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "o"
    code, _, err = run_cli(["prune", str(models["llama"]), "-o", str(out), "--protocol", "brown-128-smoke", *args],
                           monkeypatch, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], err
    assert not out.exists()


def test_a_compressed_input_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    q = run_recipe(parse_recipe({"stages": [{"pass": "rtn", "config": {"bits": 8}}]}), models["llama"],
                   tmp_path / "q")
    with pytest.raises(CompressError, match="needs a dense checkpoint"):
        _prune(q, tmp_path / "o", sparsity=0.2)


def test_prune_then_gptq_composes(models: dict[str, Path], tmp_path: Path) -> None:
    recipe = parse_recipe({"calibration": CAL, "stages": [
        {"pass": "structprune", "config": {"sparsity": 0.2, "structures": ["ffn"]}},
        {"pass": "gptq", "config": {"bits": 8, "group_size": 32}}]})
    out = run_recipe(recipe, models["llama"], tmp_path / "o", cache=False, device="cpu")
    model = compress.load(out)
    kinds = {e["kind"] for e in model.compress_manifest["modules"].values()}
    assert kinds == {"quant"}
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=IDS).logits).all()


def test_uniform_widths_load_in_plain_transformers(models: dict[str, Path], tmp_path: Path) -> None:
    """24 of 96 channels in each of 3 blocks is 15 % of the block parameters: uniform is exact."""
    out = _prune(models["llama"], tmp_path / "o", sparsity=0.15, structures=["ffn"], allocation="uniform")
    manifest = json.loads((out / "compression.json").read_text())
    assert manifest["notes"]["structprune"]["plain_transformers"] is True
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 72
    plain = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=IDS).logits, compress.load(out)(input_ids=IDS).logits)


def test_uniform_heads_and_channels_load_in_plain_transformers(models: dict[str, Path], tmp_path: Path) -> None:
    out = _prune(models["llama"], tmp_path / "o", sparsity=0.5, min_keep=0.5, max_keep=0.5)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (2, 1, 16)
    plain = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=IDS).logits, compress.load(out)(input_ids=IDS).logits)


@pytest.mark.parametrize("reconstruct", ["none", "admm"])
def test_bias_compensation_adds_a_bias_and_keeps_the_weights(reconstruct: str, models: dict[str, Path],
                                                              tmp_path: Path) -> None:
    """FLAP-style compensation only adds o's and down's bias: the weights are those of the run
    without it (with ADMM only in the first block: later blocks re-fit on the compensated
    prefix's activations); the output is not written as a plain-transformers config (LLaMA has
    no bias)."""
    src = models["llama"]
    cfg = {"sparsity": 0.15, "structures": ["ffn"], "allocation": "uniform", "reconstruct": reconstruct}
    plain, comp = _prune(src, tmp_path / "p", **cfg), _prune(src, tmp_path / "c", **cfg, compensate=True)
    manifest = json.loads((comp / "compression.json").read_text())
    assert manifest["notes"]["structprune"]["plain_transformers"] is False
    assert json.loads((comp / "config.json").read_text())["intermediate_size"] == 96  # not edited
    a, b = compress.load(plain), compress.load(comp)
    for i, (la, lb) in enumerate(zip(a.model.layers, b.model.layers, strict=True)):
        if reconstruct == "none" or i == 0:
            assert torch.equal(la.mlp.down_proj.weight, lb.mlp.down_proj.weight)
        assert la.mlp.down_proj.bias is None and lb.mlp.down_proj.bias is not None
        assert float(lb.mlp.down_proj.bias.abs().max()) > 0
    downs = [e for n, e in manifest["modules"].items() if n.endswith("down_proj")]
    assert downs and all(e["bias"] for e in downs)
    with torch.no_grad():
        assert torch.isfinite(b(input_ids=IDS).logits).all()
