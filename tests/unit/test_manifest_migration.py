"""Manifests written by an earlier release still load: the checkpoints in
``tests/fixtures/manifest-v2`` were written by compress at 111c395 (format 2), together with the
logits that release's own loader gave; today's loader migrates them (v2 → v3) and must give the
same logits. A manifest from a future release is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import compress
from compress.checkpoint import CheckpointReader
from compress.errors import CompressError
from compress.model import reader_manifest
from compress.provenance import FORMAT_VERSION
from tests.conftest import run_cli

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "manifest-v2"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "compression.json").is_file())


def test_the_fixtures_are_format_2() -> None:
    assert len(CASES) == 4 and FORMAT_VERSION == 3
    for case in CASES:
        assert json.loads((FIXTURES / case / "compression.json").read_text())["format_version"] == 2


@pytest.mark.parametrize("case", CASES)
def test_a_format_2_checkpoint_loads_to_the_logits_its_release_gave(case: str) -> None:
    d = FIXTURES / case
    m = reader_manifest(CheckpointReader(d))
    assert m["format_version"] == 3 and m["shared"] == {}
    expected = load_file(str(d / "expected-logits.safetensors"))
    with torch.no_grad():
        got = compress.load(d)(expected["input_ids"]).logits.float()
    assert torch.allclose(got, expected["logits"], atol=1e-5, rtol=1e-5), (got - expected["logits"]).abs().max()


def test_a_format_2_checkpoint_is_input_to_a_new_stage(tmp_path: Path) -> None:
    from compress.recipe import parse_recipe
    from compress.runner import run_recipe

    out = run_recipe(parse_recipe({"stages": [{"pass": "rtn", "config": {"bits": 8}}]}),
                     FIXTURES / "lowrank-r0.6", tmp_path / "o")
    m = json.loads((out / "compression.json").read_text())
    assert m["format_version"] == 3 and {e["kind"] for e in m["modules"].values()} == {"lowrank"}
    assert [h["pass"] for h in m["history"]] == ["lowrank", "rtn"]


def test_a_manifest_from_a_future_release_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    d = shutil.copytree(FIXTURES / "rtn-w4g32", tmp_path / "future")
    m = json.loads((d / "compression.json").read_text())
    (d / "compression.json").write_text(json.dumps(dict(m, format_version=FORMAT_VERSION + 1)))
    with pytest.raises(CompressError, match=f"format version {FORMAT_VERSION + 1}; this compress reads versions 1..3"):
        compress.load(d)
    code, _, err = run_cli(["inspect", str(d)], monkeypatch, capsys)
    assert code == 2 and "upgrade compress" in err and "Traceback" not in err
