"""Bit packing for the compressed-tensors ``pack-quantized`` layout.

Layout (what ``transformers`` + ``compressed-tensors`` and vLLM read):

* codes are *signed* integers in ``[-2^(b-1), 2^(b-1) - 1]``; they are stored as unsigned
  ``code + 2^(b-1)``;
* ``32 // b`` codes share one int32 word, the lowest index in the lowest bits; a row whose
  length is not a multiple of ``32 // b`` is zero-padded (for b = 3 that is 10 codes per word,
  the top two bits unused);
* weights are packed along the input dimension (dim 1): ``weight_packed`` is
  ``int32 [out, ceil(in / (32 // b))]``; asymmetric zero points are packed along the output
  dimension (dim 0): ``weight_zero_point`` is ``int32 [ceil(out / (32 // b)), n_groups]``.

Dequantisation is ``w[n, k] = scale[n, k // g] * (code[n, k] - zero[n, k // g])`` where the
zero is 0 for symmetric weights.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SUPPORTED_BITS = (2, 3, 4, 8)


def pack_factor(bits: int) -> int:
    """Number of ``bits``-wide codes that share one int32 word."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return 32 // bits


def packed_len(n: int, bits: int) -> int:
    """Length of a packed axis holding ``n`` codes."""
    return math.ceil(n / pack_factor(bits))


def pack_int32(codes: Tensor, bits: int, dim: int = 1) -> Tensor:
    """Pack signed integer codes (any int dtype, 2-D) into int32 words along ``dim``."""
    if codes.dim() != 2:
        raise ValueError(f"expected a 2-D code tensor, got shape {tuple(codes.shape)}")
    f = pack_factor(bits)
    offset = 1 << (bits - 1)
    u = (codes.to(torch.int64) + offset)
    if int(u.min()) < 0 or int(u.max()) >= (1 << bits):
        raise ValueError(f"codes out of the signed {bits}-bit range")
    if dim == 0:
        u = u.t()
    rows, cols = u.shape
    pad = packed_len(cols, bits) * f - cols
    u = torch.nn.functional.pad(u, (0, pad))
    u = u.view(rows, -1, f)  # (rows, words, f)
    shifts = torch.arange(f, dtype=torch.int64, device=u.device) * bits
    words = (u << shifts).sum(dim=2)  # (rows, words) in [0, 2^32)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.t().contiguous() if dim == 0 else words.contiguous()


def unpack_int32(words: Tensor, bits: int, n: int, dim: int = 1, signed: bool = True) -> Tensor:
    """Inverse of :func:`pack_int32`: ``n`` codes along ``dim`` as int8 (int16 for unsigned 8-bit)."""
    if words.dtype != torch.int32:
        raise ValueError(f"packed tensor must be int32, got {words.dtype}")
    f = pack_factor(bits)
    w = words.t() if dim == 0 else words
    shifts = torch.arange(f, dtype=torch.int32, device=w.device) * bits
    mask = (1 << bits) - 1
    u = (w.unsqueeze(-1) >> shifts) & mask  # (rows, words, f); arithmetic shift is masked
    u = u.reshape(w.shape[0], -1)[:, :n]
    out = u - (1 << (bits - 1)) if signed else u
    out = out.to(torch.int8 if signed else torch.int16)
    return out.t().contiguous() if dim == 0 else out.contiguous()


def group_index(in_features: int, group_size: int, device: torch.device | None = None) -> Tensor:
    """Group id of every input column (the last group may be ragged)."""
    return torch.arange(in_features, device=device) // group_size


def dequantize_packed(
    weight_packed: Tensor,
    weight_scale: Tensor,
    weight_zero_point: Tensor | None,
    bits: int,
    group_size: int,
    shape: tuple[int, int],
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Rebuild the dense ``[out, in]`` weight from the packed layout (slow, obvious reference)."""
    out_f, in_f = shape
    q = unpack_int32(weight_packed, bits, in_f).to(torch.float32)  # (out, in)
    gidx = group_index(in_f, group_size, q.device)
    scale = weight_scale.to(torch.float32)[:, gidx]  # (out, in)
    if weight_zero_point is not None:
        z = unpack_int32(weight_zero_point, bits, out_f, dim=0).to(torch.float32)
        q = q - z[:, gidx]
    return (q * scale).to(dtype)
