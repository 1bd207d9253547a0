"""`compress share` (concatenated-SVD clustering): refusals, identical layers forming one cluster
per role, shared bases stored once with byte accounting equal to the file, every estimator,
fixed pairs, the one-layer model, and the stage in a recipe before GPTQ."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import compress
from compress.checkpoint import CheckpointReader
from tests.conftest import SMOKE, assert_refused, dir_hash, make_llama, run_cli


def _identical_layers(path: Path, layers: int = 4, rank: int = 8) -> Path:
    """A tiny LLaMA whose blocks all carry block 0's weights (their inputs still differ), with
    q, k, v, gate and up of rank ``rank`` (so sharing them is exact at that rank)."""
    import transformers

    make_llama(path, layers=layers, seed=3)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    block = model.model.layers[0]
    for lin in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj,
                block.mlp.gate_proj, block.mlp.up_proj):
        U, S, Vh = torch.linalg.svd(lin.weight.data.double(), full_matrices=False)
        lin.weight.data = ((U[:, :rank] * S[:rank]) @ Vh[:rank]).float()
    first = block.state_dict()
    for block in model.model.layers[1:]:
        block.load_state_dict(first)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def same(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _identical_layers(tmp_path_factory.mktemp("same") / "llama")


def _share(src: Path, out: Path, args: list[str], monkeypatch: pytest.MonkeyPatch,
           capsys: pytest.CaptureFixture) -> Path:
    code, _, err = run_cli(["share", str(src), "-o", str(out), *SMOKE, *args], monkeypatch, capsys)
    assert code == 0, err
    return out


def _plan(out: Path) -> dict:
    return json.loads((out / "plan.json").read_text())


def test_help_shows_the_share_flags(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(["share", "--help"], monkeypatch, capsys)
    assert code == 0
    for flag in ("--error", "--ratio", "--estimator", "--roles", "--grouping", "--patience", "--single-layer"):
        assert flag in out, flag


CASES = [
    (["--error", "0"], "error"),
    (["--error", "1"], "error"),
    (["--error", "1.5"], "error"),
    (["--ratio", "0"], "ratio"),
    (["--ratio", "1.2"], "ratio"),
    ([], "set error"),
    (["--ratio", "0.8", "--roles", "q,nope"], "unknown role"),
    (["--error", "0.3", "--grouping", "pairs"], "set ratio"),
    (["--ratio", "0.8", "--group-size", "3"], "group_size"),
    (["--ratio", "0.8", "--estimator", "exact"], "estimator"),
]


@pytest.mark.parametrize("args,needle", CASES)
def test_bad_share_inputs(args: list[str], needle: str, tiny_llama: Path, tmp_path: Path,
                          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    before = dir_hash(tiny_llama)
    out = tmp_path / "out"
    code, _, err = run_cli(["share", str(tiny_llama), "-o", str(out), *args], monkeypatch, capsys)
    assert_refused(code, err, needle, tiny_llama, before, out)


def test_roles_the_family_does_not_have(tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    before = dir_hash(tiny_bert)
    out = tmp_path / "out"
    code, _, err = run_cli(["share", str(tiny_bert), "--ratio", "0.8", "--roles", "q,gate", "-o", str(out), *SMOKE],
                           monkeypatch, capsys)
    assert_refused(code, err, "no separate gate", tiny_bert, before, out)
    assert "--roles from q, k, v, o, up, down" in err


def test_one_layer_model_is_refused_unless_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    src = make_llama(tmp_path / "one", layers=1)
    capsys.readouterr()  # the model's own save messages
    before = dir_hash(src)
    out = tmp_path / "out"
    code, _, err = run_cli(["share", str(src), "--ratio", "0.8", "-o", str(out), *SMOKE], monkeypatch, capsys)
    assert_refused(code, err, "one layer", src, before, out)
    assert "--single-layer lowrank" in err
    _share(src, out, ["--ratio", "0.8", "--single-layer", "lowrank"], monkeypatch, capsys)
    kinds = {e["kind"] for e in compress.load(out).compress_manifest["modules"].values()}
    assert kinds == {"lowrank"}


def test_identical_layers_share_one_basis_per_role(same: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    out = _share(same, tmp_path / "s", ["--error", "0.05"], monkeypatch, capsys)
    plan = _plan(out)
    for role in ("q", "k", "v", "gate", "up"):
        units = [u for u in plan["units"] if u["role"] == role]
        assert len(units) == 1 and units[0]["layers"] == [0, 1, 2, 3] and units[0]["kind"] == "shared", units
        assert units[0]["error"] <= 0.05 and units[0]["exact_error"] <= 0.05
    # identical whitened blocks: the joint spectrum is the single one's, so sharing costs no rank
    model = compress.load(out)
    assert {e["kind"] for e in model.compress_manifest["modules"].values()} == {"lowrank-shared"}
    assert len(model.compress_manifest["shared"]) == 5
    code, text, err = run_cli(["validate", str(out)], monkeypatch, capsys)
    assert code == 0 and "validation passed" in text + err, err
    assert (out / "reports" / "clusters.png").is_file()


def test_full_rank_sharing_reconstructs_every_layer(same: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    """ε tiny on identical rank-8 layers: each role shares one rank-8 basis and the loaded model
    computes the dense one (fp32 storage: up to float round-off of the whitening)."""
    import transformers

    out = _share(same, tmp_path / "s", ["--error", "1e-6", "--damp", "0"], monkeypatch, capsys)
    dense = transformers.AutoModelForCausalLM.from_pretrained(same, dtype=torch.float32).eval()
    assert {u["kind"] for u in _plan(out)["units"]} == {"shared"}
    assert {u["rank"] for u in _plan(out)["units"]} == {8}
    model = compress.load(out)
    ids = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = dense(input_ids=ids).logits, model(input_ids=ids).logits
    assert float((got - want).norm() / want.norm()) < 1e-4


def test_shared_tensors_are_stored_once_and_bytes_add_up(same: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    out = _share(same, tmp_path / "s", ["--ratio", "0.6"], monkeypatch, capsys)
    plan = _plan(out)
    clusters = [u for u in plan["units"] if u["kind"] == "shared"]
    reader = CheckpointReader(out)
    shared_keys = [k for k in reader.keys() if k.startswith("compress_shared.")]
    assert len(shared_keys) == len(clusters) and clusters
    for u in clusters:
        U = reader.get(f"compress_shared.{u['basis']}.U")
        assert U.shape[1] == u["rank"]
    # the file holds every tensor exactly once: its size is the header plus the tensors' bytes
    path = out / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert path.stat().st_size == 8 + header + stored
    # the report's bytes (the basis counted at its first member) equal the tensors of the targeted modules
    rows = json.loads((out / "reports" / "report.json").read_text())
    rows = rows["records"] if isinstance(rows, dict) else rows
    targeted = {r["module"] for r in rows}
    want = sum(reader.get(k).numel() * reader.get(k).element_size() for k in reader.keys()
               if k.rsplit(".", 1)[0] in targeted or k.startswith("compress_shared."))
    assert sum(r["bytes"] for r in rows) == want
    # the plan's parameter count is the stored one and stays within the budget
    params = sum(r["params"] for r in rows) + sum(reader.get(k).numel() for k in shared_keys)
    assert params == plan["params"] <= 0.6 * plan["dense_params"]


@pytest.mark.parametrize("estimator", ["approx", "residual", "maxnorm"])
def test_every_estimator_runs_and_reloads(estimator: str, tiny_llama: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    out = _share(tiny_llama, tmp_path / estimator, ["--ratio", "0.7", "--error", "0.8", "--estimator", estimator],
                 monkeypatch, capsys)
    plan = _plan(out)
    assert plan["estimator"] == estimator
    for u in plan["units"]:
        if u["kind"] == "shared":
            assert u["exact_error"] <= 0.8
            if estimator != "approx":  # provable bounds
                assert u["estimated_error"] >= u["exact_error"] - 1e-7
    ids = torch.randint(0, 400, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(compress.load(out)(input_ids=ids).logits).all()


def test_fixed_pairs_group_contiguous_layers(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    out = _share(tiny_llama, tmp_path / "p", ["--ratio", "0.8", "--grouping", "pairs", "--propagate", "dense"],
                 monkeypatch, capsys)
    plan = _plan(out)
    shared = [u["layers"] for u in plan["units"] if u["kind"] == "shared"]
    assert shared and all(layers == [0, 1] for layers in shared)  # tiny_llama has 3 layers: {0,1}, {2}
    assert plan["params"] <= 0.8 * plan["dense_params"]


def test_share_then_gptq_in_a_recipe(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("calibration: {protocol: brown-128-smoke, batch_size: 4}\nstages:\n"
                      "  - {pass: svd_cluster, config: {ratio: 0.8, error: 0.9}}\n"
                      "  - {pass: gptq, config: {bits: 4, group_size: 32, targets: ['o_proj', 'down_proj']}}\n")
    out = tmp_path / "o"
    code, _, err = run_cli(["run", str(recipe), str(tiny_llama), "-o", str(out)], monkeypatch, capsys)
    assert code == 0, err
    kinds = {e["kind"] for e in compress.load(out).compress_manifest["modules"].values()}
    assert "quant" in kinds and kinds & {"lowrank-shared", "lowrank"}
    code, text, err = run_cli(["validate", str(out)], monkeypatch, capsys)
    assert code == 0 and "validation passed" in text + err, err
