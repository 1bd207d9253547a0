"""Lazy, validated reads of a Hugging Face style checkpoint directory.

Only safetensors are ever opened. A directory that holds nothing but pickle files
(``pytorch_model.bin``, ``*.pt``) is refused before any byte of them is read.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from compress.errors import CompressError

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                   "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8,
                   "F8_E4M3": 1, "F8_E5M2": 1}


def read_header(path: Path) -> dict:
    """Parse and validate a safetensors header; a truncated or corrupt file is a user error."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CompressError(f"{path} is not a safetensors file (only {size} bytes)",
                                "re-export or re-download the checkpoint")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100_000_000):
            raise CompressError(f"{path} has a corrupt safetensors header",
                                "re-export or re-download the checkpoint")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CompressError(f"{path} has a corrupt safetensors header",
                                "re-export or re-download the checkpoint") from None
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, stop = info["data_offsets"]
        expect = _ST_DTYPE_BYTES.get(info["dtype"], 1) * _numel(info["shape"])
        if stop - start != expect:
            raise CompressError(f"{path}: tensor {name} has inconsistent size",
                                "re-export the checkpoint")
        end = max(end, stop)
    if 8 + n + end > size:
        raise CompressError(
            f"{path} is truncated ({size} bytes, header promises {8 + n + end})",
            "re-download or re-export the checkpoint")
    return header


def _numel(shape: list[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


class CheckpointReader:
    """Read tensors one at a time from ``model.safetensors`` or a sharded index.

    Args:
        path: a checkpoint directory with ``config.json`` and safetensors weights.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._check_dir()
        self.config: dict = self._read_json("config.json")
        self._shard_of: dict[str, Path] = self._index()
        self._headers = {p: read_header(p) for p in sorted(set(self._shard_of.values()))}

    # -- validation -------------------------------------------------------------------
    def _check_dir(self) -> None:
        if not self.path.exists():
            raise CompressError(f"model path {self.path} does not exist",
                                "pass a checkpoint directory (config.json + *.safetensors)")
        if not self.path.is_dir():
            raise CompressError(f"model path {self.path} is not a directory",
                                "pass the directory that holds config.json")
        if not (self.path / "config.json").is_file():
            raise CompressError(f"{self.path} has no config.json",
                                "pass a Hugging Face checkpoint directory")

    def _read_json(self, name: str) -> dict:
        try:
            return json.loads((self.path / name).read_text())
        except json.JSONDecodeError as e:
            raise CompressError(f"{self.path / name} is not valid JSON ({e.msg})",
                                "fix or re-export the file") from None

    def _index(self) -> dict[str, Path]:
        index = self.path / INDEX_NAME
        if index.is_file():
            weight_map = self._read_json(INDEX_NAME).get("weight_map", {})
            missing = {f for f in weight_map.values() if not (self.path / f).is_file()}
            if missing:
                raise CompressError(f"{self.path}: shards listed in {INDEX_NAME} are missing: "
                                    f"{sorted(missing)[:3]}", "copy the complete checkpoint")
            return {k: self.path / f for k, f in weight_map.items()}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise CompressError(
                    f"{self.path} holds only pickle weights ({pickles[0]}); pickles are never loaded",
                    "convert it to safetensors first (e.g. save_pretrained(safe_serialization=True))")
            raise CompressError(f"{self.path} has no *.safetensors weights",
                                "pass a checkpoint directory with safetensors weights")
        out: dict[str, Path] = {}
        for f in files:
            for k in read_header(f):
                if k != "__metadata__":
                    out[k] = f
        return out

    # -- access -----------------------------------------------------------------------
    def keys(self) -> list[str]:
        """All tensor names, in a stable order."""
        return sorted(self._shard_of)

    def __contains__(self, name: str) -> bool:
        return name in self._shard_of

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)["shape"])

    def _info(self, name: str) -> dict:
        return self._headers[self._shard_of[name]][name]

    def nbytes(self, name: str) -> int:
        """Stored bytes of one tensor (from the header; nothing is read)."""
        info = self._info(name)
        return _ST_DTYPE_BYTES.get(info["dtype"], 1) * _numel(info["shape"])

    def numel(self, name: str) -> int:
        return _numel(self._info(name)["shape"])

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (a fresh CPU tensor; nothing else is read)."""
        return self.get_many([name])[name]

    def get_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Load several tensors, opening each shard once.

        Shards are memory-mapped only while they are read: a handle kept open would leave every
        page read so far resident, so memory would grow with the depth of the model.
        """
        by_shard: dict[Path, list[str]] = {}
        for name in names:
            if name not in self._shard_of:
                raise CompressError(f"{self.path} has no tensor {name!r}",
                                    "the checkpoint does not match its config.json")
            by_shard.setdefault(self._shard_of[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for shard, keys in by_shard.items():
            with safe_open(str(shard), framework="pt", device="cpu") as fh:
                for k in keys:
                    out[k] = fh.get_tensor(k)
        return out

    def with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with ``prefix``, keyed by the name minus the prefix."""
        keys = [k for k in self.keys() if k.startswith(prefix)]
        return {k[len(prefix):]: v for k, v in self.get_many(keys).items()}

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for k in self.keys():
            yield k, self.get(k)

    def files(self) -> list[Path]:
        return sorted(self._headers)

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files())

    def content_hash(self) -> str:
        """sha256 over the weight files (names and bytes), for provenance."""
        h = hashlib.sha256()
        for p in self.files():
            h.update(p.name.encode())
            with p.open("rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
        return h.hexdigest()

    def manifest(self) -> dict | None:
        """The ``compression.json`` of a compress output, or None for a plain checkpoint."""
        p = self.path / "compression.json"
        return self._read_json("compression.json") if p.is_file() else None

