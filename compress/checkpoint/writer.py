"""Sharded, atomic checkpoint writes with bounded memory.

Tensors are appended to a raw data file as soon as they are produced (one layer at a time),
so memory never holds more than the tensor being written. When a shard reaches its size
budget, its safetensors header is written and the data streamed behind it. Everything goes
into ``OUT.partial/``; only :meth:`CheckpointWriter.commit` renames it to ``OUT``. Any
exception (or Ctrl-C) inside the ``with`` block deletes the partial directory.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from types import TracebackType

import torch

from compress.errors import CompressError

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
DEFAULT_SHARD_BYTES = 2 * 1024**3


def prepare_output(out: str | Path, inputs: list[Path], overwrite: bool, force: bool = False) -> Path:
    """Validate an output path before any work starts: never into an input, never clobber, and
    never replace a directory that is not a compress output unless ``force``; the place it will
    be written must be writable (checked now, not after the compression)."""
    out = Path(out).resolve()
    overwrite = overwrite or force
    for src in inputs:
        src = Path(src).resolve()
        if out == src or src in out.parents:
            raise CompressError(f"output {out} is the input or inside it ({src})",
                                "choose an output directory outside the input checkpoint")
        if overwrite and out in src.parents:
            raise CompressError(f"--overwrite would delete the input {src} (it is inside {out})",
                                "choose another output directory")
    if out.exists() and not out.is_dir():
        raise CompressError(f"output {out} exists and is not a directory", "choose another path")
    if out.exists() and not overwrite:
        raise CompressError(f"output {out} already exists", "pass --overwrite or choose another path")
    if out.exists() and not force and not (out / "compression.json").is_file() and any(out.iterdir()):
        raise CompressError(f"output {out} is not a compress output (no compression.json); "
                            "--overwrite would delete everything in it",
                            "choose another path, or pass --force to replace it anyway")
    ensure_writable(out.parent, "the output")
    return out


def ensure_writable(directory: Path, what: str) -> None:
    """Fail now, in one line, if files cannot be created in ``directory`` (or, when it does not
    exist yet, in its nearest existing ancestor): read-only mounts, permissions, full disks."""
    probe_dir = Path(directory).resolve()
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise CompressError(f"cannot write {what}: {probe_dir} is not a directory", "choose another path")
    try:
        fd, name = tempfile.mkstemp(prefix=".compress-probe-", dir=probe_dir)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise CompressError(f"cannot write {what} into {probe_dir} ({e.strerror or type(e).__name__})",
                            "choose a writable location") from None


class _Shard:
    """One shard being written: a raw data file plus the header entries for it."""

    def __init__(self, path: Path, entries: dict[str, dict] | None = None, nbytes: int = 0) -> None:
        self.path = path
        self.data_path = path.with_suffix(".data")
        if entries is None:
            self.fh = self.data_path.open("wb")
        else:  # reopened for --resume: drop whatever was appended after the snapshot
            self.fh = self.data_path.open("r+b")
            self.fh.truncate(nbytes)
            self.fh.seek(nbytes)
        self.entries: dict[str, dict] = dict(entries or {})
        self.nbytes = nbytes

    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        self.entries[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self.nbytes, self.nbytes + len(raw)]}
        self.fh.write(raw)
        self.nbytes += len(raw)

    def finish(self, metadata: dict[str, str]) -> None:
        self.fh.close()
        header = dict(self.entries)
        header["__metadata__"] = metadata
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # pad so the data starts 8-byte aligned
        with self.path.open("wb") as out, self.data_path.open("rb") as data:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            shutil.copyfileobj(data, out, 1 << 24)
            out.flush()
            os.fsync(out.fileno())
        self.data_path.unlink()


class CheckpointWriter:
    """Write a checkpoint directory atomically.

    Args:
        out: final output directory (validated with :func:`prepare_output` first).
        overwrite: replace an existing ``out`` at commit time.
        shard_bytes: size budget of one safetensors shard.
        metadata: str→str entries stored in every shard header (provenance).
    """

    def __init__(self, out: str | Path, overwrite: bool = False,
                 shard_bytes: int = DEFAULT_SHARD_BYTES,
                 metadata: dict[str, str] | None = None, keep_partial: bool = False) -> None:
        self.out = Path(out)
        self.overwrite = overwrite
        self.shard_bytes = shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self.partial = self.out.with_name(self.out.name + ".partial")
        self._shards: list[_Shard] = []
        self._names: set[str] = set()
        self._committed = False
        #: an existing ``OUT.partial`` is kept (for :meth:`restore`) instead of deleted
        self.keep_partial = keep_partial

    def __enter__(self) -> CheckpointWriter:
        if self.partial.exists() and not self.keep_partial:
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self._committed:
            self.abort()

    # -- tensors ----------------------------------------------------------------------
    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor to the current shard (opening a new shard when it is full)."""
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        self._names.add(name)
        if not self._shards or self._shards[-1].nbytes >= self.shard_bytes:
            self._shards.append(_Shard(self.partial / f"shard-{len(self._shards):05d}.safetensors"))
        self._shards[-1].add(name, tensor)

    def add_many(self, tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
        for k, v in tensors.items():
            self.add(prefix + k, v)

    def names(self) -> set[str]:
        return set(self._names)

    # -- resume ---------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """Flush every shard and describe the written state (JSON) for :meth:`restore`: the
        shards' data lengths and header entries. Data are flushed to the OS, not fsynced: a
        killed process loses nothing; a power cut is caught by the size check of ``restore``."""
        for s in self._shards:
            s.fh.flush()
        return {"shards": [{"file": s.path.name, "bytes": s.nbytes, "entries": s.entries}
                           for s in self._shards]}

    def restore(self, snap: dict) -> None:
        """Continue from :meth:`snapshot`'s state in the kept ``OUT.partial``; raises
        CompressError when a shard's data is shorter than the snapshot says."""
        for s in snap["shards"]:
            path = self.partial / s["file"]
            data = path.with_suffix(".data")
            if not data.is_file() or data.stat().st_size < s["bytes"]:
                raise CompressError(f"the partial run in {self.partial} is damaged ({data.name} is short)",
                                    "run again without --resume")
            shard = _Shard(path, s["entries"], s["bytes"])
            self._shards.append(shard)
            self._names.update(shard.entries)

    # -- side files ---------------------------------------------------------------------
    def write_json(self, name: str, obj: object) -> None:
        (self.partial / name).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")

    def write_text(self, name: str, text: str) -> None:
        (self.partial / name).write_text(text)

    def copy_file(self, src: Path, name: str | None = None) -> None:
        shutil.copyfile(src, self.partial / (name or src.name))

    @property
    def directory(self) -> Path:
        """Where side files go before commit (``OUT.partial``)."""
        return self.partial

    # -- finish -----------------------------------------------------------------------
    def commit(self) -> Path:
        """Finish every shard, write the index, fsync and rename ``OUT.partial`` → ``OUT``."""
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(self._shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            shard.finish(self.metadata)
            shard.path.rename(self.partial / final)
            weight_map.update({k: final for k in shard.entries})
        if n > 1:
            total = sum(s.nbytes for s in self._shards)
            self.write_json("model.safetensors.index.json",
                            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
        fsync_dir(self.partial)
        if self.out.exists():
            if not self.overwrite:
                raise CompressError(f"output {self.out} appeared while running", "pass --overwrite")
            trash = self.out.with_name(self.out.name + ".old")
            if trash.exists():
                shutil.rmtree(trash)
            self.out.rename(trash)
            self.partial.rename(self.out)
            shutil.rmtree(trash)
        else:
            self.partial.rename(self.out)
        fsync_dir(self.out.parent)
        self._committed = True
        return self.out

    def abort(self) -> None:
        for s in self._shards:
            if not s.fh.closed:
                s.fh.close()
        if self.partial.exists():
            shutil.rmtree(self.partial, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    """Make a rename or new file inside ``path`` durable (fsync of the directory itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
