"""Work store (compress/store.py): exact round trips, keys, checkpoint hashing and its memo,
corrupt entries recomputed with one warning, --no-cache, LRU bound, full disk, concurrency."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from compress.errors import CompressError
from compress.store import WorkStore, checkpoint_hash, fingerprint

ROOT = Path(__file__).resolve().parents[2]
KEY = fingerprint(statistic="gram", version=1, checkpoint="c" * 64, calibration="d" * 64)


def _store(tmp_path: Path, **kw) -> tuple[WorkStore, list[str]]:
    warnings: list[str] = []
    return WorkStore(tmp_path / "work", warn=warnings.append, **kw), warnings


def _group_file(store: WorkStore, key: str, name: str) -> Path:
    return store.root / key[:2] / key / f"{name}.safetensors"


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.bool else a[k], b[k]
                        .view(torch.uint8) if b[k].dtype == torch.bool else b[k]) for k in a)


def test_round_trip_is_bitwise_and_keeps_dtypes(tmp_path: Path) -> None:
    store, warnings = _store(tmp_path)
    g = torch.randn(33, 33, dtype=torch.float64)
    tensors = {"gram": g @ g.T, "loss": torch.randn(7), "perm": torch.randperm(50),
               "i8": torch.randint(-128, 127, (5, 3), dtype=torch.int8), "bf": torch.randn(4).bfloat16(),
               "mask": torch.rand(9) > 0.5, "scalar": torch.tensor(3.25, dtype=torch.float64),
               "empty": torch.empty(0, 4), "strided": torch.randn(6, 4).T}  # non-contiguous
    assert store.get(KEY, "block.0") is None and not store.has(KEY, "block.0")
    store.put(KEY, "block.0", tensors, parts={"statistic": "gram", "options": {"damp": 0.01}})
    back = store.get(KEY, "block.0")
    assert back is not None and _same(back, {k: v.contiguous() for k, v in tensors.items()})
    assert back["gram"].dtype == torch.float64 and back["gram"].device.type == "cpu"
    assert store.has(KEY, "block.0") and store.names(KEY) == ["block.0"]
    index = json.loads((store.root / KEY[:2] / KEY / "index.json").read_text())
    assert index["parts"]["options"] == {"damp": 0.01} and index["groups"]["block.0"]["sha256"]
    store.put(KEY, "block.1", {"x": torch.ones(2)})
    assert store.names(KEY) == ["block.0", "block.1"] and warnings == []
    store.drop(KEY)
    assert store.names(KEY) == [] and store.get(KEY, "block.0") is None and store.size_bytes() == 0


def test_fingerprint_is_canonical() -> None:
    a = fingerprint(statistic="gram", version=1, options={"damp": 0.01, "bits": 4, "nested": {"x": 1, "y": [1, 2]}})
    b = fingerprint(options={"nested": {"y": [1, 2], "x": 1}, "bits": 4, "damp": 0.01}, version=1, statistic="gram")
    assert a == b and len(a) == 64
    assert a != fingerprint(statistic="gram", version=2, options={"damp": 0.01, "bits": 4, "nested": {"x": 1, "y": [1, 2]}})
    assert fingerprint(bits=4) != fingerprint(bits=3) != fingerprint(bits="3")
    assert fingerprint(flag=True) != fingerprint(flag=1)
    assert fingerprint(path=Path("/a/b")) == fingerprint(path="/a/b")
    with pytest.raises(TypeError):
        fingerprint(gram=torch.zeros(2))
    with pytest.raises(ValueError):
        fingerprint(damp=float("nan"))


def _checkpoint(path: Path) -> Path:
    path.mkdir()
    save_file({"w": torch.arange(64, dtype=torch.float32)}, str(path / "model.safetensors"))
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "tokenizer.json").write_text("{}")  # not part of the hash
    return path


def test_checkpoint_hash_sees_every_byte_and_is_memoised(tmp_path: Path, monkeypatch) -> None:
    ckpt, memo = _checkpoint(tmp_path / "ckpt"), tmp_path / "work"
    opened: list[str] = []
    real_open = Path.open

    def counting_open(self: Path, *a, **kw):
        if self.parent == ckpt:
            opened.append(self.name)
        return real_open(self, *a, **kw)
    monkeypatch.setattr(Path, "open", counting_open)

    first = checkpoint_hash(ckpt, memo)
    assert sorted(opened) == ["config.json", "model.safetensors"]
    assert str(ckpt.resolve()) in json.loads((memo / "hashes.json").read_text())
    opened.clear()
    assert checkpoint_hash(ckpt, memo) == first and opened == []  # memo hit: nothing reread
    (ckpt / "tokenizer.json").write_text('{"changed": 1}')
    opened.clear()
    assert checkpoint_hash(ckpt, memo) == first and opened == []

    os.utime(ckpt / "config.json", ns=(1, 1))  # same bytes, new mtime → rehashed, same hash
    assert checkpoint_hash(ckpt, memo) == first and opened
    st = ckpt / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[-1] ^= 1  # one bit of one tensor byte
    st.write_bytes(bytes(data))
    changed = checkpoint_hash(ckpt, memo)
    assert changed != first
    assert checkpoint_hash(ckpt, memo, memo=False) == changed
    (ckpt / "model-extra.safetensors").write_bytes(b"")
    assert checkpoint_hash(ckpt, memo) != changed
    with pytest.raises(CompressError):
        checkpoint_hash(tmp_path / "work")


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-5])


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF
    p.write_bytes(bytes(data))


def _garbage_index(p: Path) -> None:
    (p.parent / "index.json").write_text("{not json")


@pytest.mark.parametrize("damage,reason", [
    (_truncate, "bytes, the index says"), (_flip, "sha256 mismatch"),
    (Path.unlink, "file missing"), (_garbage_index, "unreadable index.json")])
def test_corrupt_entry_warns_once_and_is_recomputed(tmp_path: Path, damage, reason: str) -> None:
    store, warnings = _store(tmp_path)
    good = {"h": torch.randn(16, 16, dtype=torch.float64)}
    store.put(KEY, "block.3", good)
    store.put(KEY, "block.4", {"h": torch.ones(3)})
    damage(_group_file(store, KEY, "block.3"))
    assert store.get(KEY, "block.3") is None
    assert len(warnings) == 1 and warnings[0].startswith(f"work store: {KEY[:12]}/block.3 is corrupt")
    assert reason in warnings[0] and warnings[0].endswith("; recomputing")
    assert store.get(KEY, "block.3") is None and len(warnings) == 1  # gone, not warned again
    assert not store.has(KEY, "block.3")
    other = store.get(KEY, "block.4")  # a bad index loses the entry; a bad group only itself
    assert (other is None) == (damage is _garbage_index) and len(warnings) == 1
    store.put(KEY, "block.3", good)
    back = store.get(KEY, "block.3")
    assert back is not None and _same(back, good) and len(warnings) == 1


def test_a_crashed_writer_leaves_nothing_that_is_trusted(tmp_path: Path) -> None:
    """Killed after the group rename but before the index rename: the new file does not match
    the old index (detected); killed while writing: its temp file is removed by the next put."""
    store, warnings = _store(tmp_path)
    store.put(KEY, "block.0", {"x": torch.zeros(8)})
    store.put(KEY, "block.2", {"x": torch.zeros(3)})
    entry = store.root / KEY[:2] / KEY
    save_file({"x": torch.ones(8)}, str(entry / "block.0.safetensors"))
    (entry / ".tmp-block.1.safetensors").write_bytes(b"half")
    assert store.get(KEY, "block.0") is None and len(warnings) == 1 and "is corrupt" in warnings[0]
    assert list(entry.glob(".tmp-*"))
    store.put(KEY, "block.1", {"x": torch.ones(2)})
    assert not list(entry.glob(".tmp-*")) and store.names(KEY) == ["block.1", "block.2"]


def test_disabled_store_never_writes(tmp_path: Path) -> None:
    store, warnings = _store(tmp_path, enabled=False)
    store.put(KEY, "block.0", {"x": torch.ones(3)})
    assert store.get(KEY, "block.0") is None and not store.has(KEY, "block.0")
    assert store.names(KEY) == [] and store.size_bytes() == 0
    store.checkpoint_hash(_checkpoint(tmp_path / "ckpt"))
    store.drop(KEY)
    assert not (tmp_path / "work").exists() and warnings == []


def test_default_root_and_bound_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COMPRESS_WORK_MAX_BYTES", "12345")
    store = WorkStore()
    assert store.root == tmp_path / "cache" / "work" and store.max_bytes == 12345
    monkeypatch.setenv("COMPRESS_WORK_MAX_BYTES", "20G")
    with pytest.raises(CompressError, match="COMPRESS_WORK_MAX_BYTES"):
        WorkStore()
    with pytest.raises(ValueError):
        store.get("../../etc", "x")
    with pytest.raises(ValueError):
        store.put(KEY, "../x", {})


def test_lru_eviction_keeps_the_recently_used_under_the_bound(tmp_path: Path) -> None:
    one = {"x": torch.zeros(1024, dtype=torch.float64)}  # ~8.1 KiB a group
    keys = [fingerprint(n=i) for i in range(4)]
    store, warnings = _store(tmp_path, max_bytes=3 * 9000)
    for k in keys[:3]:
        store.put(k, "g", one)
    assert store.get(keys[0], "g") is not None  # keys[0] is now more recent than keys[1]
    store.put(keys[3], "g", one)
    assert [store.has(k, "g") for k in keys] == [True, False, True, True]
    assert store.size_bytes() <= store.max_bytes and warnings == []

    store.put(keys[1], "big", {"x": torch.zeros(4096, dtype=torch.float64)})  # 32 KiB > bound
    store.put(keys[2], "big", {"x": torch.zeros(4096, dtype=torch.float64)})
    assert len(warnings) == 1 and "not stored" in warnings[0] and "over the bound" in warnings[0]
    assert not store.has(keys[1], "big") and store.has(keys[2], "g")
    assert store.size_bytes() <= store.max_bytes


DISK_FULL = """
import sys, torch
from pathlib import Path
from compress.errors import CompressError
from compress.store import WorkStore
store, failed = WorkStore(Path(sys.argv[1])), False
for key in sys.argv[2:]:  # the CLI's handling: one line per error, exit 2
    try:
        store.put(key, "big", {"x": torch.zeros(1 << 17, dtype=torch.float64)})  # 1 MiB
    except CompressError as e:
        print(e)
        failed = True
