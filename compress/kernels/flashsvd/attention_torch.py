"""Streaming torch twin of FlashSVD attention: Q/K/V rebuilt chunk by chunk from rank space.

The caller passes rank-space coefficients ``pq = x @ Uq`` (``[B, L, Rq]``) and the factor
``Vq [Rq, H*hd]`` (same for k/v with ``Hkv*hd`` columns).  This twin walks query chunks of
``chunk_q`` rows; for each it rebuilds that Q chunk, then walks key chunks of ``chunk_k`` rows,
rebuilding K and V for the chunk (RoPE applied to q/k when ``cos``/``sin`` are given) and folding
the scores into an online softmax (running max and denominator, the FlashAttention
recurrence).  Peak activation memory is ``O(B*H*chunk_q*chunk_k + B*H*chunk*hd)``: neither the
full ``[B, H, L, hd]`` Q/K/V nor the ``L × L`` scores are ever built.

Numerics: half-precision inputs are computed in float32; float32/float64 in their own
precision.  Output ``[B, L, H*hd]`` in ``pq.dtype``.  Rows whose keys are all masked give 0.

This module also holds the argument checks shared with the Triton launcher (it never imports
Triton).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .ffn_torch import compute_dtype

DEFAULT_CHUNK_Q = 128
DEFAULT_CHUNK_K = 128


@dataclass(frozen=True)
class RankProjection:
    """One rank-space projection: coefficients ``p [B, L, R]``, factor ``V [R, heads*hd]``, bias."""

    p: Tensor
    V: Tensor
    b: Tensor | None
    heads: int


def check_attention(
    q: RankProjection,
    k: RankProjection,
    v: RankProjection,
    head_dim: int,
    cos: Tensor | None,
    sin: Tensor | None,
    key_padding_mask: Tensor | None,
) -> None:
    """Validate shapes for ``flash_svd_attention``; raise ``ValueError`` naming the bad input."""
    if q.p.dim() != 3:
        raise ValueError(f"pq must be [B, L, Rq], got {tuple(q.p.shape)}")
    if q.heads % k.heads != 0:
        raise ValueError(f"num_heads={q.heads} is not a multiple of num_kv_heads={k.heads}")
    B, L = q.p.shape[:2]
    for name, proj in (("q", q), ("k", k), ("v", v)):
        _check_projection(name, proj, B, L, head_dim)
    _check_rope(cos, sin, B, L, head_dim)
    if key_padding_mask is not None and (
        key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, L)
    ):
        raise ValueError(f"key_padding_mask must be bool [{B}, {L}], got "
                         f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")


def _check_projection(name: str, proj: RankProjection, B: int, L: int, head_dim: int) -> None:
    """Shape checks for one of the q/k/v projections."""
    width = proj.heads * head_dim
    if proj.p.dim() != 3 or tuple(proj.p.shape[:2]) != (B, L):
        raise ValueError(f"p{name} must be [B={B}, L={L}, R], got {tuple(proj.p.shape)}")
    if proj.V.dim() != 2 or tuple(proj.V.shape) != (proj.p.shape[2], width):
        raise ValueError(f"V{name} must be [R={proj.p.shape[2]}, {width}], got {tuple(proj.V.shape)}")
    if proj.b is not None and tuple(proj.b.shape) != (width,):
        raise ValueError(f"b{name} must be [{width}], got {tuple(proj.b.shape)}")


def _check_rope(cos: Tensor | None, sin: Tensor | None, B: int, L: int, head_dim: int) -> None:
    """RoPE tables: both or neither, ``[1 or B, L, hd]`` (or ``[L, hd]``), even ``hd``."""
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must be given together")
    if cos is None or sin is None:
        return
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    for name, t in (("cos", cos), ("sin", sin)):
        ok_2d = t.dim() == 2 and tuple(t.shape) == (L, head_dim)
        ok_3d = t.dim() == 3 and t.shape[0] in (1, B) and tuple(t.shape[1:]) == (L, head_dim)
        if not (ok_2d or ok_3d):
            raise ValueError(f"{name} must be [1 or {B}, {L}, {head_dim}], got {tuple(t.shape)}")


def rope_tables(cos: Tensor | None, sin: Tensor | None, B: int) -> tuple[Tensor, Tensor] | None:
    """RoPE tables broadcast to ``[B, L, hd]`` (views, no copy), or None without RoPE."""
    if cos is None or sin is None:
        return None
    cos = cos if cos.dim() == 3 else cos.unsqueeze(0)  # [L, hd] -> [1, L, hd]
    sin = sin if sin.dim() == 3 else sin.unsqueeze(0)  # [L, hd] -> [1, L, hd]
    return cos.expand(B, -1, -1), sin.expand(B, -1, -1)  # [B, L, hd]


def output_buffer(pq: Tensor, width: int, out: Tensor | None) -> Tensor:
    """The ``[B, L, H*hd]`` result buffer in ``pq.dtype`` (``out`` if given, else fresh)."""
    shape = (*pq.shape[:2], width)
    if out is None:
        return torch.empty(shape, dtype=pq.dtype, device=pq.device)
    if tuple(out.shape) != shape or out.dtype != pq.dtype:
        raise ValueError(f"out must be {pq.dtype} {shape}, got {out.dtype} {tuple(out.shape)}")
    return out


def rotate_half(x: Tensor) -> Tensor:
    """HF LLaMA's ``rotate_half``: ``cat(-x2, x1)`` over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rebuild(
    proj: RankProjection,
    l0: int,
    l1: int,
    head_dim: int,
    rope: tuple[Tensor, Tensor] | None,
    dt: torch.dtype,
) -> Tensor:
    """Rows ``[l0, l1)`` of one projection, per head: ``[B, heads, l1 - l0, hd]`` (RoPE'd)."""
    B = proj.p.shape[0]
    y = proj.p[:, l0:l1].to(dt) @ proj.V.to(dt)  # [B, c, heads*hd]
    if proj.b is not None:
        y = y + proj.b.to(dt)
    y = y.view(B, l1 - l0, proj.heads, head_dim).transpose(1, 2)  # [B, heads, c, hd]
    if rope is None:
        return y
    cos = rope[0][:, l0:l1].to(dt).unsqueeze(1)  # [B, 1, c, hd]
    sin = rope[1][:, l0:l1].to(dt).unsqueeze(1)  # [B, 1, c, hd]
    return y * cos + rotate_half(y) * sin


