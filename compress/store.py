"""The work store: statistics computed once per (model, calibration, options) and reused.

A scan's per-block statistics (float64 Gram/Hessian matrices, per-column losses, spectra) depend
only on the dense checkpoint, the calibration windows and a few options, so later runs on the same
model and data read them back instead of recomputing (``compress.pipeline.stats`` keeps one
entry per statistic, input and calibration, one group per block).

Layout under ``root`` (default ``$COMPRESS_CACHE/work``)::

    hashes.json                  memo of checkpoint_hash (path + size/mtime/inode of each file)
    ab/<key>/index.json          format, parts, created/last_used, per group: file, bytes, sha256
    ab/<key>/<name>.safetensors  one file per named group of tensors
    ab/<key>.lock                flock held around every read-verify or update of the entry

``key`` is :func:`fingerprint` of everything the statistic depends on. Every group is verified
(size, sha256, parse) before use; a corrupt one is reported with one warning line, deleted, and
recomputed by the caller. Writes are atomic (temp file + fsync + rename, the index last), so a
crash or a full disk leaves the previous state. Groups are written by a streaming writer in the
safetensors format (never pickle): ``safetensors.torch.save_file`` first copies every tensor into
bytes and reports a full disk as ``SafetensorError`` rather than ``OSError``. The store is kept
under ``max_bytes`` by evicting whole entries, least recently used first; a group that cannot fit
even alone is not stored (a warning says so) rather than overrunning the user's bound.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from compress.checkpoint.writer import fsync_dir
from compress.errors import CompressError
from compress.units import human_bytes

FORMAT_VERSION = 1
DEFAULT_MAX_BYTES = 20 * 1024**3
MAX_BYTES_ENV = "COMPRESS_WORK_MAX_BYTES"
_CHUNK = 1 << 23
_KEY = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint64: "U64",
    torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8", torch.bool: "BOOL",
}
Tensors = dict[str, torch.Tensor]


class _Corrupt(Exception):
    """An entry or group that failed verification; the message is the reason."""


# -- keys --------------------------------------------------------------------------------------
def fingerprint(**parts: object) -> str:
    """sha256 of the canonical JSON (sorted keys, no NaN) of ``parts``: the store key.

    Parts are plain JSON values (Paths and pydantic models are converted); tensors are not
    parts: hash them into a part first (as ``calib.protocol.fingerprint`` does for windows)."""
    def plain(obj: object) -> object:
        if isinstance(obj, Path):
            return str(obj)
        if hasattr(obj, "model_dump"):
            return obj.model_dump(mode="json")  # type: ignore[no-any-return]
        raise TypeError(f"fingerprint part of type {type(obj).__name__} is not JSON")
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), allow_nan=False, default=plain)
    return hashlib.sha256(text.encode()).hexdigest()


def checkpoint_hash(path: Path, root: Path | None = None, *, memo: bool = True) -> str:
    """sha256 over the names and bytes of a checkpoint's ``*.safetensors`` and ``config.json``.

    Files are streamed in sorted order (bounded memory). With ``memo`` the result is memoised in
    ``root/hashes.json`` (default root: the default store root) under the resolved path and each
    file's size, mtime_ns and inode, so an unchanged checkpoint is not reread; any change rehashes.
    """
    path = Path(path).resolve()
    files = sorted([*path.glob("*.safetensors"), *path.glob("config.json")])
    if not files:
        raise CompressError(f"{path} holds no config.json or *.safetensors to hash",
                            "pass a checkpoint directory")
    if not memo:
        return _hash_files(files)
    stats = [[f.name, s.st_size, s.st_mtime_ns, s.st_ino] for f in files for s in [f.stat()]]
    memo_root = _default_root() if root is None else Path(root)
    hit = _read_json(memo_root / "hashes.json").get(str(path))
    if isinstance(hit, dict) and hit.get("files") == stats and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    digest = _hash_files(files)
    with contextlib.suppress(OSError):  # the memo is an optimisation: never fail a run for it
        memo_root.mkdir(parents=True, exist_ok=True)
        with _locked(memo_root / "hashes.lock"):
            known = _read_json(memo_root / "hashes.json")
            known = {p: v for p, v in known.items() if Path(p).is_dir()}  # forget deleted ones
            known[str(path)] = {"files": stats, "sha256": digest}
            _write_json_atomic(memo_root / "hashes.json", known)
    return digest


def _hash_files(files: list[Path]) -> str:
    """sha256 of each file's name, size and bytes in turn (streamed)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.stat().st_size.to_bytes(8, "little"))
        _stream_into(h, f)
    return h.hexdigest()


