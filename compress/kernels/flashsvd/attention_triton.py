"""Triton kernel for FlashSVD attention: Q/K/V tiles rebuilt in registers from rank space.

Inputs are the rank-space coefficients ``pq = x @ Uq`` (``[B, L, Rq]``, any strides) and the
factors ``Vq [Rq, H*hd]`` (k/v likewise with ``Hkv*hd`` columns).  One program owns one
(batch, head) pair and one tile of ``BLOCK_M`` queries:

1. it rebuilds the Q tile ``pq[b, tile] @ Vq[:, head cols] (+ bq)`` in registers, looping over
   the rank in ``BLOCK_R`` steps (ranks need not be multiples of it), and applies RoPE;
2. for every key tile of ``BLOCK_N`` rows (only up to the diagonal when causal) it rebuilds the
   K and V tiles of kv head ``h // (H / Hkv)`` the same way, RoPEs K, forms the scaled scores,
   applies the causal and key-padding masks and folds them into an online softmax (running max
   and denominator, the FlashAttention recurrence, in base 2);
3. it writes its ``BLOCK_M × hd`` slice of ``O [B, L, H*hd]`` in the input dtype.

Full Q/K/V (``[B, H, L, hd]``) and the ``L × L`` scores never reach global memory.

Head dimension: each head is handled as two halves (columns ``[0, half)`` and ``[half, hd)``,
``half = ceil(hd / 2)``), each padded to a power-of-two ``BLOCK_H >= 16`` with masks.  That makes
any ``hd`` work (48, 24, 80, ...) and turns RoPE's ``rotate_half`` into arithmetic between the two
half tiles instead of a register shuffle: ``lo' = lo*cos_lo - hi*sin_lo``,
``hi' = hi*cos_hi + lo*sin_hi``.

Rows whose keys are all masked produce 0 (the running max is clamped, the denominator guarded).
Every load is masked on the sequence length, rank and head-dim bounds; the grid is sized with
the exact block sizes handed to the kernel.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl
import torch
from torch import Tensor

from .attention_torch import RankProjection, check_attention, output_buffer, rope_tables
from .ffn_triton import _add_bias, _mma, _pow2_block, check_triton_dtypes, dot_in_f32


@triton.jit
def _head_tile(
    p_ptr,
    v_ptr,
    b_ptr,
    rows,
    n_rows,
    R,
    col0,
    HALF,
    HEAD_DIM,
    stride_p_row,
    stride_p_r,
    stride_v_r,
    stride_v_col,
    HAS_BIAS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Rebuild one head's tile ``p[rows] @ V[:, col0:col0+hd] (+ b)`` as two float32 halves.

    Returns ``(lo, hi)``, each ``[BLOCK_ROWS, BLOCK_H]``: columns ``[0, HALF)`` and
    ``[HALF, HEAD_DIM)`` of the head; padded rows/columns are exactly 0.  Each rank step loads
    the coefficient tile once and feeds both halves.
    """
    dh = tl.arange(0, BLOCK_H)
    lo_cols = col0 + dh
    hi_cols = col0 + HALF + dh
    lo_ok = dh < HALF
    hi_ok = dh < HEAD_DIM - HALF
    row_ok = rows[:, None] < n_rows
    lo = tl.zeros((BLOCK_ROWS, BLOCK_H), dtype=tl.float32)
    hi = tl.zeros((BLOCK_ROWS, BLOCK_H), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        ks = r0 + tl.arange(0, BLOCK_R)
        k_ok = ks < R
        p = tl.load(
            p_ptr + rows[:, None] * stride_p_row + ks[None, :] * stride_p_r,
            mask=row_ok & k_ok[None, :],
            other=0.0,
        )  # [BLOCK_ROWS, BLOCK_R]
        v_lo = tl.load(
            v_ptr + ks[:, None] * stride_v_r + lo_cols[None, :] * stride_v_col,
            mask=k_ok[:, None] & lo_ok[None, :],
            other=0.0,
        )  # [BLOCK_R, BLOCK_H]
        v_hi = tl.load(
            v_ptr + ks[:, None] * stride_v_r + hi_cols[None, :] * stride_v_col,
            mask=k_ok[:, None] & hi_ok[None, :],
            other=0.0,
        )  # [BLOCK_R, BLOCK_H]
        lo = _mma(p, v_lo, lo, DOT_F32)
        hi = _mma(p, v_hi, hi, DOT_F32)
    lo = _add_bias(lo, b_ptr + col0, dh, HALF, HAS_BIAS)
    hi = _add_bias(hi, b_ptr + col0 + HALF, dh, HEAD_DIM - HALF, HAS_BIAS)
    return lo, hi


@triton.jit
def _rope(
    lo,
    hi,
    cos_ptr,
    sin_ptr,
    rows,
    n_rows,
    HALF,
    stride_l,
    stride_d,
    BLOCK_H: tl.constexpr,
):
    """HF rotate_half RoPE on a head tile split in halves: ``x*cos + rotate_half(x)*sin``."""
    dh = tl.arange(0, BLOCK_H)
    mask = (rows[:, None] < n_rows) & (dh[None, :] < HALF)
    off_lo = rows[:, None] * stride_l + dh[None, :] * stride_d  # [BLOCK_ROWS, BLOCK_H]
    off_hi = off_lo + HALF * stride_d
    cos_lo = tl.load(cos_ptr + off_lo, mask=mask, other=0.0).to(tl.float32)
    cos_hi = tl.load(cos_ptr + off_hi, mask=mask, other=0.0).to(tl.float32)
    sin_lo = tl.load(sin_ptr + off_lo, mask=mask, other=0.0).to(tl.float32)
    sin_hi = tl.load(sin_ptr + off_hi, mask=mask, other=0.0).to(tl.float32)
    return lo * cos_lo - hi * sin_lo, hi * cos_hi + lo * sin_hi


@triton.jit
def _flashsvd_attention_kernel(
    pq_ptr, vq_ptr, bq_ptr,
    pk_ptr, vk_ptr, bk_ptr,
    pv_ptr, vv_ptr, bv_ptr,
    cos_ptr, sin_ptr, kpm_ptr, o_ptr,
    L, H, GROUP, RQ, RK, RV, HEAD_DIM, HALF, qk_scale,
    stride_pq_b, stride_pq_l, stride_pq_r, stride_vq_r, stride_vq_c,
    stride_pk_b, stride_pk_l, stride_pk_r, stride_vk_r, stride_vk_c,
    stride_pv_b, stride_pv_l, stride_pv_r, stride_vv_r, stride_vv_c,
    stride_rope_b, stride_rope_l, stride_rope_d,
    stride_kpm_b, stride_kpm_l,
    stride_o_b, stride_o_l, stride_o_c,
    HAS_BQ: tl.constexpr, HAS_BK: tl.constexpr, HAS_BV: tl.constexpr,
    ROPE: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One (batch, head, query tile): rebuild Q, stream rebuilt K/V tiles, online softmax."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    kv_col0 = (h // GROUP) * HEAD_DIM
    dt = pq_ptr.dtype.element_ty
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)

    q_lo, q_hi = _head_tile(pq_ptr + b * stride_pq_b, vq_ptr, bq_ptr, rows_m, L, RQ, h * HEAD_DIM,
                            HALF, HEAD_DIM, stride_pq_l, stride_pq_r, stride_vq_r, stride_vq_c,
                            HAS_BQ, BLOCK_M, BLOCK_H, BLOCK_R, DOT_F32)
    if ROPE:
        q_lo, q_hi = _rope(q_lo, q_hi, cos_ptr + b * stride_rope_b, sin_ptr + b * stride_rope_b,
                           rows_m, L, HALF, stride_rope_l, stride_rope_d, BLOCK_H)
    q_lo = q_lo.to(dt)
    q_hi = q_hi.to(dt)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_lo = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    acc_hi = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    if CAUSAL:
        n_end = tl.minimum(L, (pid_m + 1) * BLOCK_M)  # key tiles above the diagonal are skipped
    else:
        n_end = L
    for n0 in range(0, n_end, BLOCK_N):
        rows_n = n0 + tl.arange(0, BLOCK_N)
        k_lo, k_hi = _head_tile(pk_ptr + b * stride_pk_b, vk_ptr, bk_ptr, rows_n, L, RK, kv_col0,
                                HALF, HEAD_DIM, stride_pk_l, stride_pk_r, stride_vk_r, stride_vk_c,
                                HAS_BK, BLOCK_N, BLOCK_H, BLOCK_R, DOT_F32)
        if ROPE:
            k_lo, k_hi = _rope(k_lo, k_hi, cos_ptr + b * stride_rope_b, sin_ptr + b * stride_rope_b,
                               rows_n, L, HALF, stride_rope_l, stride_rope_d, BLOCK_H)
        v_lo, v_hi = _head_tile(pv_ptr + b * stride_pv_b, vv_ptr, bv_ptr, rows_n, L, RV, kv_col0,
                                HALF, HEAD_DIM, stride_pv_l, stride_pv_r, stride_vv_r, stride_vv_c,
                                HAS_BV, BLOCK_N, BLOCK_H, BLOCK_R, DOT_F32)
        s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        s = _mma(q_lo, tl.trans(k_lo.to(dt)), s, DOT_F32)
        s = _mma(q_hi, tl.trans(k_hi.to(dt)), s, DOT_F32)
        s = s * qk_scale  # log2-domain scores [BLOCK_M, BLOCK_N]

        valid = rows_n[None, :] < L
        if CAUSAL:
            valid = valid & (rows_n[None, :] <= rows_m[:, None])
        if HAS_KPM:
            keep = tl.load(kpm_ptr + b * stride_kpm_b + rows_n * stride_kpm_l, mask=rows_n < L, other=0)
            valid = valid & (keep != 0)[None, :]
        s = tl.where(valid, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: avoid inf - inf
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc_lo = _mma(p.to(dt), v_lo.to(dt), acc_lo * alpha[:, None], DOT_F32)
        acc_hi = _mma(p.to(dt), v_hi.to(dt), acc_hi * alpha[:, None], DOT_F32)
        m_i = m_new

    denom = tl.where(l_i > 0.0, l_i, 1.0)  # fully-masked rows: acc is 0, output 0
    dh = tl.arange(0, BLOCK_H)
    row_ok = rows_m[:, None] < L
    o_rows = o_ptr + b * stride_o_b + rows_m[:, None] * stride_o_l
    lo_cols = h * HEAD_DIM + dh
    hi_cols = h * HEAD_DIM + HALF + dh
    tl.store(o_rows + lo_cols[None, :] * stride_o_c, (acc_lo / denom[:, None]).to(dt),
             mask=row_ok & (dh[None, :] < HALF))
    tl.store(o_rows + hi_cols[None, :] * stride_o_c, (acc_hi / denom[:, None]).to(dt),
             mask=row_ok & (dh[None, :] < HEAD_DIM - HALF))


def _rope_args(
    cos: Tensor | None, sin: Tensor | None, B: int, fallback: Tensor
) -> tuple[Tensor, Tensor, tuple[int, int, int]]:
    """RoPE tables as ``[B, L, hd]`` views sharing one stride triple (dummies without RoPE)."""
    tables = rope_tables(cos, sin, B)
    if tables is None:
        return fallback, fallback, (0, 0, 0)
    cos_t, sin_t = tables
    if cos_t.stride() != sin_t.stride():
        cos_t, sin_t = cos_t.contiguous(), sin_t.contiguous()
    return cos_t, sin_t, cos_t.stride()


def flash_svd_attention(
    pq: Tensor,
    Vq: Tensor,
    bq: Tensor | None,
    pk: Tensor,
    Vk: Tensor,
    bk: Tensor | None,
    pv: Tensor,
    Vv: Tensor,
    bv: Tensor | None,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    causal: bool,
    cos: Tensor | None = None,
    sin: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    block_m: int = 64,
    block_n: int = 64,
    block_r: int = 32,
    num_warps: int = 4,
    out: Tensor | None = None,
) -> Tensor:
    """Fused self-attention from rank-space coefficients (see the module docstring).

    Same contract as the torch twin ``attention_torch.flash_svd_attention``; ``block_*`` are
    the tile sizes (powers of two >= 16).  Returns ``[B, L, H*hd]`` in ``pq.dtype``, written
    into ``out`` when given.
    """
    q = RankProjection(pq, Vq, bq, num_heads)
    k = RankProjection(pk, Vk, bk, num_kv_heads)
    v = RankProjection(pv, Vv, bv, num_kv_heads)
    check_attention(q, k, v, head_dim, cos, sin, key_padding_mask)
    check_triton_dtypes(pq, Vq, bq, pk, Vk, bk, pv, Vv, bv)
    for name, value in (("block_m", block_m), ("block_n", block_n), ("block_r", block_r)):
        _pow2_block(name, value)
    B, L = pq.shape[:2]
    o = output_buffer(pq, num_heads * head_dim, out)  # [B, L, H*hd]
    if B == 0 or L == 0:
        return o
    half = (head_dim + 1) // 2
    cos_t, sin_t, rope_strides = _rope_args(cos, sin, B, pq)
    kpm = pq if key_padding_mask is None else key_padding_mask.to(torch.int8)  # [B, L]
    kpm_strides = (0, 0) if key_padding_mask is None else kpm.stride()
    scale = head_dim**-0.5 if scale is None else scale
    grid = (B * num_heads, triton.cdiv(L, block_m))
    _flashsvd_attention_kernel[grid](
        pq, Vq, Vq if bq is None else bq,
        pk, Vk, Vk if bk is None else bk,
        pv, Vv, Vv if bv is None else bv,
        cos_t, sin_t, kpm, o,
        L, num_heads, num_heads // num_kv_heads, pq.shape[2], pk.shape[2], pv.shape[2],
        head_dim, half, scale * math.log2(math.e),
        *pq.stride(), *Vq.stride(),
        *pk.stride(), *Vk.stride(),
        *pv.stride(), *Vv.stride(),
        *rope_strides, *kpm_strides, *o.stride(),
        HAS_BQ=bq is not None, HAS_BK=bk is not None, HAS_BV=bv is not None,
        ROPE=cos is not None, CAUSAL=causal, HAS_KPM=key_padding_mask is not None,
        DOT_F32=dot_in_f32(pq.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
        BLOCK_H=max(16, triton.next_power_of_2(half)),
        num_warps=num_warps,
    )
    return o
