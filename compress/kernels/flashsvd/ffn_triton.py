"""Triton kernels for the FlashSVD rank-space FFN blocks (SwiGLU decoder, GELU encoder).

Layout: a factored linear is ``y = (x @ U) @ V + b`` with ``U [in, r]``, ``V [r, out]``.

What the kernel fuses: the rank-space coefficients ``P = x @ U`` (``L × r``, small) come from
torch.  One program owns a tile of ``BLOCK_L`` rows and a tile of ``BLOCK_RD`` columns of the
down projection's rank space.  It walks the intermediate dimension ``D`` in chunks of
``BLOCK_D``; per chunk it rebuilds the pre-activations from the coefficients (``P @ V[:, chunk]``,
itself a loop over the rank in ``BLOCK_R`` steps), applies the activation and immediately
contracts the ``BLOCK_L × BLOCK_D`` hidden tile with ``Ud[chunk, rd-tile]`` into a float32
accumulator.  The ``L × D`` intermediate therefore exists only tile by tile in registers and is
never written to global memory.  The kernel writes ``S = h @ Ud`` (``L × rd``); torch finishes
with ``S @ Vd + bd``.

When ``rd > BLOCK_RD`` the hidden tile is recomputed once per rd-tile (a compute-for-memory
trade); the default ``BLOCK_RD`` covers ranks up to 128 in one tile.

Every load is masked, so ``L``, ``D`` and all ranks may be arbitrary; the launch grid is sized
with exactly the block sizes handed to the kernel.  ``DOT_F32`` makes every ``tl.dot`` take
float32 operands at IEEE precision: it is on for float32 inputs (no TF32 rounding) and under
``TRITON_INTERPRET=1`` (whose CPU ``tl.dot`` mishandles bfloat16 operands); on a GPU, half
inputs use native half-precision dots with float32 accumulation.
"""

from __future__ import annotations

import triton
import triton.language as tl
import torch
from torch import Tensor

