"""Bit packing for the compressed-tensors ``pack-quantized`` layout.

Layout (what ``transformers`` + ``compressed-tensors`` ≥ 0.20 read; byte-for-byte checked
against ``compressed_tensors``' own ``pack_to_int32`` in the tests):

* codes are *signed* integers in ``[-2^(b-1), 2^(b-1) - 1]``; they are stored as unsigned
  ``code + 2^(b-1)``;
* a row is one dense little-endian bit stream: code ``i`` occupies bits ``[i·b, (i+1)·b)`` of the
  row, bit ``j`` of the stream being bit ``j % 32`` of int32 word ``j // 32``. For b = 2, 4, 8
  that is ``32 // b`` codes per word; for b = 3 a code may straddle two words (32 codes fill
  3 words exactly). The stream is zero-padded to whole words: ``ceil(n·b / 32)`` words per row;
* weights are packed along the input dimension (dim 1): ``weight_packed`` is
  ``int32 [out, ceil(in·b / 32)]``; asymmetric zero points are packed along the output
  dimension (dim 0): ``weight_zero_point`` is ``int32 [ceil(out·b / 32), n_groups]``.

Checkpoints written before format version 2 stored 3-bit codes ten to a word (the top two bits
unused); :func:`repack_legacy` converts them when such a checkpoint is loaded.

Dequantisation is ``w[n, k] = scale[n, k // g] * (code[n, k] - zero[n, k // g])`` where the
zero is 0 for symmetric weights.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
from torch import Tensor

SUPPORTED_BITS = (2, 3, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


@dataclass(frozen=True)
class Period:
    """The repeating unit of a ``bits``-wide stream: ``codes`` codes fill ``words`` int32 words.

    Code ``j`` of a period starts at bit ``j·bits``: in word ``word[j]`` at ``shift[j]``, with
    ``lo[j]`` of its bits there and the remaining ``bits - lo[j]`` at the bottom of the next word.
    """

    bits: int
    codes: int
    words: int

    def word(self, j: int) -> int:
        return (j * self.bits) // 32

    def shift(self, j: int) -> int:
        return (j * self.bits) % 32

    def lo(self, j: int) -> int:
        return min(self.bits, 32 - self.shift(j))


def period(bits: int) -> Period:
    """The period of the dense stream: (16, 1) for 2 bits, (32, 3) for 3, (8, 1) for 4, (4, 1) for 8."""
    _check_bits(bits)
    g = math.gcd(32, bits)
    return Period(bits, 32 // g, bits // g)


def pack_factor(bits: int) -> int:
    """Codes per period of the stream (``32 // bits`` when a code never straddles a word)."""
    return period(bits).codes


def packed_len(n: int, bits: int) -> int:
    """Length of a packed axis holding ``n`` codes: ``ceil(n·bits / 32)`` words."""
    _check_bits(bits)
    return math.ceil(n * bits / 32)


def legacy_packed_len(n: int, bits: int) -> int:
    """Packed length in the format-version-1 layout (``32 // bits`` codes per word, no straddling)."""
    _check_bits(bits)
    return math.ceil(n / (32 // bits))


def _signed_words(words: Tensor) -> Tensor:
    """int64 values in [0, 2^32) → int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_int32(codes: Tensor, bits: int, dim: int = 1) -> Tensor:
    """Pack signed integer codes (any int dtype, 2-D) into the dense int32 stream along ``dim``."""
    if codes.dim() != 2:
        raise ValueError(f"expected a 2-D code tensor, got shape {tuple(codes.shape)}")
    p = period(bits)
    u = codes.to(torch.int64) + (1 << (bits - 1))
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= (1 << bits)):
        raise ValueError(f"codes out of the signed {bits}-bit range")
    if dim == 0:
        u = u.t()
    rows, cols = u.shape
    n_periods = math.ceil(cols / p.codes)
    u = torch.nn.functional.pad(u, (0, n_periods * p.codes - cols))
    u = u.view(rows, n_periods, p.codes)  # [rows, periods, codes per period]
    starts = torch.arange(p.codes, dtype=torch.int64, device=u.device) * bits  # bit offsets in a period
    stream = torch.zeros(rows, n_periods, p.words + 1, dtype=torch.int64, device=u.device)
    # each code's bits land in its word (low part) and, when it straddles, the next word (high
    # part); the parts never overlap, so adding them is OR-ing them
    stream.scatter_add_(2, (starts // 32).expand_as(u), (u << (starts % 32)) & 0xFFFFFFFF)
    stream.scatter_add_(2, (starts // 32 + 1).expand_as(u), u >> (32 - starts % 32))
    words = stream[:, :, : p.words].reshape(rows, -1)[:, : packed_len(cols, bits)]  # [rows, words]
    words = _signed_words(words)
    return words.t().contiguous() if dim == 0 else words.contiguous()


def unpack_int32(words: Tensor, bits: int, n: int, dim: int = 1, signed: bool = True) -> Tensor:
    """Inverse of :func:`pack_int32`: ``n`` codes along ``dim`` as int8 (int16 for unsigned 8-bit)."""
    if words.dtype != torch.int32:
        raise ValueError(f"packed tensor must be int32, got {words.dtype}")
    w = words.t() if dim == 0 else words
    u = unpack_stream(w, bits, n)
    out = u - (1 << (bits - 1)) if signed else u
    out = out.to(torch.int8 if signed else torch.int16)
    return out.t().contiguous() if dim == 0 else out.contiguous()


def unpack_stream(words: Tensor, bits: int, n: int) -> Tensor:
    """The stored unsigned codes of a row-packed int32 stream: int32 ``[rows, n]``.

    ``n`` may exceed the codes the words hold: the missing ones read as 0 (padding).
    """
    if 32 % bits == 0:
        return _unpack_aligned(words, bits, n)
    return _unpack_periods(words, bits, n)


def _unpack_periods(words: Tensor, bits: int, n: int) -> Tensor:
    """:func:`unpack_stream` for any width, one code position of a period at a time."""
    p = period(bits)
    rows, n_words = words.shape
    n_periods = max(math.ceil(n_words / p.words), math.ceil(n / p.codes))
    w = torch.nn.functional.pad(words, (0, n_periods * p.words - n_words))[:, : n_periods * p.words]
    # a period is filled exactly (codes·bits = words·32), so a straddling code's high part is in
    # the same period; the zero word appended keeps ``word + 1`` in range for every code
    ext = torch.nn.functional.pad(w.view(rows, n_periods, p.words), (0, 1))  # [rows, periods, words + 1]
    planes = []
    for j in range(p.codes):
        planes.append(code_plane(ext[:, :, p.word(j)], ext[:, :, p.word(j) + 1], p, j))
    codes = torch.stack(planes, dim=2).reshape(rows, -1)  # [rows, periods * codes]
    return codes[:, :n]


def _unpack_aligned(words: Tensor, bits: int, n: int) -> Tensor:
    """:func:`unpack_stream` for 2, 4 and 8 bits, where no code straddles a word: one shift and
    mask over every word at once (8 bits on a little-endian host: the words' bytes are the codes)."""
    rows, n_words = words.shape
    if bits == 8 and sys.byteorder == "little":
        codes = words.reshape(-1).view(torch.uint8).to(torch.int32).view(rows, -1)  # [rows, words] -> [rows, 4 · words]
    else:
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
        codes = ((words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(rows, -1)  # [rows, words · 32/bits]
    if codes.shape[1] < n:  # codes past the stream read as padding
        codes = torch.nn.functional.pad(codes, (0, n - codes.shape[1]))
    return codes[:, :n]


def code_plane(word: Tensor, next_word: Tensor | None, p: Period, j: int) -> Tensor:
    """Unsigned code ``j`` of every period, from the word it starts in and (only when the code
    straddles, ``p.lo(j) < bits``) the word after it."""
    lo = p.lo(j)
    codes = (word >> p.shift(j)) & ((1 << lo) - 1)  # arithmetic shift: the mask drops sign bits
    if lo < p.bits:
        assert next_word is not None, "a straddling code needs the next word"
        codes = codes | ((next_word & ((1 << (p.bits - lo)) - 1)) << lo)
    return codes


def unpack_legacy(words: Tensor, bits: int, n: int, dim: int = 1) -> Tensor:
    """Signed int8 codes from the format-version-1 layout (``32 // bits`` codes per word)."""
    f = 32 // bits
    w = words.t() if dim == 0 else words
    shifts = torch.arange(f, dtype=torch.int32, device=w.device) * bits
    u = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [rows, words, f]
    out = (u.reshape(w.shape[0], -1)[:, :n] - (1 << (bits - 1))).to(torch.int8)
    return out.t().contiguous() if dim == 0 else out.contiguous()


def repack_legacy(words: Tensor, bits: int, n: int, dim: int = 1) -> Tensor:
    """A format-version-1 packed tensor rewritten in the dense layout (identity for 2/4/8 bits)."""
    if 32 % bits == 0:
        return words
    return pack_int32(unpack_legacy(words, bits, n, dim), bits, dim)


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
