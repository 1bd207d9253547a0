"""Shared tensors and the typed kinds through the real pipeline (``tests/pipeline/share_pass.py``):
stored once, reloaded by ``compress.load``, validated, carried through a later stage, refused
when referenced but missing, and resumed after a kill -9 to identical tensors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import compress
from compress.checkpoint import CheckpointReader
from compress.errors import CompressError
from compress.recipe import parse_recipe
from compress.runner import run_recipe
from tests.conftest import ROOT, run_cli
from tests.pipeline import share_pass

SHARE = {"stages": [{"pass": "test-share", "config": {"rank": 8}}]}


@pytest.fixture(scope="module")
def shared_out(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from compress.registry import PASSES

    share_pass.register()
    yield run_recipe(parse_recipe(SHARE), tiny_llama, tmp_path_factory.mktemp("share") / "out")
    PASSES.pop("test-share", None)


def _manifest(d: Path) -> dict:
    return json.loads((d / "compression.json").read_text())


def test_shared_tensors_are_stored_once_and_name_their_users(shared_out: Path) -> None:
    keys = CheckpointReader(shared_out).keys()
    shared = [k for k in keys if k.startswith("compress_shared.")]
    assert sorted(shared) == ["compress_shared.mlp_T.T", *(f"compress_shared.qkv_{i}.U" for i in range(3))]
    m = _manifest(shared_out)
    assert m["format_version"] == 3
    assert m["shared"]["qkv_0"]["users"] == [f"model.layers.0.self_attn.{p}_proj" for p in "kqv"]
    assert len(m["shared"]["mlp_T"]["users"]) == 6 and m["shared"]["mlp_T"]["tensors"]["T"]["shape"] == [64, 64]
    assert m["modules"]["model.layers.1.mlp.up_proj"]["inner"]["kind"] == "dense"
    o = m["modules"]["model.layers.2.self_attn.o_proj"]
    assert [s["bits"] for s in o["segments"]] == [4, 3] and o["permuted"] and "bits" not in o
    assert m["export"]["compressed_tensors"] is False


def test_the_reloaded_model_computes_what_its_entries_say(shared_out: Path, tiny_llama: Path) -> None:
    """Rebuild the same function by hand in a dense model: q/k/v projected onto the stored basis,
    gate/up untouched (the transform is orthogonal), o_proj the dequantised mixed weight."""
    import transformers

    model = compress.load(shared_out)
    dense = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    sd = CheckpointReader(shared_out)
    for i, layer in enumerate(dense.model.layers):
        u = sd.get(f"compress_shared.qkv_{i}.U").double()
        for p in ("q_proj", "k_proj", "v_proj"):
            lin = getattr(layer.self_attn, p)
            lin.weight.data = (lin.weight.double() @ u @ u.T).float()
        layer.self_attn.o_proj.weight.data = model.model.layers[i].self_attn.o_proj.dequantized_weight(torch.float32)
    ids = torch.arange(1, 33).reshape(2, 16) * 11 % 400
    with torch.no_grad():
        got, want = model(ids).logits, dense(ids).logits
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-4), (got - want).abs().max()
    assert model.compress_shared.get("mlp_T", "T").data_ptr() == \
        model.model.layers[2].mlp.gate_proj.T.data_ptr()  # one tensor, read by every block


def test_validate_checks_every_kind(shared_out: Path) -> None:
    from compress.validate import validate

    report = validate(shared_out, ms=[1, 5], dtypes=["fp32"])
    assert not report.failures and not report.unvalidated
    kinds = {c.kind for c in report.checks}
    assert kinds == {"lowrank-shared", "transformed-input", "quant"}, kinds


def test_a_later_stage_carries_the_shared_tensors(shared_out: Path, tmp_path: Path) -> None:
    out = run_recipe(parse_recipe({"stages": [{"pass": "rtn", "config": {"bits": 8}}]}), shared_out, tmp_path / "r")
    m = _manifest(out)
    assert m["shared"].keys() == _manifest(shared_out)["shared"].keys()
    assert m["modules"]["model.layers.0.mlp.down_proj"]["kind"] == "quant"
    assert m["modules"]["model.layers.0.mlp.gate_proj"]["kind"] == "transformed-input"
    a, b = CheckpointReader(shared_out), CheckpointReader(out)
    for k in (k for k in a.keys() if k.startswith("compress_shared.")):
        assert torch.equal(a.get(k), b.get(k))
    ids = torch.arange(1, 17).reshape(1, 16)
    with torch.no_grad():
        la, lb = compress.load(shared_out)(ids).logits, compress.load(out)(ids).logits
    assert (la - lb).abs().max() < 0.05 * la.abs().max()


def _without(src: Path, dst: Path, drop: str | None = None, manifest_edit=None) -> Path:  # noqa: ANN001
    shutil.copytree(src, dst)
    if drop is not None:
        r = CheckpointReader(src)
        tensors = {k: r.get(k).clone() for k in r.keys() if k != drop}
        for f in dst.glob("*.safetensors"):
            f.unlink()
        (dst / "model.safetensors.index.json").unlink(missing_ok=True)
        save_file(tensors, str(dst / "model.safetensors"))
    if manifest_edit is not None:
        m = _manifest(dst)
        manifest_edit(m)
        (dst / "compression.json").write_text(json.dumps(m))
    return dst


def test_a_shared_tensor_referenced_but_missing_is_refused(shared_out: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    bad = _without(shared_out, tmp_path / "bad", drop="compress_shared.mlp_T.T")
    with pytest.raises(CompressError, match=r"shared tensor compress_shared\.mlp_T\.T \(read by .*\) is missing"):
        compress.load(bad)
    code, _, err = run_cli(["validate", str(bad)], monkeypatch, capsys)
    assert code == 2 and "is missing from the checkpoint" in err and "Traceback" not in err
    undeclared = _without(shared_out, tmp_path / "undeclared", manifest_edit=lambda m: m["shared"].pop("qkv_1"))
    with pytest.raises(CompressError, match="reads shared group 'qkv_1', which compression.json does not declare"):
        compress.load(undeclared)
    unknown = _without(shared_out, tmp_path / "field", manifest_edit=lambda m: m["modules"][
        "model.layers.0.self_attn.o_proj"].update(zero_point_bits=4))
    with pytest.raises(CompressError, match="o_proj \\(quant\\): zero_point_bits: Extra inputs are not permitted"):
        compress.load(unknown)


def test_a_killed_run_with_shared_groups_resumes_to_identical_tensors(shared_out: Path, tiny_llama: Path,
                                                                      tmp_path: Path) -> None:
    out = tmp_path / "k"
    proc = subprocess.run([sys.executable, "-m", "tests.pipeline.kill_after_block", json.dumps(SHARE),
                           str(tiny_llama), str(out), "1", "test-share", "tests.pipeline.share_pass"], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run_recipe(parse_recipe(SHARE), tiny_llama, out, resume=True)
    a, b = CheckpointReader(shared_out), CheckpointReader(out)
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        assert torch.equal(a.get(k), b.get(k)), k
    ma, mb = _manifest(shared_out), _manifest(out)
    assert ma["modules"] == mb["modules"] and ma["shared"] == mb["shared"]


def test_inspect_shows_bytes_by_kind_and_the_shared_groups(shared_out: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(["inspect", str(shared_out)], monkeypatch, capsys)
    assert code == 0
    assert "bytes by kind" in out and "lowrank-shared:" in out and "transformed-input:" in out
    assert "4 groups" in out and "read by 15 modules" in out