from .._triton import interpreting
from .ffn_torch import Projection, check_ffn, output_buffer, same_tensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _mma(a, b, acc, DOT_F32: tl.constexpr):
    """``acc + a @ b`` with float32 accumulation (float32 IEEE operands when ``DOT_F32``)."""
    if DOT_F32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _rank_tile(
    p_ptr,
    v_ptr,
    rows,
    cols,
    n_rows,
    n_cols,
    R,
    stride_p_row,
    stride_p_r,
    stride_v_r,
    stride_v_col,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Rebuild ``P[rows] @ V[:, cols]`` (float32 ``[BLOCK_ROWS, BLOCK_COLS]``) from rank space.

    The rank is consumed in ``BLOCK_R`` steps; rows ``>= n_rows``, columns ``>= n_cols`` and
    ranks ``>= R`` load as zero, so out-of-range entries of the tile are exactly 0.
    """
    acc = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
    row_ok = rows[:, None] < n_rows
    col_ok = cols[None, :] < n_cols
    for r0 in range(0, R, BLOCK_R):
        ks = r0 + tl.arange(0, BLOCK_R)
        p = tl.load(
            p_ptr + rows[:, None] * stride_p_row + ks[None, :] * stride_p_r,
            mask=row_ok & (ks[None, :] < R),
            other=0.0,
        )
        v = tl.load(
            v_ptr + ks[:, None] * stride_v_r + cols[None, :] * stride_v_col,
            mask=(ks[:, None] < R) & col_ok,
            other=0.0,
        )
        acc = _mma(p, v, acc, DOT_F32)
    return acc


@triton.jit
def _add_bias(acc, b_ptr, cols, n_cols, HAS_BIAS: tl.constexpr):
    """``acc + b[cols]`` broadcast over rows (no-op without a bias); masked past ``n_cols``."""
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=cols < n_cols, other=0.0)
        acc = acc + b.to(tl.float32)[None, :]
    return acc


@triton.jit
def _ffn_rank_kernel(
    pg_ptr,
    pu_ptr,
    vg_ptr,
    vu_ptr,
    bg_ptr,
    bu_ptr,
    ud_ptr,
    s_ptr,
    L,
    D,
    RG,
    RU,
    RD,
    stride_pg_l,
    stride_pg_r,
    stride_pu_l,
    stride_pu_r,
    stride_vg_r,
    stride_vg_d,
    stride_vu_r,
    stride_vu_d,
    stride_ud_d,
    stride_ud_r,
    stride_s_l,
    stride_s_r,
    GATED: tl.constexpr,
    HAS_BG: tl.constexpr,
    HAS_BU: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_RD: tl.constexpr,
):
    """``S[rows, rd-tile] = act(P V + b)[rows, :] @ Ud[:, rd-tile]``, streaming over ``D``.

    ``GATED``: SwiGLU, ``act = silu(Pg Vg + bg) * (Pu Vu + bu)``; otherwise exact GELU of
    ``Pg Vg + bg`` (``pu/vu/bu`` are then unused).
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)  # int64: L*stride may exceed 2^31
    rd_cols = tl.program_id(1) * BLOCK_RD + tl.arange(0, BLOCK_RD)
    acc = tl.zeros((BLOCK_L, BLOCK_RD), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_cols = d0 + tl.arange(0, BLOCK_D)
        g = _rank_tile(pg_ptr, vg_ptr, rows, d_cols, L, D, RG, stride_pg_l, stride_pg_r,
                       stride_vg_r, stride_vg_d, BLOCK_L, BLOCK_D, BLOCK_R, DOT_F32)
        g = _add_bias(g, bg_ptr, d_cols, D, HAS_BG)
        if GATED:
            u = _rank_tile(pu_ptr, vu_ptr, rows, d_cols, L, D, RU, stride_pu_l, stride_pu_r,
                           stride_vu_r, stride_vu_d, BLOCK_L, BLOCK_D, BLOCK_R, DOT_F32)
            u = _add_bias(u, bu_ptr, d_cols, D, HAS_BU)
            h = g * tl.sigmoid(g) * u
        else:
            h = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))  # exact GELU: x * Phi(x)
        h = tl.where(d_cols[None, :] < D, h, 0.0)  # [BLOCK_L, BLOCK_D]
        w = tl.load(
            ud_ptr + d_cols[:, None] * stride_ud_d + rd_cols[None, :] * stride_ud_r,
            mask=(d_cols[:, None] < D) & (rd_cols[None, :] < RD),
            other=0.0,
        )  # [BLOCK_D, BLOCK_RD]
        acc = _mma(h.to(w.dtype), w, acc, DOT_F32)
    tl.store(
        s_ptr + rows[:, None] * stride_s_l + rd_cols[None, :] * stride_s_r,
        acc,
        mask=(rows[:, None] < L) & (rd_cols[None, :] < RD),
    )


def _pow2_block(name: str, value: int) -> int:
    """Validate a tile size: a power of two and at least 16 (``tl.dot``'s minimum)."""
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    return value


def default_block_rd(rd: int) -> int:
    """Default rd tile: the whole down-projection rank up to 128 (at least 16)."""
    return max(16, min(128, triton.next_power_of_2(rd)))


