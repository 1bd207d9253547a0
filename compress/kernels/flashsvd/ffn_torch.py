"""Streaming torch twins of the FlashSVD rank-space FFN blocks.

A factored linear layer keeps ``W ≈ (U V)ᵀ`` so that ``y = (x @ U) @ V + b`` with ``U [in, r]``
and ``V [r, out]``.  For an FFN the expensive activation is the ``L × D`` intermediate (``D`` is
the intermediate size, typically 3–4× the hidden size).  These twins never build it: they walk
the rows in chunks of ``chunk_l`` and the intermediate columns in chunks of ``chunk_d``, so the
largest activation they allocate is ``chunk_l × max(chunk_d, r, out)`` instead of ``L × D``.

Numerics: half-precision inputs are computed in float32 chunk by chunk (the Triton kernels
accumulate in float32 too); float32 and float64 inputs are computed in their own precision.
The result is cast to ``x.dtype``.

This module also holds the argument checks shared with the Triton launchers, because it never
imports Triton.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_CHUNK_L = 256
DEFAULT_CHUNK_D = 512

# One rank-space input projection of the FFN: (U [in, r], V [r, D], bias [D] or None).
Projection = tuple[Tensor, Tensor, Tensor | None]
# Elementwise activation combining the pre-activations of every projection into the hidden chunk.
Activation = Callable[..., Tensor]


def same_tensor(a: Tensor, b: Tensor) -> bool:
    """True when ``a`` and ``b`` are the same object or views of exactly the same memory."""
    if a is b:
        return True
    return (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the twins compute in: float32 for half types, else the input's own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_ffn(x: Tensor, projections: list[Projection], Ud: Tensor, Vd: Tensor, bd: Tensor | None) -> None:
    """Validate the shapes of a rank-space FFN; raise ``ValueError`` with the offending shape."""
    hidden = x.shape[-1]
    D = projections[0][1].shape[1]
    for i, (U, V, b) in enumerate(projections):
        if U.dim() != 2 or U.shape[0] != hidden:
            raise ValueError(f"projection {i}: U must be [in={hidden}, r], got {tuple(U.shape)}")
        if V.dim() != 2 or V.shape != (U.shape[1], D):
            raise ValueError(f"projection {i}: V must be [r={U.shape[1]}, D={D}], got {tuple(V.shape)}")
        if b is not None and b.shape != (D,):
            raise ValueError(f"projection {i}: bias must be [D={D}], got {tuple(b.shape)}")
    if Ud.dim() != 2 or Ud.shape[0] != D:
        raise ValueError(f"Ud must be [D={D}, r], got {tuple(Ud.shape)}")
    if Vd.dim() != 2 or Vd.shape[0] != Ud.shape[1]:
        raise ValueError(f"Vd must be [r={Ud.shape[1]}, out], got {tuple(Vd.shape)}")
    if bd is not None and bd.shape != (Vd.shape[1],):
        raise ValueError(f"bd must be [out={Vd.shape[1]}], got {tuple(bd.shape)}")


def output_buffer(x: Tensor, out_features: int, out: Tensor | None) -> Tensor:
    """The 2-D ``[L, out]`` view the result is written into (``out`` if given, else fresh)."""
    rows = x.numel() // x.shape[-1]
    if out is None:
        return torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    expected = (*x.shape[:-1], out_features)
    if tuple(out.shape) != expected or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {expected}")
    return out.view(rows, out_features)  # [..., out] -> [L, out]


def _silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """SwiGLU's elementwise core: ``silu(gate) * up``."""
    return F.silu(gate) * up


def _gelu(pre: Tensor) -> Tensor:
    """BERT's ``gelu``: the exact erf form, not the tanh approximation."""
    return F.gelu(pre, approximate="none")


def _expand_cols(p: Tensor, V: Tensor, b: Tensor | None, d0: int, d1: int, dt: torch.dtype) -> Tensor:
    """Columns ``[d0, d1)`` of ``p @ V + b``: ``[rows, r] -> [rows, d1 - d0]``."""
    y = p @ V[:, d0:d1].to(dt)
    return y if b is None else y + b[d0:d1].to(dt)


def _rows_chunk(
    xs: Tensor,
    projections: list[Projection],
    act: Activation,
    Ud: Tensor,
    Vd: Tensor,
    bd: Tensor | None,
    chunk_d: int,
) -> Tensor:
    """FFN output for one row chunk ``xs [rows, in]``; streams the intermediate over ``chunk_d``."""
    dt = compute_dtype(xs.dtype)
    xs = xs.to(dt)
    coeffs = _rank_coefficients(xs, projections, dt)  # each [rows, r_i]
    D = projections[0][1].shape[1]
    s = torch.zeros(xs.shape[0], Ud.shape[1], dtype=dt, device=xs.device)  # [rows, Rd]
    for d0 in range(0, D, chunk_d):
        d1 = min(D, d0 + chunk_d)
        pre = [_expand_cols(p, V, b, d0, d1, dt) for p, (_, V, b) in zip(coeffs, projections)]
        h = act(*pre)  # [rows, d1 - d0]
        s.addmm_(h, Ud[d0:d1].to(dt))
    y = s @ Vd.to(dt)  # [rows, out]
    return y if bd is None else y + bd.to(dt)


