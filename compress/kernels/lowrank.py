"""Low-rank matmul ``y = (x @ U) @ V + bias`` without materialising ``x @ U`` in global memory.

:func:`lowrank_matmul` serves a factored linear layer ``W ≈ (U @ V)ᵀ`` (``U [K, r]``,
``V [r, N]``); :func:`shared_basis_matmul` serves sibling layers (e.g. q/k/v) that were factored
with one shared basis ``U`` and read the same input, computing the rank-space activations once
for all of them.

Each call goes to the Triton kernels (:mod:`compress.kernels.lowrank_triton`) or to the plain-torch twin
(:mod:`compress.kernels.lowrank_torch`) by :func:`compress.kernels._triton.use_triton`: Triton for CUDA tensors, the
twin on CPU, overridable with ``COMPRESS_KERNELS``. Triton is imported only when chosen.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from compress.kernels import lowrank_torch as _torch
from compress.kernels._triton import use_triton


def lowrank_matmul(x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None = None) -> Tensor:
    """``(x @ U) @ V + bias``.

    Args:
        x: ``[..., K]`` (fp16, bf16 or fp32).
        U: ``[K, r]``; V: ``[r, N]``; bias: optional ``[N]`` (cast to ``x.dtype`` if needed).

    Returns:
        ``[..., N]`` in ``x.dtype`` (fp32 accumulation; the rank-space activations are rounded to
        ``x.dtype``, as ``(x @ U)`` would be).
    """
    if use_triton(x):
        from compress.kernels import lowrank_triton

        return lowrank_triton.lowrank_matmul(x, U, V, bias)
    return _torch.lowrank_matmul(x, U, V, bias)


def shared_basis_matmul(
    x: Tensor, U: Tensor, Vs: Sequence[Tensor], biases: Sequence[Tensor | None] | None = None
) -> list[Tensor]:
    """``[(x @ U) @ V_i + b_i for each V_i]`` with ``x @ U`` computed once.

    Args:
        x: ``[..., K]``; U: ``[K, r]`` (the shared basis); Vs: each ``[r, N_i]``;
        biases: ``None`` or one entry (``[N_i]`` or ``None``) per ``V``.

    Returns:
        One ``[..., N_i]`` tensor per ``V`` in ``x.dtype``. On the Triton backend they are views
        into one ``[..., sum N_i]`` buffer (unit stride along the last dim, so ``.view`` splitting
        of the last dim still works).
    """
    if use_triton(x):
        from compress.kernels import lowrank_triton

        return lowrank_triton.shared_basis_matmul(x, U, Vs, biases)
    return _torch.shared_basis_matmul(x, U, Vs, biases)
