"""Resume commit files: streamed safetensors equal what safetensors reads back; a damaged or
foreign commit is refused in terms of what differs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compress.errors import CompressError
from compress.pipeline import resume as resume_io

IDENT = resume_io.Identity(input="a" * 64, recipe="b" * 64, stage=0, calibration="c", version="v")


def test_streamed_file_reads_back_with_safetensors(tmp_path: Path) -> None:
    h = torch.randn(5, 7, 11)
    tensors = {"hidden": h[..., :6], "rng": torch.get_rng_state(), "scalar": torch.tensor(3.5, dtype=torch.float64),
               "empty": torch.zeros(0, 3), "codes": torch.randint(-8, 8, (4, 9), dtype=torch.int32)}
    resume_io._save_streamed(tmp_path / "x.safetensors", tensors)
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert torch.equal(back[k], t.contiguous()), k


def test_commit_round_trip_keeps_only_the_latest_generation(tmp_path: Path) -> None:
    point = {"blocks_done": 1, "generation": 0}
    resume_io.save_point(tmp_path, IDENT, point, {"hidden": {"hidden": torch.ones(2, 3)}})
    loaded = resume_io.load_point(tmp_path, IDENT)
    assert loaded is not None and loaded["blocks_done"] == 1
    resume_io.save_point(tmp_path, IDENT, {**loaded, "blocks_done": 2}, {"hidden": {"hidden": torch.zeros(2, 3)}})
    loaded = resume_io.load_point(tmp_path, IDENT)
    assert loaded["blocks_done"] == 2
    assert torch.equal(resume_io.load_tensors(tmp_path, loaded, "hidden")["hidden"], torch.zeros(2, 3))
    assert [f.name for f in (tmp_path / "resume").iterdir()] == ["hidden-2.safetensors"]
    resume_io.clear(tmp_path)
    assert not (tmp_path / "resume").exists() and not (tmp_path / "resume.json").exists()


@pytest.mark.parametrize(("field", "message"), [("input", "input checkpoint changed"), ("recipe", "recipe differs"),
                                                ("calibration", "calibration differs"), ("version", "changed version")])
def test_a_foreign_commit_is_refused_naming_what_differs(tmp_path: Path, field: str, message: str) -> None:
    resume_io.save_point(tmp_path, IDENT, {"blocks_done": 1}, {})
    other = resume_io.Identity(**{**IDENT.to_dict(), field: "other"})
    with pytest.raises(CompressError, match=message):
        resume_io.load_point(tmp_path, other)


def test_a_damaged_commit_is_refused(tmp_path: Path) -> None:
    (tmp_path / "resume.json").write_text("{not json")
    with pytest.raises(CompressError, match="damaged"):
        resume_io.load_point(tmp_path, IDENT)
    assert resume_io.load_point(tmp_path / "absent", IDENT) is None
