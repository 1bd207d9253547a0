"""Torch twin of the fused Kronecker-transform + per-token activation quantisation kernel.

``codes, scale = kron_quant(x, left, right, bits, clip)``: ``x' = x · (left ⊗ right)`` over the
last dim, then per-token symmetric codes ``clamp(round(x' / s), −2^(b−1), 2^(b−1) − 1)`` with
``s = max(|min|·c_min, max·c_max) / (2^(b−1) − 1)`` (FlatQuant's quantiser with its LAC
multipliers). Codes are int8 ``[M, n]``, scales fp32 ``[M, 1]``; the transform runs in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from compress.algos.flatquant import act_codes, kron_apply


def kron_quant(x: Tensor, left: Tensor | None, right: Tensor | None, bits: int,
               clip: tuple[float, float] = (1.0, 1.0)) -> tuple[Tensor, Tensor]:
    """Transform and quantise the rows of ``x [M, n]`` (see the module docstring)."""
    xt = kron_apply(x.float(), None if left is None else left.float(), None if right is None else right.float())
    q, scale = act_codes(xt, bits, clip)
    return q.to(torch.int8), scale.float()


def int_linear(codes: Tensor, scale: Tensor, w_codes_t: Tensor, w_scale: Tensor, bias: Tensor | None,
               dtype: torch.dtype) -> Tensor:
    """``(codes · w_codesᵀ) · scale · w_scale (+ bias)`` with an exact int32 accumulation.

    ``codes [M, K]`` int8, ``scale [M, 1]``; ``w_codes_t [K, N]`` int8, ``w_scale [N]``.
    """
    acc = torch._int_mm(codes, w_codes_t)  # [M, N] int32, exact
    y = acc.float() * scale * w_scale.float().unsqueeze(0)
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)
