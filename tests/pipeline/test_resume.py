"""``--resume``: a run killed with SIGKILL after a block continues from its last commit and
writes the tensors an uninterrupted run writes; a resume of something else is refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress.checkpoint import CheckpointReader
from compress.errors import CompressError
from compress.recipe import parse_recipe
from compress.runner import run_recipe
from tests.conftest import ROOT, SMOKE, dir_hash, error_lines, make_llama, run_cli

CAL = {"protocol": "brown-128-smoke", "batch_size": 3}


def _kill_after(recipe: dict, model: Path, out: Path, k: int, victim: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "tests.pipeline.kill_after_block", json.dumps(recipe),
                           str(model), str(out), str(k), victim], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists() and out.with_name(out.name + ".partial").is_dir()


def _assert_same_tensors(a: Path, b: Path) -> None:
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    assert sorted(ra.keys()) == sorted(rb.keys())
    for k in ra.keys():
        assert torch.equal(ra.get(k), rb.get(k)), k
    ma, mb = (json.loads((d / "compression.json").read_text()) for d in (a, b))
    assert ma["modules"] == mb["modules"] and ma["transforms"] == mb["transforms"]
    assert json.loads((a / "reports" / "report.json").read_text()).__len__() == \
        json.loads((b / "reports" / "report.json").read_text()).__len__()


CASES = {
    "gptq": [{"pass": "gptq", "config": {"bits": 4}}],
    "gptq-dense": [{"pass": "gptq", "config": {"bits": 4, "propagate": "dense"}}],
    "slicegpt": [{"pass": "slicegpt", "config": {"sparsity": 0.25}}],
    "slice-then-gptq": [{"pass": "slicegpt", "config": {"sparsity": 0.25}}, {"pass": "gptq", "config": {"bits": 4}}],
    # dense outputs carried between blocks, per-block random inits, shared groups and the attention transform
    "flatquant": [{"pass": "flatquant", "config": {"bits": 4, "act_bits": 4, "kv_bits": 4, "epochs": 2}}],
}


@pytest.mark.parametrize("case", ["gptq-dense", "slicegpt", "slice-then-gptq", "flatquant"])
def test_killed_run_resumes_to_identical_tensors(case: str, tiny_llama: Path, tmp_path: Path) -> None:
    recipe = {"calibration": CAL, "stages": CASES[case]}
    full = run_recipe(parse_recipe(recipe), tiny_llama, tmp_path / "full")
    out = tmp_path / "resumed"
    _kill_after(recipe, tiny_llama, out, 2 if case != "slice-then-gptq" else 1, CASES[case][-1]["pass"])
    run_recipe(parse_recipe(recipe), tiny_llama, out, resume=True)
    _assert_same_tensors(full, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "resumed"]  # no partial, no stages dir
    assert not (out / "resume.json").exists() and not (out / "resume").exists()


# -- refusals: one line, exit 2, the partial run kept, no output -------------------------------
def _refused(args: list[str], needle: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
             out: Path) -> None:
    partial = out.with_name(out.name + ".partial")
    before = dir_hash(partial) if partial.exists() else None
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 2 and len(error_lines(err)) == 1 and "Traceback" not in err, err
    assert needle in err, err
    assert not out.exists()
    assert (dir_hash(partial) if partial.exists() else None) == before


def test_resume_with_no_partial_run_is_refused(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "o"
    _refused(["rtn", str(tiny_llama), "-o", str(out), "--resume"], "no partial run", monkeypatch, capsys, out)


GPTQ_CLI = {"name": "cli-gptq", "calibration": {"protocol": "brown-128-smoke", "batch_size": 4},
            "stages": CASES["gptq"]}


@pytest.fixture(scope="module")
def killed_gptq(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLI-equivalent GPTQ W4 run (brown-128-smoke, batch 4) killed after block 1; the refusals
    below leave it untouched, so they share it."""
    out = tmp_path_factory.mktemp("killed") / "o"
    _kill_after(GPTQ_CLI, tiny_llama, out, 1, "gptq")
    return out


def test_resume_with_a_different_recipe_is_refused(killed_gptq: Path, tiny_llama: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    args = ["gptq", str(tiny_llama), "-o", str(killed_gptq), "--resume", "--bits", "3", *SMOKE]
    _refused(args, "the recipe differs", monkeypatch, capsys, killed_gptq)


def test_resume_with_other_calibration_is_refused(killed_gptq: Path, tiny_llama: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.txt"
    other.write_text("\n".join(f"line {i} of another text with some words in it" for i in range(3000)))
    recipe = {**GPTQ_CLI, "calibration": {**GPTQ_CLI["calibration"], "data": str(other)}}
    partial = killed_gptq.with_name("o.partial")
    before = dir_hash(partial)
    with pytest.raises(CompressError, match="the calibration differs"):
        run_recipe(parse_recipe(recipe), tiny_llama, killed_gptq, resume=True)
    assert dir_hash(partial) == before and not killed_gptq.exists()


def test_resume_after_the_input_changed_is_refused_and_a_rerun_discards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    model = make_llama(tmp_path / "m")
    recipe = {"calibration": CAL, "stages": CASES["gptq"]}
    out = tmp_path / "o"
    _kill_after(recipe, model, out, 1, "gptq")
    make_llama(model, seed=3)  # the same path, other weights
    with pytest.raises(CompressError, match="input checkpoint changed"):
        run_recipe(parse_recipe(recipe), model, out, resume=True)
    assert out.with_name("o.partial").is_dir() and not out.exists()
    run_recipe(parse_recipe(recipe), model, out)  # a rerun without --resume discards the partial run
    assert not out.with_name("o.partial").exists() and (out / "compression.json").is_file()
