"""Plain-torch twins of the low-rank matmul kernels (what CPU serving runs).

``y = (x @ U) @ V + bias`` is evaluated in row chunks of at most :data:`CHUNK_ROWS` rows, so the
``[M, r]`` rank-space intermediate exists one chunk at a time (the Triton kernel never writes it
at all). :func:`shared_basis_matmul` computes each chunk's ``x @ U`` once and applies every ``V``
to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

CHUNK_ROWS = 4096
"""Rows of x processed per step; bounds the rank-space intermediate to ``CHUNK_ROWS x r``."""


def check_lowrank_args(x: Tensor, U: Tensor, Vs: Sequence[Tensor], biases: Sequence[Tensor | None]) -> None:
    """Raise ``ValueError`` unless ``x [..., K]``, ``U [K, r]``, each ``V [r, N_i]``, bias ``[N_i]`` agree."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if U.dim() != 2 or x.dim() == 0 or x.shape[-1] != U.shape[0]:
        raise ValueError(f"x [..., K] and U [K, r] disagree: {tuple(x.shape)} vs {tuple(U.shape)}")
    if len(Vs) == 0 or len(biases) != len(Vs):
        raise ValueError(f"need at least one V and one bias entry per V, got {len(Vs)} and {len(biases)}")
    for V, bias in zip(Vs, biases):
        if V.dim() != 2 or V.shape[0] != U.shape[1]:
            raise ValueError(f"V must be [r={U.shape[1]}, N], got {tuple(V.shape)}")
        if bias is not None and tuple(bias.shape) != (V.shape[1],):
            raise ValueError(f"bias must be [{V.shape[1]}], got {tuple(bias.shape)}")


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])  # [..., K] -> [M, K]


def shared_basis_matmul(
    x: Tensor, U: Tensor, Vs: Sequence[Tensor], biases: Sequence[Tensor | None] | None = None
) -> list[Tensor]:
    """Torch twin of :func:`compress.kernels.lowrank.shared_basis_matmul`: ``[(x @ U) @ V_i + b_i]``."""
    biases = [None] * len(Vs) if biases is None else list(biases)
    check_lowrank_args(x, U, Vs, biases)
    dtype = x.dtype
    x2 = _rows(x)  # [M, K]
    m = x2.shape[0]
    u = U.to(dtype)
    vs = [V.to(dtype) for V in Vs]
    bs = [None if b is None else b.to(dtype) for b in biases]
    outs = [x2.new_empty((m, V.shape[1])) for V in vs]  # [M, N_i]
    for start in range(0, m, CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, m)
        t = x2[start:stop] @ u  # [rows, r], the only rank-space tensor alive
        for out, V, b in zip(outs, vs, bs):
            if b is None:
                torch.matmul(t, V, out=out[start:stop])
            else:
                torch.addmm(b, t, V, out=out[start:stop])
    lead = x.shape[:-1]
    return [out.reshape(*lead, out.shape[1]) for out in outs]  # [M, N_i] -> [..., N_i]


def lowrank_matmul(x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None = None) -> Tensor:
    """Torch twin of :func:`compress.kernels.lowrank.lowrank_matmul`: ``(x @ U) @ V + bias``."""
    return shared_basis_matmul(x, U, [V], [bias])[0]
