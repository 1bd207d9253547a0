"""Resume after a crash: after every block the stage's state is committed into ``OUT.partial``.

What is committed (``OUT.partial/resume.json`` plus ``OUT.partial/resume/*.safetensors``): the
identity of the run (recipe, stage, input checkpoint hash, calibration fingerprint, compress and
torch versions), the number of blocks done, the output writer's shard lengths and headers, the
manifest entries, report records and notes so far, the pass's carried state
(:meth:`Pass.carry_state`), the torch RNG state, and the calibration activations entering the
next block. ``resume.json`` is replaced atomically last, so a process killed at any instant
(kill -9 included) leaves the previous block's commit intact. ``--resume`` continues from it
and produces the tensors an uninterrupted run would; a resume whose identity differs is refused
with one line naming what differs. Nothing is fsynced (a power cut is not covered; a damaged
partial run is detected by sizes and refused).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from compress.errors import CompressError
from compress.store import safetensors_header

FORMAT = 1
STATE_FILE = "resume.json"
STATE_DIR = "resume"


@dataclass(frozen=True)
class Identity:
    """What must match for a partial run to be continued (each field is compared by name)."""

    input: str
    recipe: str
    stage: int
    calibration: str | None
    version: str
    #: the compute device type (``cpu``/``cuda``): another device's numbers differ in the last bits
    device: str = "cpu"

    def differences(self, other: dict) -> list[str]:
        what = {"input": "the input checkpoint changed", "recipe": "the recipe differs",
                "stage": "the recipe differs", "calibration": "the calibration differs",
                "version": "compress or torch changed version",
                "device": f"the partial run computed on another device (this one: {self.device})"}
        other = {"device": "cpu", **other}  # partial runs from before --device computed on the CPU
        return [what[k] for k in what if other.get(k) != getattr(self, k)]

    def to_dict(self) -> dict:
        return {"input": self.input, "recipe": self.recipe, "stage": self.stage,
                "calibration": self.calibration, "version": self.version, "device": self.device}


def load_point(partial: Path, identity: Identity) -> dict | None:
    """The committed state in ``partial`` (None when there is none yet); raises CompressError
    when it belongs to a different run."""
    path = partial / STATE_FILE
    if not path.is_file():
        return None
    try:
        point = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise CompressError(f"the partial run in {partial} is damaged ({STATE_FILE} does not parse)",
                            "run again without --resume") from None
    if point.get("format") != FORMAT:
        raise CompressError(f"the partial run in {partial} was written by another compress version",
                            "run again without --resume")
    diff = identity.differences(point.get("identity", {}))
    if diff:
        raise CompressError(f"--resume: {diff[0]} since the partial run in {partial}",
                            "run the same command as the interrupted run, or drop --resume to start over")
    return point


def save_point(partial: Path, identity: Identity, point: dict, tensors: dict[str, dict[str, Tensor]]) -> None:
    """Commit ``point`` (JSON) and named tensor groups (``hidden``, ``carry``) for resume.

    Tensor files get a fresh generation number so that the previous commit's files stay valid
    until ``resume.json`` points at the new ones."""
    d = partial / STATE_DIR
    d.mkdir(exist_ok=True)
    gen = int(point.get("generation", 0)) + 1
    files = {}
    for name, group in tensors.items():
        f = f"{name}-{gen}.safetensors"
        _save_streamed(d / f, group)
        files[name] = f
    body = {**point, "format": FORMAT, "identity": identity.to_dict(), "generation": gen, "files": files}
    tmp = partial / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(body))
    os.replace(tmp, partial / STATE_FILE)
    for f in d.iterdir():  # the previous generation's files
        if f.name not in files.values():
            f.unlink(missing_ok=True)


def _save_streamed(path: Path, tensors: dict[str, Tensor]) -> None:
    """Write a safetensors file chunk by chunk along dim 0 (no whole-file bytes copy, and a
    non-contiguous view such as the first ``width`` columns of the activations is copied one
    window at a time), so a commit adds at most one window to the peak memory."""
    header = safetensors_header({k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in tensors.items()})
    with path.open("wb") as fh:
        fh.write(header)
        for t in tensors.values():
            t = t.detach().cpu()
            rows = t.reshape(1, -1) if t.dim() == 0 else t
            for i in range(rows.shape[0]):
                if rows[i].numel():
                    fh.write(rows[i].contiguous().reshape(-1).view(torch.uint8).numpy())


def load_tensors(partial: Path, point: dict, name: str) -> dict[str, Tensor]:
    f = point.get("files", {}).get(name)
    if f is None:
        return {}
    try:
        return load_file(str(partial / STATE_DIR / f))
    except (OSError, ValueError, RuntimeError):
        raise CompressError(f"the partial run in {partial} is damaged ({f} does not load)",
                            "run again without --resume") from None


def clear(partial: Path) -> None:
    """Remove the resume files (before the partial directory becomes the output)."""
    (partial / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(partial / STATE_DIR, ignore_errors=True)


def split_carry(state: dict[str, object]) -> tuple[dict[str, Tensor], dict]:
    """A pass's carried state split into tensors (saved as safetensors) and JSON values."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return tensors, {k: v for k, v in state.items() if k not in tensors}
