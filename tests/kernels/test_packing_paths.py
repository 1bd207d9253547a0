"""The one-shot unpacking of 2/4/8-bit streams equals the period-by-period decoder on arbitrary
words (sign bits set included), odd shapes, and lengths short of and past the stream."""

from __future__ import annotations

import pytest
import torch

from compress.kernels.packing import _unpack_aligned, _unpack_periods, pack_int32, unpack_stream


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (17, 33), (64, 7), (31, 1)])
def test_aligned_unpack_equals_the_period_decoder(bits: int, shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(bits * 100 + shape[1])
    words = torch.randint(-2**31, 2**31 - 1, shape, generator=g, dtype=torch.int64).to(torch.int32)
    per_row = shape[1] * 32 // bits
    for n in (1, per_row - 1, per_row, per_row + 7):
        fast, slow = _unpack_aligned(words, bits, n), _unpack_periods(words, bits, n)
        assert fast.dtype == slow.dtype == torch.int32 and torch.equal(fast, slow), (bits, shape, n)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_inverts_pack_on_a_ragged_row(bits: int) -> None:
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (5, 37), dtype=torch.int8)
    stored = unpack_stream(pack_int32(codes, bits), bits, 37)
    assert torch.equal(stored - (1 << (bits - 1)), codes.to(torch.int32))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_aligned_unpack_of_a_transposed_view(bits: int) -> None:
    """Zero points are unpacked through ``.t()`` views (stride ≠ 1, one word per row included)."""
    for shape in [(1, 31), (4, 9)]:
        words = torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int64).to(torch.int32).t()
        n = shape[0] * 32 // bits
        assert torch.equal(_unpack_aligned(words, bits, n), _unpack_periods(words, bits, n))
