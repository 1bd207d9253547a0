"""Where a run computes: ``--device auto|cpu|cuda|cuda:N`` and where calibration activations live.

The pipeline streams one block at a time onto the compute device; the input shards stay lazily
read on the host. The calibration activations (``[windows, seq, hidden]``) live on the device
when they fit beside the block's working set, else on the host, moved batch by batch
(:func:`offload_activations`). Results are written from the device to host memory as they leave.
"""

from __future__ import annotations

import re
from typing import Literal

import torch

from compress.errors import CompressError

ActivationMode = Literal["auto", "device", "host"]
#: share of the device's free memory the activation buffer may take in ``auto`` mode; the rest
#: is left for the block, its statistics (Hessians) and one batch's forward workspace
DEVICE_SHARE = 0.5


def resolve_device(spec: str | torch.device) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``, checked against the
    machine: a CUDA device that is absent is a one-line error naming what is there."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = spec.strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if m is None:
        raise CompressError(f"unknown --device {spec!r}", "use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise CompressError(f"--device {spec} but this machine has no CUDA device (torch {torch.__version__})",
                            "use --device cpu (or auto)")
    index = int(m.group(1)) if m.group(1) is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise CompressError(f"--device {spec} but this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})",
                            f"use --device cuda:{count - 1} or lower")
    return torch.device("cuda", index)


def device_name(spec: str | torch.device) -> str:
    """:func:`resolve_device` as the string torch and child processes take (``cuda:1``)."""
    return str(resolve_device(spec))


def free_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (None on the host: the host is where things go when they do not fit)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return None


def offload_activations(nbytes: int, device: torch.device, mode: ActivationMode = "auto") -> bool:
    """Whether a calibration activation buffer of ``nbytes`` lives on the host and travels to
    ``device`` one batch at a time: ``host``; ``auto`` when it takes more than
    :data:`DEVICE_SHARE` of the device's free memory; never for ``device``. On a CPU run ``host``
    still copies every batch (it exercises exactly what a GPU run with offload does)."""
    if mode == "host":
        return True
    if mode == "device" or device.type == "cpu":
        return False
    free = free_bytes(device)
    return free is not None and nbytes > DEVICE_SHARE * free


def host_buffer(shape: tuple[int, ...], dtype: torch.dtype, compute: torch.device) -> torch.Tensor:
    """An empty host tensor for activations computed on ``compute`` (pinned when that is CUDA, so
    the per-batch copies run at full bandwidth)."""
    return torch.empty(shape, dtype=dtype, pin_memory=compute.type == "cuda" and torch.cuda.is_available())


def rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """The RNG states a deterministic resume restores: the host's and, on CUDA, the device's."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict[str, torch.Tensor], device: torch.device) -> None:
    if "cpu" in states:
        torch.set_rng_state(states["cpu"].cpu())
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"].cpu(), device)


def synchronize(device: torch.device) -> None:
    """Wait for the device (timings and peak-memory readings are only meaningful after it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
