"""Checkpoint I/O: atomic sharded writes, lazy validated reads, refusal of bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from compress.checkpoint import CheckpointReader, CheckpointWriter, prepare_output
from compress.checkpoint.reader import read_header
from compress.errors import CompressError


def _write(out: Path, tensors: dict[str, torch.Tensor], shard_bytes: int = 1 << 30) -> Path:
    with CheckpointWriter(out, shard_bytes=shard_bytes, metadata={"tool": "test"}) as w:
        w.add_many(tensors)
        w.write_json("config.json", {"model_type": "llama"})
        w.commit()
    return out


def test_round_trip_single_and_sharded(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.randn(7, 13) * i for i in range(6)}
    tensors["ints"] = torch.arange(10, dtype=torch.int32)
    tensors["bf"] = torch.randn(3, 3).bfloat16()
    for name, shard in (("one", 1 << 30), ("many", 400)):
        out = _write(tmp_path / name, tensors, shard)
        r = CheckpointReader(out)
        assert set(r.keys()) == set(tensors)
        for k, v in tensors.items():
            assert torch.equal(r.get(k), v)
        assert (out / "model.safetensors.index.json").exists() == (name == "many")
        assert read_header(r.files()[0])["__metadata__"]["tool"] == "test"
    assert len(CheckpointReader(tmp_path / "many").files()) > 1


def test_exception_leaves_no_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), CheckpointWriter(out) as w:
        w.add("a", torch.ones(3))
        raise RuntimeError("boom")
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_keyboard_interrupt_leaves_no_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), CheckpointWriter(out) as w:
        w.add("a", torch.ones(3))
        raise KeyboardInterrupt
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_overwrite_replaces_atomically(tmp_path: Path) -> None:
    out = _write(tmp_path / "o", {"a": torch.ones(2)})
    with CheckpointWriter(out, overwrite=True) as w:
        w.add("b", torch.zeros(2))
        w.write_json("config.json", {})
        w.commit()
    assert CheckpointReader(out).keys() == ["b"]


def test_prepare_output_rules(tmp_path: Path) -> None:
    src = tmp_path / "model"
    src.mkdir()
    with pytest.raises(CompressError, match="inside"):
        prepare_output(src, [src], False)
    with pytest.raises(CompressError, match="inside"):
        prepare_output(src / "sub", [src], True)
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(CompressError, match="--overwrite"):
        prepare_output(existing, [src], False)
    assert prepare_output(existing, [src], True) == existing.resolve()
    with pytest.raises(CompressError, match="delete the input"):
        prepare_output(tmp_path, [src], True)


def _ckpt(tmp_path: Path) -> Path:
    d = tmp_path / "ck"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"w": torch.randn(64, 64)}, str(d / "model.safetensors"))
    return d


def test_truncated_file_is_a_clear_error(tmp_path: Path) -> None:
    d = _ckpt(tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CompressError, match="truncated"):
        CheckpointReader(d)


def test_corrupt_header(tmp_path: Path) -> None:
    d = _ckpt(tmp_path)
    (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CompressError, match="header"):
        CheckpointReader(d)


def test_pickle_only_checkpoint_is_refused_unread(tmp_path: Path) -> None:
    d = tmp_path / "pk"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(CompressError, match="pickle"):
        CheckpointReader(d)


@pytest.mark.parametrize("case", ["missing", "file", "noconfig", "noweights"])
def test_bad_directories(tmp_path: Path, case: str) -> None:
    p = tmp_path / "x"
    if case == "file":
        p.write_text("x")
    elif case in ("noconfig", "noweights"):
        p.mkdir()
        if case == "noweights":
            (p / "config.json").write_text("{}")
    with pytest.raises(CompressError):
        CheckpointReader(p)


def test_reads_do_not_keep_shards_mapped(tmp_path: Path) -> None:
    d = _ckpt(tmp_path)
    r = CheckpointReader(d)
    r.get("w")
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(d / "model.safetensors") not in maps.read_text()