sys.exit(2 if failed else 0)
"""


def test_disk_full_is_one_line_and_leaves_the_store_as_it_was(tmp_path: Path) -> None:
    store, warnings = _store(tmp_path)
    small = {"x": torch.arange(4.0)}
    store.put(KEY, "small", small)
    fresh = fingerprint(n="fresh")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(["bash", "-c", 'ulimit -f 64; exec "$@"', "bash", sys.executable, "-c",
                          DISK_FULL, str(store.root), KEY, fresh],  # an existing and a new entry
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 2 and all(
        line.startswith(f"cannot write the work store at {store.root} (File too large)")
        and line.endswith("or pass --no-cache") for line in lines), res.stdout
    assert not [p for p in store.root.rglob("*") if p.name.startswith(".tmp")]
    assert store.names(KEY) == ["small"] and _same(store.get(KEY, "small"), small)
    assert not (store.root / fresh[:2] / fresh).exists() and warnings == []


def test_concurrent_puts_of_one_key_leave_a_valid_entry(tmp_path: Path) -> None:
    store, warnings = _store(tmp_path)
    values = {i: {"h": torch.full((64, 64), float(i), dtype=torch.float64)} for i in range(6)}
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            for round_ in range(3):
                WorkStore(store.root, warn=warnings.append).put(KEY, "shared", values[(i + round_) % 6])
                WorkStore(store.root, warn=warnings.append).put(KEY, f"own.{i}", values[i])
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and warnings == []
    assert store.names(KEY) == ["own.0", "own.1", "own.2", "own.3", "own.4", "own.5", "shared"]
    shared = store.get(KEY, "shared")
    assert shared is not None and any(_same(shared, v) for v in values.values())
    assert all(_same(store.get(KEY, f"own.{i}"), values[i]) for i in range(6)) and warnings == []
    assert not [p for p in store.root.rglob("*") if p.name.startswith(".tmp")]


def test_eviction_skips_an_entry_in_use_by_another_process(tmp_path: Path) -> None:
    from compress.store import _locked

    one = {"x": torch.zeros(1024, dtype=torch.float64)}
    keys = [fingerprint(n=i) for i in range(3)]
    store, warnings = _store(tmp_path, max_bytes=2 * 9000)
    store.put(keys[0], "g", one)
    store.put(keys[1], "g", one)
    with _locked(store.root / keys[0][:2] / f"{keys[0]}.lock"):  # held elsewhere: being read
        store.put(keys[2], "g", one)
    assert [store.has(k, "g") for k in keys] == [True, False, True] and warnings == []
