"""Backend dispatch for FlashSVD attention (Q/K/V rebuilt per tile from rank space).

Triton (``attention_triton``) for CUDA tensors or when ``COMPRESS_KERNELS=triton``; the streaming
torch twin (``attention_torch``) otherwise.  Triton is imported lazily, only when chosen.
"""

from __future__ import annotations

from torch import Tensor

from .._triton import use_triton
from . import attention_torch


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
    out: Tensor | None = None,
) -> Tensor:
    """Self-attention whose Q/K/V are rebuilt tile by tile from rank-space coefficients.

    ``pq = x @ Uq`` ``[B, L, Rq]`` (computed by the caller) with ``Vq [Rq, H*hd]`` and
    ``bq [H*hd]`` or None; k and v likewise with ``Hkv*hd`` columns (GQA: query head ``h`` uses
    kv head ``h // (H / Hkv)``).  ``cos``/``sin`` ``[1 or B, L, hd]`` (HF LLaMA rotary tables,
    rotate_half convention) apply RoPE to q and k.  ``causal`` masks keys after each query;
    ``key_padding_mask [B, L]`` bool (True = keep) masks padded keys; rows with no valid key
    give 0.  ``scale`` defaults to ``hd ** -0.5``.  Returns ``O [B, L, H*hd]`` in ``pq.dtype``
    (before the output projection), written into ``out`` when given.  Full Q/K/V and the
    ``L × L`` scores are never materialised.
    """
    kwargs = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, causal=causal,
                  cos=cos, sin=sin, key_padding_mask=key_padding_mask, scale=scale, out=out)
    if use_triton(pq):
        from . import attention_triton

        return attention_triton.flash_svd_attention(pq, Vq, bq, pk, Vk, bk, pv, Vv, bv, **kwargs)
    return attention_torch.flash_svd_attention(pq, Vq, bq, pk, Vk, bk, pv, Vv, bv, **kwargs)