def _valid(
    q0: int,
    q1: int,
    k0: int,
    k1: int,
    causal: bool,
    key_padding_mask: Tensor | None,
    device: torch.device,
) -> Tensor | None:
    """Which (query, key) pairs may attend, broadcastable to ``[B, Hkv, G, cq, ck]``."""
    valid: Tensor | None = None
    if causal:
        qi = torch.arange(q0, q1, device=device)
        ki = torch.arange(k0, k1, device=device)
        valid = ki[None, :] <= qi[:, None]  # [cq, ck]
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, None, k0:k1]  # [B, 1, 1, 1, ck]
        valid = keep if valid is None else keep & valid
    return valid


@dataclass
class _OnlineSoftmax:
    """Running state of one query chunk: max ``m``, denominator ``l``, unnormalised output."""

    m: Tensor  # [B, Hkv, G, cq]
    l: Tensor  # [B, Hkv, G, cq]
    acc: Tensor  # [B, Hkv, G, cq, hd]

    def update(self, scores: Tensor, v: Tensor) -> None:
        """Fold one key chunk: ``scores [B, Hkv, G, cq, ck]`` (masked = -inf), ``v [B, Hkv, 1, ck, hd]``."""
        m_new = torch.maximum(self.m, scores.amax(dim=-1))
        m_safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
        alpha = torch.exp(self.m - m_safe)  # 0 while nothing was seen (m = -inf)
        p = torch.exp(scores - m_safe.unsqueeze(-1))  # masked keys -> exactly 0
        self.l = self.l * alpha + p.sum(dim=-1)
        self.acc = self.acc * alpha.unsqueeze(-1) + p @ v
        self.m = m_new

    def result(self) -> Tensor:
        """Normalised output; rows that saw no valid key are 0 rather than NaN."""
        denom = torch.where(self.l > 0, self.l, torch.ones_like(self.l))
        return self.acc / denom.unsqueeze(-1)


