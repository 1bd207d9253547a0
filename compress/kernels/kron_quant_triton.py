"""Triton kernel: Kronecker transform ``P₁ᵀ · X · P₂`` of each token, then its per-token
symmetric quantisation, in one pass (FlatQuant's fused online kernel).

One program handles one token: the token's ``n = n₁ n₂`` values are read as an ``n₁ × n₂`` tile,
multiplied by both factors with ``tl.dot`` (tiles padded to powers of two ≥ 16 and masked, so any
factor sizes work, not only powers of two), reduced to the token's clipped absmax, and written as
int8 codes and one fp32 scale. Rounding is half-to-even, as ``torch.round`` in the twin.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rint(v):
    """Round half to even (``torch.round``)."""
    r = tl.floor(v)
    d = v - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, r + 1.0, r)


@triton.jit
def _kron_quant_kernel(x_ptr, l_ptr, r_ptr, q_ptr, s_ptr, n1, n2, stride_x, stride_q,
                       c_max, c_min, QMAX: tl.constexpr, HAS_L: tl.constexpr, HAS_R: tl.constexpr,
                       B1: tl.constexpr, B2: tl.constexpr):
    row = tl.program_id(0)
    i = tl.arange(0, B1)
    j = tl.arange(0, B2)
    mask = (i[:, None] < n1) & (j[None, :] < n2)
    X = tl.load(x_ptr + row * stride_x + i[:, None] * n2 + j[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_R:  # X · P₂
        rj = tl.arange(0, B2)
        R = tl.load(r_ptr + rj[:, None] * n2 + j[None, :], mask=(rj[:, None] < n2) & (j[None, :] < n2), other=0.0)
        X = tl.dot(X, R.to(tl.float32), input_precision="ieee")
    if HAS_L:  # P₁ᵀ · X
        li = tl.arange(0, B1)
        Lt = tl.load(l_ptr + li[None, :] * n1 + i[:, None], mask=(i[:, None] < n1) & (li[None, :] < n1), other=0.0)
        X = tl.dot(Lt.to(tl.float32), X, input_precision="ieee")
    X = tl.where(mask, X, 0.0)
    xmax = tl.maximum(tl.max(tl.max(X, axis=1), axis=0), 0.0) * c_max
    xmin = tl.minimum(tl.min(tl.min(X, axis=1), axis=0), 0.0) * c_min
    absmax = tl.maximum(-xmin, xmax)
    scale = tl.where(absmax == 0.0, 1.0, absmax / QMAX)
    q = _rint(X / scale)
    q = tl.minimum(tl.maximum(q, -QMAX - 1.0), QMAX * 1.0)
    tl.store(q_ptr + row * stride_q + i[:, None] * n2 + j[None, :], q.to(tl.int8), mask=mask)
    tl.store(s_ptr + row, scale)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def kron_quant(x: Tensor, left: Tensor | None, right: Tensor | None, bits: int,
               clip: tuple[float, float] = (1.0, 1.0)) -> tuple[Tensor, Tensor]:
    """Same contract as :func:`compress.kernels.kron_quant_torch.kron_quant` (``x [M, n]``)."""
    M, n = x.shape
    n1 = left.shape[0] if left is not None else (n // right.shape[0] if right is not None else 1)
    n2 = n // n1
    x = x.contiguous()
    q = torch.empty((M, n), dtype=torch.int8, device=x.device)
    s = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    lt = left.float().contiguous() if left is not None else x
    rt = right.float().contiguous() if right is not None else x
    _kron_quant_kernel[(M,)](x, lt, rt, q, s, n1, n2, x.stride(0), q.stride(0), float(clip[0]), float(clip[1]),
                             QMAX=(1 << (bits - 1)) - 1, HAS_L=left is not None, HAS_R=right is not None,
                             B1=_block(n1), B2=_block(n2))
    return q, s
