"""Data-parallel calibration: several processes, one model, statistics summed across them.

Launched by ``accelerate launch --multi_gpu --num_processes N`` (or ``torchrun``, which
accelerate's launcher is built on), each process of a compressing command joins the group
through accelerate's :class:`~accelerate.PartialState` (NCCL on GPUs, gloo on CPU), computes on
its own device (``cuda:LOCAL_RANK``) and takes a contiguous, batch-aligned share of the
calibration windows. Every statistic is a sum over token rows (``XᵀX`` and its row count,
:class:`compress.calib.hessian.GramAccumulator`), summed across processes before it is used, so
every process then solves the same problem and computes the same compressed block; each
propagates its own windows through it. Process 0 writes the output; the others write theirs to a
temporary directory beside it that is removed at the end (so a run needs twice the output's disk
space while it runs). The work store is not used in such a run (a process that
found a statistic stored would skip a sum the others wait for) and ``--resume`` is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from compress.device import resolve_device
from compress.errors import CompressError


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run (rank 0 of 1 when not launched so)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether a launcher started several processes of this command (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def world() -> World:
    """This process's rank and the group's size (initialised by :func:`join`)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def join(device: str | torch.device) -> tuple[World, torch.device]:
    """Join the launcher's process group (when there is one) and pick this process's device:
    ``cpu``, or ``cuda:LOCAL_RANK`` for ``auto``/``cuda``; without a launcher, :func:`resolve_device`."""
    if not launched():
        return World(), resolve_device(device)
    spec = str(device).strip().lower()
    if spec.startswith("cuda:"):
        raise CompressError(f"--device {spec} in a run of several processes (each takes cuda:LOCAL_RANK)",
                            "pass --device cuda or auto")
    cpu = resolve_device(spec).type == "cpu"  # also refuses cuda on a machine without it
    from accelerate import PartialState

    state = PartialState(cpu=cpu)
    dev = torch.device("cpu") if cpu else torch.device(state.device)
    return World(state.process_index, state.num_processes), dev


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the processes of the run, in place (itself when there is one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def share(windows: torch.Tensor, batch_size: int, w: World) -> torch.Tensor:
    """Process ``w.rank``'s contiguous share of the calibration windows, cut at batch boundaries,
    so the batches (and each batch's float32 Gram) are those a single process forms."""
    if w.size == 1:
        return windows
    n_batches = -(-windows.shape[0] // batch_size)
    if n_batches < w.size:
        raise CompressError(f"{windows.shape[0]} calibration windows make {n_batches} batches of {batch_size}, "
                            f"fewer than the {w.size} processes of this run",
                            "use fewer processes, more --n-samples or a smaller --batch-size")
    per, extra = divmod(n_batches, w.size)
    start = w.rank * per + min(w.rank, extra)
    stop = start + per + (1 if w.rank < extra else 0)
    return windows[start * batch_size:stop * batch_size]


def agree(ok: bool) -> bool:
    """Whether every process of the run says ``ok`` (each learns the same answer)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=_collective_device())
    return float(all_reduce_sum(flag).item()) == 0.0


def _collective_device() -> torch.device:
    """Where small tensors for collectives live (NCCL takes CUDA tensors only)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