def _stream_into(h: hashlib._Hash, path: Path) -> None:
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)


# -- the store ---------------------------------------------------------------------------------
class WorkStore:
    """Disk-backed named tensor groups keyed by a :func:`fingerprint`.

    Args:
        root: store directory; default ``compress.assets.cache_dir() / "work"``.
        max_bytes: size bound; default ``$COMPRESS_WORK_MAX_BYTES``, else 20 GiB.
        enabled: False (``--no-cache``): ``get`` always misses, nothing is ever written.
        warn: receives one-line warnings (corrupt entries, skipped groups); default stderr.
    """

    def __init__(self, root: Path | None = None, *, max_bytes: int | None = None,
                 enabled: bool = True, warn: Callable[[str], None] | None = None) -> None:
        self.enabled = enabled
        self.root = Path(root) if root is not None else (_default_root() if enabled else None)
        self.max_bytes = _env_max_bytes() if max_bytes is None else max_bytes
        self.warn = warn or (lambda msg: print(msg, file=sys.stderr))
        self._warned_bound = False

    def checkpoint_hash(self, path: Path) -> str:
        """:func:`checkpoint_hash`, memoised in this store (not memoised when disabled)."""
        return checkpoint_hash(path, self.root, memo=self.enabled and self.root is not None)

    # -- reading ---------------------------------------------------------------------------
    def get(self, key: str, name: str) -> Tensors | None:
        """Group ``name`` of entry ``key`` on CPU, verified; None when missing or corrupt."""
        entry = self._entry(key, name)
        if entry is None or not (entry / "index.json").is_file():
            return None
        try:
            with _locked(self._lock(key)):
                return self._get_locked(entry, key, name)
        except OSError as e:  # e.g. a read-only cache: recompute rather than fail the run
            self.warn(f"work store: cannot read {key[:12]}/{name} ({e.strerror or e}); recomputing")
            return None

    def _get_locked(self, entry: Path, key: str, name: str) -> Tensors | None:
        try:
            index = _read_index(entry)
        except FileNotFoundError:  # removed while we waited: drop the lock file we recreated
            self._lock(key).unlink(missing_ok=True)
            return None
        except _Corrupt as e:
            self._corrupt(key, name, str(e))
            self._remove(key)
            return None
        group = index["groups"].get(name)
        if group is None:
            return None
        try:
            tensors = _load_group(entry, group)
        except _Corrupt as e:
            self._corrupt(key, name, str(e))
            self._forget_group(key, index, name)
            return None
        index["last_used"] = time.time()
        with contextlib.suppress(OSError):  # last-used only orders eviction
            _write_json_atomic(entry / "index.json", index)
        return tensors

    def has(self, key: str, name: str) -> bool:
        """Whether the index lists group ``name`` with a file of the listed size (not hashed; a
        listed group whose file is missing or of another size is reported corrupt, as ``get``
        would, so the caller recomputes it)."""
        entry = self._entry(key, name)
        group = self._index_or_empty(entry)["groups"].get(name) if entry else None
        if group is None:
            return False
        try:
            size = (entry / group["file"]).stat().st_size  # type: ignore[operator]
        except OSError:
            size = None
        if size == group["bytes"]:
            return True
        self._corrupt(key, name, "file missing" if size is None else f"{size} bytes, expected {group['bytes']}")
        return False

    def names(self, key: str) -> list[str]:
        """Group names the index of ``key`` lists (sorted; [] when missing or unreadable)."""
        return sorted(self._index_or_empty(self._entry(key))["groups"])

    def size_bytes(self) -> int:
        """Bytes of every file under the store root."""
        if self.root is None or not self.root.is_dir():
            return 0
        return _tree_bytes(self.root)

    # -- writing ---------------------------------------------------------------------------
    def put(self, key: str, name: str, tensors: Mapping[str, torch.Tensor],
            parts: dict | None = None) -> None:
        """Store group ``name`` of entry ``key`` atomically, then evict down to ``max_bytes``.

        ``parts`` (what the key was made of) is recorded when the entry is created, for humans.
        A full disk or file-size limit raises a one-line :class:`CompressError`, leaving the
        store as it was."""
        entry = self._entry(key, name)
        if entry is None:
            return
        flat = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
        header = safetensors_header(flat)
        nbytes = len(header) + sum(t.numel() * t.element_size() for t in flat.values())
        try:
            with _locked(self._lock(key)):
                index = self._index_for_put(entry, key, parts)
                others = sum(g["bytes"] for n, g in index["groups"].items() if n != name)
                if nbytes + others > self.max_bytes:
                    self._warn_bound(key, name, nbytes + others)
                    if not index["groups"]:
                        self._remove(key)  # no entry was there: leave no lock file behind
                    return
                self._write_group(entry, key, name, flat, header, index)
            self._evict(keep=key)
        except OSError as e:
            raise CompressError(f"cannot write the work store at {self.root} "
                                f"({e.strerror or type(e).__name__})",
                                f"free space, set ${MAX_BYTES_ENV} lower, or pass --no-cache") from None

    def drop(self, key: str) -> None:
        """Delete entry ``key`` (nothing when it does not exist)."""
        entry = self._entry(key)
        if entry is not None and entry.exists():
            with _locked(self._lock(key)):
                self._remove(key)

    # -- internals -------------------------------------------------------------------------
    def _entry(self, key: str, name: str | None = None) -> Path | None:
        """Entry directory of ``key`` (None when disabled); validates key and name (no paths)."""
        if not _KEY.fullmatch(key):
            raise ValueError(f"work store key must be a sha256 hex digest, got {key!r}")
        if name is not None and not _NAME.fullmatch(name):
            raise ValueError(f"work store group name {name!r} must match {_NAME.pattern}")
        if not self.enabled or self.root is None:
            return None
        return self.root / key[:2] / key

    def _lock(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.lock"

    def _warn_bound(self, key: str, name: str, nbytes: int) -> None:
        """Once per store: a group that cannot fit even alone is skipped (it is recomputed)."""
        if not self._warned_bound:
            self._warned_bound = True
            self.warn(f"work store: {key[:12]}/{name} not stored: its entry would be "
                      f"{human_bytes(nbytes)}, over the bound of {human_bytes(self.max_bytes)} "
                      f"(${MAX_BYTES_ENV}); such groups are recomputed, not cached")

    def _corrupt(self, key: str, name: str, reason: str) -> None:
        self.warn(f"work store: {key[:12]}/{name} is corrupt ({reason}); recomputing")

    def _remove(self, key: str) -> None:
        """Delete the entry and its lock file (caller holds the lock; waiters retry on a new one)."""
        entry = self._entry(key)
        assert entry is not None
        shutil.rmtree(entry, ignore_errors=True)
        self._lock(key).unlink(missing_ok=True)

    def _forget_group(self, key: str, index: dict, name: str) -> None:
        """Drop a corrupt group from its entry (the whole entry when that fails or empties it)."""
        entry = self._entry(key)
        assert entry is not None
        del index["groups"][name]
        if index["groups"]:
            try:
                _write_json_atomic(entry / "index.json", index)
                (entry / f"{name}.safetensors").unlink(missing_ok=True)
                return
            except OSError:
                pass
        self._remove(key)

    def _index_or_empty(self, entry: Path | None) -> dict:
        try:
            return _read_index(entry) if entry is not None else {"groups": {}}
        except (OSError, _Corrupt):
            return {"groups": {}}

    def _index_for_put(self, entry: Path, key: str, parts: dict | None) -> dict:
        """The entry's index to extend; a new one (and a cleared directory) when it has none
        or it is unreadable. Temp files left by a crashed writer are removed (we hold the lock)."""
        try:
            index = _read_index(entry)
        except (FileNotFoundError, _Corrupt):
            shutil.rmtree(entry, ignore_errors=True)
            now = time.time()
            return {"format": FORMAT_VERSION, "key": key, "parts": json.loads(json.dumps(
                parts or {}, default=str)), "created": now, "last_used": now, "groups": {}}
        for tmp in entry.glob(".tmp-*"):
            tmp.unlink(missing_ok=True)
        return index

    def _write_group(self, entry: Path, key: str, name: str, tensors: Tensors, header: bytes,
                     index: dict) -> None:
        """Both temp files (group, index) are complete and fsynced before either is renamed."""
        tmp_group, tmp_index = entry / f".tmp-{name}.safetensors", entry / ".tmp-index.json"
        try:
            entry.mkdir(parents=True, exist_ok=True)
            size, digest = _write_safetensors(tmp_group, header, tensors)
            now = time.time()
            index["groups"][name] = {"file": f"{name}.safetensors", "bytes": size,
                                     "sha256": digest, "created": now}
            index["last_used"] = now
            _write_json(tmp_index, index)
            os.replace(tmp_group, entry / f"{name}.safetensors")
            os.replace(tmp_index, entry / "index.json")
            fsync_dir(entry)
        except BaseException:
            tmp_group.unlink(missing_ok=True)
            tmp_index.unlink(missing_ok=True)
            if not (entry / "index.json").exists():
                self._remove(key)
            raise

    def _evict(self, keep: str) -> None:
        """Delete whole entries, least recently used first, until the store fits ``max_bytes``;
        never ``keep`` (just written) nor an entry another process holds locked (in use)."""
        total = self.size_bytes()
        if total <= self.max_bytes:
            return
        for _used, key, nbytes in sorted(self._entries()):
            if total <= self.max_bytes:
                break
            if key == keep:
                continue
            with _locked(self._lock(key), blocking=False) as got:
                if got:
                    self._remove(key)
                    total -= nbytes

    def _entries(self) -> Iterator[tuple[float, str, int]]:
        """(last_used, key, bytes) of every entry; an unreadable index counts as oldest."""
        assert self.root is not None
        for entry in self.root.glob("??/*"):
            if entry.is_dir() and _KEY.fullmatch(entry.name):
                used = self._index_or_empty(entry).get("last_used", 0.0)
                yield (used if isinstance(used, (int, float)) else 0.0), entry.name, _tree_bytes(entry)


# -- files -------------------------------------------------------------------------------------
def _default_root() -> Path:
    from compress.assets import cache_dir

    return cache_dir() / "work"


def _env_max_bytes() -> int:
    raw = os.environ.get(MAX_BYTES_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_MAX_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise CompressError(f"${MAX_BYTES_ENV}={raw} is not a byte count",
                            f"set it to a whole number of bytes, e.g. {DEFAULT_MAX_BYTES}")
    return value


def safetensors_header(tensors: Tensors) -> bytes:
    """The safetensors prefix (u64 length + JSON header padded to 8 bytes) for ``tensors``."""
    meta: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for k, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"work store cannot hold tensor {k} of dtype {t.dtype}")
        n = t.numel() * t.element_size()
        meta[k] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(meta, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def _write_safetensors(path: Path, header: bytes, tensors: Tensors) -> tuple[int, str]:
    """Stream header + raw tensor bytes (zero-copy views) to ``path``, fsync; (bytes, sha256)."""
    h, size = hashlib.sha256(), 0
    with path.open("wb") as fh:
        for buf in (header, *(t.reshape(-1).view(torch.uint8).numpy() for t in tensors.values())):
            fh.write(buf)
            h.update(buf)
            size += len(buf)
        fh.flush()
        os.fsync(fh.fileno())
    return size, h.hexdigest()


def _read_index(entry: Path) -> dict:
    """The entry's index, checked for shape; FileNotFoundError when absent, _Corrupt when bad."""
    try:
        index = json.loads((entry / "index.json").read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise _Corrupt(f"unreadable index.json: {type(e).__name__}") from None
    groups = index.get("groups") if isinstance(index, dict) else None
    if not isinstance(groups, dict) or index.get("format") != FORMAT_VERSION:
        raise _Corrupt(f"index.json is not a format-{FORMAT_VERSION} index")
    for name, g in groups.items():
        if not (isinstance(g, dict) and g.get("file") == f"{name}.safetensors"
                and isinstance(g.get("bytes"), int) and isinstance(g.get("sha256"), str)):
            raise _Corrupt(f"index.json has a malformed group {name!r}")
    return index


def _load_group(entry: Path, group: dict) -> Tensors:
    """Tensors of one group after checking size and sha256; _Corrupt says what is wrong."""
    path = entry / group["file"]
    try:
        size = path.stat().st_size
        if size != group["bytes"]:
            raise _Corrupt(f"{size} bytes, the index says {group['bytes']}")
        h = hashlib.sha256()
        _stream_into(h, path)
        if h.hexdigest() != group["sha256"]:
            raise _Corrupt("sha256 mismatch")
        return load_file(path, device="cpu")
    except FileNotFoundError:
        raise _Corrupt("file missing") from None
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:
        raise _Corrupt(f"unreadable: {e}") from None


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _write_json(path: Path, obj: object) -> None:
    with path.open("w") as fh:
        fh.write(json.dumps(obj, indent=1, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _write_json_atomic(path: Path, obj: object) -> None:
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    try:
        _write_json(tmp, obj)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _tree_bytes(path: Path) -> int:
    total = 0
    for f in path.rglob("*"):
        with contextlib.suppress(OSError):
            if f.is_file():
                total += f.stat().st_size
    return total


@contextlib.contextmanager
def _locked(path: Path, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path``; yields False only when not ``blocking`` and another
    holder has it. Retries when the lock file was deleted (entry removed) while we waited."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                yield True
                return
        finally:
            os.close(fd)