def _rank_coefficients(xs: Tensor, projections: list[Projection], dt: torch.dtype) -> list[Tensor]:
    """``xs @ U`` for every projection, computed once for projections sharing one ``U``."""
    coeffs: list[Tensor] = []
    for i, (U, _, _) in enumerate(projections):
        shared = next((coeffs[j] for j in range(i) if same_tensor(projections[j][0], U)), None)
        coeffs.append(shared if shared is not None else xs @ U.to(dt))
    return coeffs


def rank_ffn(
    x: Tensor,
    projections: list[Projection],
    act: Activation,
    Ud: Tensor,
    Vd: Tensor,
    bd: Tensor | None,
    *,
    chunk_l: int,
    chunk_d: int,
    out: Tensor | None,
) -> Tensor:
    """Generic streaming rank-space FFN: ``act(*(x U_i V_i + b_i)) Ud Vd + bd``, chunked."""
    check_ffn(x, projections, Ud, Vd, bd)
    if chunk_l < 1 or chunk_d < 1:
        raise ValueError(f"chunk sizes must be positive, got chunk_l={chunk_l}, chunk_d={chunk_d}")
    x2d = x.reshape(-1, x.shape[-1])  # [..., in] -> [L, in]
    y2d = output_buffer(x, Vd.shape[1], out)  # [L, out]
    for l0 in range(0, x2d.shape[0], chunk_l):
        l1 = min(x2d.shape[0], l0 + chunk_l)
        y2d[l0:l1] = _rows_chunk(x2d[l0:l1], projections, act, Ud, Vd, bd, chunk_d)
    return y2d.view(*x.shape[:-1], Vd.shape[1])  # [L, out] -> [..., out]


def flash_swiglu_ffn(
    x: Tensor,
    Ug: Tensor,
    Vg: Tensor,
    Uu: Tensor,
    Vu: Tensor,
    Ud: Tensor,
    Vd: Tensor,
    bg: Tensor | None = None,
    bu: Tensor | None = None,
    bd: Tensor | None = None,
    *,
    chunk_l: int = DEFAULT_CHUNK_L,
    chunk_d: int = DEFAULT_CHUNK_D,
    out: Tensor | None = None,
) -> Tensor:
    """Decoder SwiGLU FFN in rank space, streamed over row and intermediate chunks.

    ``out = (silu(x Ug Vg + bg) * (x Uu Vu + bu)) Ud Vd + bd`` with ``x [..., in]``,
    ``Ug/Uu [in, r]``, ``Vg/Vu [r, D]``, ``Ud [D, rd]``, ``Vd [rd, out]``.  When ``Ug`` and
    ``Uu`` are the same tensor (a jointly factored gate/up pair) ``x @ U`` is computed once.
    Peak activation memory is ``O(chunk_l * max(chunk_d, r, out))``; ``out=`` receives the
    result in place (shape ``[..., out]``, ``x.dtype``).
    """
    projections: list[Projection] = [(Ug, Vg, bg), (Uu, Vu, bu)]
    return rank_ffn(x, projections, _silu_mul, Ud, Vd, bd, chunk_l=chunk_l, chunk_d=chunk_d, out=out)


def flash_gelu_ffn(
    x: Tensor,
    U1: Tensor,
    V1: Tensor,
    b1: Tensor | None,
    U2: Tensor,
    V2: Tensor,
    b2: Tensor | None,
    *,
    chunk_l: int = DEFAULT_CHUNK_L,
    chunk_d: int = DEFAULT_CHUNK_D,
    out: Tensor | None = None,
) -> Tensor:
    """Encoder (BERT) FFN in rank space, streamed: ``gelu(x U1 V1 + b1) U2 V2 + b2``.

    GELU is the exact erf form used by BERT's ``"gelu"``.  Shapes: ``x [..., in]``,
    ``U1 [in, r1]``, ``V1 [r1, D]``, ``U2 [D, r2]``, ``V2 [r2, out]``.  Peak activation memory
    is ``O(chunk_l * max(chunk_d, r, out))``.
    """
    projections: list[Projection] = [(U1, V1, b1)]
    return rank_ffn(x, projections, _gelu, U2, V2, b2, chunk_l=chunk_l, chunk_d=chunk_d, out=out)
