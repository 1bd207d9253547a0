"""FlatQuant's attention: the K transform after RoPE and a quantised KV cache (model transform
``flatquant-attention``).

Keys are rotated per head after RoPE by a learned ``P_k`` (queries by ``P_k^(−T)``, so
``q kᵀ`` is unchanged), then K and V are quantised per token and per head, asymmetrically
(the reference's KV quantiser: one group per head). Values arrive already transformed: their
``P_v`` is folded into ``v_proj``'s output rows, and ``o_proj``'s input transform undoes it.

:func:`attend` is the attention core shared by the calibration (FlatQuant's trainable block) and
serving; :func:`apply_flat_attention` turns a block's HF attention into one that runs it, with
``kv_quant`` (a :class:`KVQuantizer`) holding the per-block tensors. Quantised K/V enter the
cache: a :class:`compress.modules.kv_cache.QuantizedKVCache` stores their codes, any other cache
the dequantised values (the same numbers).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn

from compress.algos.flatquant import asym_codes, fake_quant_kv
from compress.modules.kinds import register_transform
from compress.modules.kv_cache import Codes, QuantizedKVCache


class KVQuantizer(nn.Module):
    """Per-block K/V quantisation state: ``k_transform`` ``[hd, hd]`` and its inverse transpose
    (absent when keys are not transformed), and the clip multipliers ``k_clip``/``v_clip``
    ``[2]`` (of a token's max and min)."""

    def __init__(self, head_dim: int, k_bits: int, v_bits: int, transform_keys: bool,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.head_dim, self.k_bits, self.v_bits = head_dim, k_bits, v_bits
        kw = {"device": device, "dtype": torch.float32}
        if transform_keys:
            self.register_buffer("k_transform", torch.eye(head_dim, **kw))
            self.register_buffer("k_transform_inv_t", torch.eye(head_dim, **kw))
        else:
            self.k_transform = self.k_transform_inv_t = None
        self.register_buffer("k_clip", torch.ones(2, **kw))
        self.register_buffer("v_clip", torch.ones(2, **kw))

    def _rotated(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        if self.k_transform is not None:
            q = q @ self.k_transform_inv_t.to(q.dtype)
            k = k @ self.k_transform.to(k.dtype)
        return q, k

    def keys(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        q, k = self._rotated(q, k)
        return q, fake_quant_kv(k, self.k_bits, (self.k_clip[0], self.k_clip[1]))

    def values(self, v: Tensor) -> Tensor:
        return fake_quant_kv(v, self.v_bits, (self.v_clip[0], self.v_clip[1]))

    def codes(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Codes, Codes]:
        """The rotated query and the codes of K and V (what :class:`QuantizedKVCache` stores)."""
        q, k = self._rotated(q, k)
        return (q, asym_codes(k, self.k_bits, (self.k_clip[0], self.k_clip[1])),
                asym_codes(v, self.v_bits, (self.v_clip[0], self.v_clip[1])))

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, k_bits={self.k_bits}, v_bits={self.v_bits}"


def _modeling(attn: nn.Module) -> object:
    """The ``transformers`` modelling module of the attention's HF class (llama, qwen2, ...):
    its ``apply_rotary_pos_emb`` and ``eager_attention_forward``."""
    for cls in type(attn).__mro__:
        mod = sys.modules.get(cls.__module__)
        if mod is not None and hasattr(mod, "apply_rotary_pos_emb"):
            return mod
    raise TypeError(f"{type(attn).__name__} is not a rotary-embedding attention")


def attend(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, position_embeddings: tuple[Tensor, Tensor],
           attention_mask: Tensor | None, cache: object, kv: KVQuantizer | Callable, **kwargs: object) -> Tensor:
    """The attention of an HF llama-family ``attn`` on projected ``q``/``k``/``v`` ``[b, s, heads·hd]``,
    with K/V quantised by ``kv`` after RoPE: the ``[b, s, heads·hd]`` input of ``o_proj``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    b, s = q.shape[:2]
    hd = attn.head_dim
    q, k, v = (t.view(b, s, -1, hd) for t in (q, k, v))  # [b, s, heads, hd]
    if hasattr(attn, "q_norm"):  # Qwen3: per-head norms before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads, s, hd]
    cos, sin = position_embeddings
    q, k = _modeling(attn).apply_rotary_pos_emb(q, k, cos, sin)
    if isinstance(cache, QuantizedKVCache) and isinstance(kv, KVQuantizer) and max(kv.k_bits, kv.v_bits) <= 8:
        q, kc, vc = kv.codes(q, k, v)
        k, v = cache.update_codes(attn.layer_idx, kc, vc, (kv.k_bits, kv.v_bits), q.dtype)
    else:
        q, k = kv.keys(q, k)
        v = kv.values(v)
        if cache is not None:
            k, v = cache.update(k, v, attn.layer_idx, kwargs=kwargs)
    impl = attn.config._attn_implementation
    if impl == "eager" or impl not in ALL_ATTENTION_FUNCTIONS:
        fn = _modeling(attn).eager_attention_forward
    else:
        fn = ALL_ATTENTION_FUNCTIONS[impl]
    extra = {"sliding_window": attn.sliding_window} if getattr(attn, "sliding_window", None) else {}
    out, _ = fn(attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling, **extra)
    return out.reshape(b, s, -1).contiguous()


class _FlatAttentionMixin:
    """Forward of a llama-family attention whose K/V go through ``self.kv_quant``."""

    def forward(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor] | None = None,
                attention_mask: Tensor | None = None, cache: object = None, **kwargs: object) -> tuple[Tensor, None]:
        cache = kwargs.pop("past_key_values", None) if cache is None else cache
        kwargs.pop("past_key_value", None)
        out = attend(self, self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states),
                     position_embeddings, attention_mask, cache, self.kv_quant, **kwargs)
        return self.o_proj(out), None


def code_cache(model: nn.Module) -> QuantizedKVCache | None:
    """A fresh :class:`QuantizedKVCache` when ``model`` has FlatQuant's quantised attention."""
    for m in model.modules():
        kv = getattr(m, "kv_quant", None)
        if isinstance(kv, KVQuantizer) and max(kv.k_bits, kv.v_bits) <= 8:
            return QuantizedKVCache()
    return None


_CLASSES: dict[type, type] = {}


def apply_flat_attention(attn: nn.Module, kv: KVQuantizer) -> nn.Module:
    """Make ``attn`` (in place) run :func:`attend` with ``kv`` as its ``kv_quant`` submodule."""
    base = type(attn)
    if base not in _CLASSES and not issubclass(base, _FlatAttentionMixin):
        _CLASSES[base] = type(f"Flat{base.__name__}", (_FlatAttentionMixin, base), {})
    if not isinstance(attn, _FlatAttentionMixin):
        attn.__class__ = _CLASSES[base]
    attn.kv_quant = kv
    return attn


@register_transform("flatquant-attention")
def rebuild_flat_attention(model: nn.Module, t: dict, adapter) -> None:  # noqa: ANN001
    """Give every block's attention its (meta) :class:`KVQuantizer` from the manifest entry."""
    layers = model.get_submodule(adapter.layers)
    for layer in layers:
        attn = layer.get_submodule(adapter.role("attn"))
        apply_flat_attention(attn, KVQuantizer(int(t["head_dim"]), int(t["k_bits"]), int(t["v_bits"]),
                                               bool(t["k_transform"]), device="meta"))