def dot_in_f32(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` must take float32 operands (float32 data, or the CPU interpreter)."""
    return dtype == torch.float32 or interpreting()


def check_triton_dtypes(*tensors: Tensor | None) -> None:
    """All tensors share one supported floating dtype (``tl.dot`` needs matching operands)."""
    present = [t for t in tensors if t is not None]
    dtypes = {t.dtype for t in present}
    if len(dtypes) != 1 or present[0].dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"Triton path needs one dtype among {SUPPORTED_DTYPES}, got {dtypes}")


def rank_ffn_core(
    coeffs: list[Tensor],
    projections: list[Projection],
    Ud: Tensor,
    *,
    block_l: int = 64,
    block_d: int = 64,
    block_r: int = 32,
    block_rd: int | None = None,
    num_warps: int = 4,
    s_out: Tensor | None = None,
) -> Tensor:
    """Launch the fused kernel: ``S = act(P_i V_i + b_i) @ Ud`` as float32 ``[L, rd]``.

    ``coeffs[i] = x2d @ U_i`` (``[L, r_i]``, any strides); one coefficient means GELU, two mean
    SwiGLU (gate first).  ``s_out`` (float32 ``[L, rd]``) receives the result when given.
    """
    L, rd, D = coeffs[0].shape[0], Ud.shape[1], Ud.shape[0]
    block_rd = default_block_rd(rd) if block_rd is None else block_rd
    for name, value in (("block_l", block_l), ("block_d", block_d), ("block_r", block_r), ("block_rd", block_rd)):
        _pow2_block(name, value)
    s = torch.empty(L, rd, dtype=torch.float32, device=Ud.device) if s_out is None else s_out
    if s.shape != (L, rd) or s.dtype != torch.float32:
        raise ValueError(f"s_out must be float32 [{L}, {rd}], got {s.dtype} {tuple(s.shape)}")
    if L == 0 or rd == 0:
        return s
    gated = len(coeffs) == 2
    pg, (_, vg, bg) = coeffs[0], projections[0]
    pu, (_, vu, bu) = (coeffs[1], projections[1]) if gated else (pg, projections[0])
    grid = (triton.cdiv(L, block_l), triton.cdiv(rd, block_rd))
    _ffn_rank_kernel[grid](
        pg, pu, vg, vu,
        vg if bg is None else bg, vu if bu is None else bu,
        Ud, s,
        L, D, pg.shape[1], pu.shape[1], rd,
        pg.stride(0), pg.stride(1), pu.stride(0), pu.stride(1),
        vg.stride(0), vg.stride(1), vu.stride(0), vu.stride(1),
        Ud.stride(0), Ud.stride(1), s.stride(0), s.stride(1),
        GATED=gated, HAS_BG=bg is not None, HAS_BU=gated and bu is not None,
        DOT_F32=dot_in_f32(pg.dtype),
        BLOCK_L=block_l, BLOCK_D=block_d, BLOCK_R=block_r, BLOCK_RD=block_rd,
        num_warps=num_warps,
    )
    return s


def _rank_ffn(
    x: Tensor,
    projections: list[Projection],
    Ud: Tensor,
    Vd: Tensor,
    bd: Tensor | None,
    out: Tensor | None,
    blocks: dict[str, int | None],
) -> Tensor:
    """Coefficients in torch, fused middle in Triton, ``S @ Vd + bd`` in torch."""
    check_ffn(x, projections, Ud, Vd, bd)
    check_triton_dtypes(x, Ud, Vd, bd, *(t for proj in projections for t in proj))
    x2d = x.reshape(-1, x.shape[-1])  # [..., in] -> [L, in]
    coeffs: list[Tensor] = []
    for i, (U, _, _) in enumerate(projections):
        shared = i > 0 and same_tensor(projections[0][0], U)
        coeffs.append(coeffs[0] if shared else x2d @ U)  # [L, r_i]
    s = rank_ffn_core(coeffs, projections, Ud, **blocks)  # [L, rd] float32
    y2d = output_buffer(x, Vd.shape[1], out)  # [L, out]
    s = s.to(x.dtype)
    if bd is None:
        torch.mm(s, Vd, out=y2d)
    else:
        torch.addmm(bd, s, Vd, out=y2d)
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
    block_l: int = 64,
    block_d: int = 64,
    block_r: int = 32,
    block_rd: int | None = None,
    num_warps: int = 4,
    out: Tensor | None = None,
) -> Tensor:
    """Fused SwiGLU FFN in rank space: ``(silu(x Ug Vg + bg) * (x Uu Vu + bu)) Ud Vd + bd``.

    ``x @ Ug`` is computed once when ``Ug`` and ``Uu`` are the same tensor.  The ``L × D``
    intermediate never reaches global memory (see the module docstring).  Output
    ``[..., out]`` in ``x.dtype``, written into ``out`` when given.
    """
    blocks = dict(block_l=block_l, block_d=block_d, block_r=block_r, block_rd=block_rd, num_warps=num_warps)
    return _rank_ffn(x, [(Ug, Vg, bg), (Uu, Vu, bu)], Ud, Vd, bd, out, blocks)


def flash_gelu_ffn(
    x: Tensor,
    U1: Tensor,
    V1: Tensor,
    b1: Tensor | None,
    U2: Tensor,
    V2: Tensor,
    b2: Tensor | None,
    *,
    block_l: int = 64,
    block_d: int = 64,
    block_r: int = 32,
    block_rd: int | None = None,
    num_warps: int = 4,
    out: Tensor | None = None,
) -> Tensor:
    """Fused BERT FFN in rank space: ``gelu(x U1 V1 + b1) U2 V2 + b2`` (exact erf GELU)."""
    blocks = dict(block_l=block_l, block_d=block_d, block_r=block_r, block_rd=block_rd, num_warps=num_warps)
    return _rank_ffn(x, [(U1, V1, b1)], U2, V2, b2, out, blocks)