def _attend_chunk(
    q: Tensor,
    q0: int,
    k: RankProjection,
    v: RankProjection,
    *,
    head_dim: int,
    causal: bool,
    rope: tuple[Tensor, Tensor] | None,
    key_padding_mask: Tensor | None,
    scale: float,
    chunk_k: int,
) -> Tensor:
    """Attention output for one query chunk ``q [B, Hkv, G, cq, hd]``; same shape back."""
    B, Hkv, G, cq, _ = q.shape
    L = k.p.shape[1]
    state = _OnlineSoftmax(
        m=torch.full((B, Hkv, G, cq), float("-inf"), dtype=q.dtype, device=q.device),
        l=torch.zeros(B, Hkv, G, cq, dtype=q.dtype, device=q.device),
        acc=torch.zeros_like(q),
    )
    k_end = min(L, q0 + cq) if causal else L  # causal: keys past the last query are skipped
    for k0 in range(0, k_end, chunk_k):
        k1 = min(k_end, k0 + chunk_k)
        kc = _rebuild(k, k0, k1, head_dim, rope, q.dtype).unsqueeze(2)  # [B, Hkv, 1, ck, hd]
        vc = _rebuild(v, k0, k1, head_dim, None, q.dtype).unsqueeze(2)  # [B, Hkv, 1, ck, hd]
        scores = (q @ kc.transpose(-1, -2)) * scale  # [B, Hkv, G, cq, ck]
        valid = _valid(q0, q0 + cq, k0, k1, causal, key_padding_mask, q.device)
        if valid is not None:
            scores = scores.masked_fill(~valid, float("-inf"))
        state.update(scores, vc)
    return state.result()


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
    chunk_q: int = DEFAULT_CHUNK_Q,
    chunk_k: int = DEFAULT_CHUNK_K,
    out: Tensor | None = None,
) -> Tensor:
    """Self-attention from rank-space coefficients, streamed over query and key chunks.

    ``pq = x @ Uq`` ``[B, L, Rq]`` with ``Vq [Rq, H*hd]``, ``bq [H*hd]`` (k/v likewise with
    ``Hkv*hd`` columns; query head ``h`` reads kv head ``h // (H / Hkv)``).  ``cos``/``sin``
    (``[1 or B, L, hd]``, HF LLaMA's rotary tables, rotate_half convention) apply RoPE to q and
    k.  ``causal`` masks keys after the query; ``key_padding_mask [B, L]`` (True = keep) masks
    padded keys; fully-masked rows give 0.  ``scale`` defaults to ``hd ** -0.5``.  Returns
    ``[B, L, H*hd]`` in ``pq.dtype`` (written into ``out`` when given).
    """
    q = RankProjection(pq, Vq, bq, num_heads)
    k = RankProjection(pk, Vk, bk, num_kv_heads)
    v = RankProjection(pv, Vv, bv, num_kv_heads)
    check_attention(q, k, v, head_dim, cos, sin, key_padding_mask)
    if chunk_q < 1 or chunk_k < 1:
        raise ValueError(f"chunk sizes must be positive, got chunk_q={chunk_q}, chunk_k={chunk_k}")
    B, L = pq.shape[:2]
    G = num_heads // num_kv_heads
    dt = compute_dtype(pq.dtype)
    rope = rope_tables(cos, sin, B)
    result = output_buffer(pq, num_heads * head_dim, out)  # [B, L, H*hd]
    scale = head_dim**-0.5 if scale is None else scale
    for q0 in range(0, L, chunk_q):
        q1 = min(L, q0 + chunk_q)
        qc = _rebuild(q, q0, q1, head_dim, rope, dt)  # [B, H, cq, hd]
        qc = qc.view(B, num_kv_heads, G, q1 - q0, head_dim)  # head h = hk * G + g
        oc = _attend_chunk(qc, q0, k, v, head_dim=head_dim, causal=causal, rope=rope,
                           key_padding_mask=key_padding_mask, scale=scale, chunk_k=chunk_k)
        oc = oc.reshape(B, num_heads, q1 - q0, head_dim).transpose(1, 2)  # [B, cq, H, hd]
        result[:, q0:q1] = oc.reshape(B, q1 - q0, num_heads * head_dim)  # [B, cq, H*hd]
    return result
