"""A KV cache that stores FlatQuant's quantised keys and values as codes.

:class:`QuantizedKVCache` is a ``transformers`` cache whose layers keep, per token and head, the
asymmetric codes (two 4-bit codes per byte at ≤ 4 bits, one byte at 8) with an fp32 scale and
zero point, instead of the dequantised tensors: at 4 bits and head_dim 64 a token's head costs
40 bytes instead of 128 in bf16 (256 in fp32). The attention
(:func:`compress.modules.flat_attention.attend`) hands it the codes its quantiser computed, and
gets back the dequantised keys and values of every cached token, identical to the values the
uncached path attends to (``scale · (code − zero)``, the same arithmetic).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

Codes = tuple[Tensor, Tensor, Tensor]  # codes (float, in [0, 2^b − 1]), scale, zero: [b, heads, s, ·]


def pack_codes(q: Tensor, bits: int) -> Tensor:
    """uint8 codes ``[..., d]`` → packed ``[..., ⌈d/2⌉]`` at ≤ 4 bits (low nibble first), else as is."""
    q = q.to(torch.uint8)
    if bits > 4:
        return q
    if q.shape[-1] % 2:
        q = torch.cat([q, q.new_zeros((*q.shape[:-1], 1))], -1)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_codes(p: Tensor, bits: int, d: int) -> Tensor:
    if bits > 4:
        return p
    out = torch.stack([p & 0x0F, p >> 4], -1).reshape(*p.shape[:-1], -1)  # [..., 2·⌈d/2⌉]
    return out[..., :d]


class _Stored:
    """One tensor's packed codes and per-token scales/zeros, grown along the sequence."""

    def __init__(self, bits: int, d: int) -> None:
        self.bits, self.d = bits, d
        self.codes: Tensor | None = None
        self.scale: Tensor | None = None
        self.zero: Tensor | None = None

    def append(self, c: Codes) -> None:
        packed = pack_codes(c[0], self.bits)
        parts = (packed, c[1].float(), c[2].float())
        if self.codes is None:
            self.codes, self.scale, self.zero = parts
        else:
            self.codes = torch.cat([self.codes, parts[0]], -2)
            self.scale = torch.cat([self.scale, parts[1]], -2)
            self.zero = torch.cat([self.zero, parts[2]], -2)

    def decoded(self, dtype: torch.dtype) -> Tensor:
        assert self.codes is not None and self.scale is not None and self.zero is not None
        q = unpack_codes(self.codes, self.bits, self.d).to(self.scale.dtype)
        return (self.scale * (q - self.zero)).to(dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero) if t is not None)


class CodeLayer(DynamicLayer):
    """One layer of :class:`QuantizedKVCache` (codes instead of tensors)."""

    is_croppable = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.k_store: _Stored | None = None
        self.v_store: _Stored | None = None
        self.length = 0

    def update_codes(self, k: Codes, v: Codes, bits: tuple[int, int], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if self.k_store is None:
            self.k_store, self.v_store = _Stored(bits[0], k[0].shape[-1]), _Stored(bits[1], v[0].shape[-1])
            self.is_initialized = True
            self.device = k[0].device
        assert self.v_store is not None
        self.k_store.append(k)
        self.v_store.append(v)
        self.length += k[0].shape[-2]
        return self.k_store.decoded(dtype), self.v_store.decoded(dtype)

    def update(self, key_states: Tensor, value_states: Tensor, *args: object,
               **kwargs: object) -> tuple[Tensor, Tensor]:
        raise RuntimeError("a QuantizedKVCache is filled by FlatQuant's attention (update_codes), "
                           "not with dense keys and values")

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self.k_store = self.v_store = None
        self.length = 0
        self.is_initialized = False

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in (self.k_store, self.v_store) if s is not None)


class QuantizedKVCache(Cache):
    """A ``transformers`` cache of K/V codes for models with FlatQuant's quantised attention."""

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=CodeLayer)

    def update_codes(self, layer_idx: int, k: Codes, v: Codes, bits: tuple[int, int],
                     dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Store layer ``layer_idx``'s new codes; the dequantised keys and values of every token."""
        while len(self.layers) <= layer_idx:
            self.layers.append(CodeLayer())
        return self.layers[layer_idx].update_codes(k, v, bits, dtype)

    def nbytes(self) -> int:
        """Bytes the cached codes, scales and zeros take."""
        return sum(layer.nbytes() for layer in self.layers)
