"""Plain-torch twins of the quantized matmul kernels (what CPU serving runs).

The twins compute what the Triton kernels compute, ``y = x · dequant(W)ᵀ (+ bias)``, for the
compressed-tensors ``pack-quantized`` layout described in :mod:`compress.kernels.packing`, and for its
lookup-table variant where a code is an unsigned index into a per-layer codebook. They are written
for CPU speed: the matmul never materialises the dense weight but works one code position of the
packed words at a time (see :func:`matmul_dequantized`; the only Python loop is over the
code positions of one period of the stream), and everything runs in fp32 (fp32 BLAS is the fast path on CPUs and gives
fp32 accumulation for fp16/bf16 activations). :func:`dequantize_weight` decodes the whole weight
with one broadcast shift and applies group scales through a ``[N, G, group]`` view. Nothing is
cached between calls.

This module also holds :class:`PackedWeight`, the argument bundle (and its validation) shared
with the Triton launchers, because it must be importable without Triton.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from compress.kernels.packing import SUPPORTED_BITS, code_plane, packed_len, period, unpack_stream

PATHS = ("auto", "gemv", "fused", "dequant")
PLANES_MAX_M = 256
"""Up to this many rows the twin multiplies plane by plane (no dense weight); above it, one
dense dequantisation + one GEMM is faster on CPU (measured: 1.3x at M=512..4096, SmolLM2 shapes)."""
"""Values accepted by the ``path=`` argument of every quantized matmul entry point."""


@dataclass(frozen=True)
class PackedWeight:
    """A packed quantized weight and the metadata needed to decode it.

    ``mode`` is ``"sym"`` (signed codes, no zero point), ``"asym"`` (signed codes minus a packed
    zero point) or ``"lut"`` (unsigned codes indexing ``codebook``).
    """

    packed: Tensor  # int32 [N, ceil(K / (32 // bits))]
    scale: Tensor  # float [N, G]
    zero_point: Tensor | None  # int32 [ceil(N / (32 // bits)), G] or None
    codebook: Tensor | None  # float [2**bits] (one table) or [N, 2**bits] (one per row) for lookup-table weights
    bits: int
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def n_groups(self) -> int:
        return self.scale.shape[1]

    @property
    def mode(self) -> str:
        if self.codebook is not None:
            return "lut"
        return "sym" if self.zero_point is None else "asym"


def make_packed_weight(
    weight_packed: Tensor,
    weight_scale: Tensor,
    weight_zero_point: Tensor | None,
    codebook: Tensor | None,
    *,
    bits: int,
    group_size: int,
    in_features: int,
) -> PackedWeight:
    """Validate the packed-weight arguments and bundle them; raises ``ValueError`` on a mismatch."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size <= 0 or in_features <= 0:
        raise ValueError(f"group_size and in_features must be positive, got {group_size}, {in_features}")
    if weight_packed.dtype != torch.int32 or weight_packed.dim() != 2:
        raise ValueError(
            f"weight_packed must be a 2-D int32 tensor, got {weight_packed.dtype} {tuple(weight_packed.shape)}"
        )
    n_out = weight_packed.shape[0]
    n_groups = -(-in_features // group_size)
    if weight_packed.shape[1] != packed_len(in_features, bits):
        raise ValueError(
            f"weight_packed has {weight_packed.shape[1]} words per row, expected {packed_len(in_features, bits)} "
            f"for in_features={in_features}, bits={bits}"
        )
    if tuple(weight_scale.shape) != (n_out, n_groups) or not weight_scale.is_floating_point():
        raise ValueError(
            f"weight_scale must be a float tensor of shape {(n_out, n_groups)}, got {tuple(weight_scale.shape)}"
        )
    if weight_zero_point is not None:
        expected = (packed_len(n_out, bits), n_groups)
        if weight_zero_point.dtype != torch.int32 or tuple(weight_zero_point.shape) != expected:
            got = tuple(weight_zero_point.shape)
            raise ValueError(f"weight_zero_point must be int32 of shape {expected}, got {got}")
    if codebook is not None and tuple(codebook.shape) not in ((1 << bits,), (n_out, 1 << bits)):
        raise ValueError(f"codebook must have shape {(1 << bits,)} or {(n_out, 1 << bits)}, "
                         f"got {tuple(codebook.shape)}")
    return PackedWeight(weight_packed, weight_scale, weight_zero_point, codebook, bits, group_size, in_features)


def check_activation(x: Tensor, in_features: int) -> None:
    """Raise ``ValueError`` unless ``x`` is a float tensor whose last dim is ``in_features``."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x must have last dim {in_features}, got shape {tuple(x.shape)}")


def check_path(path: str) -> None:
    """Raise ``ValueError`` for an unknown ``path=`` value."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")


def unpack_rows(words: Tensor, bits: int, n: int) -> Tensor:
    """The stored unsigned codes of a row-packed int32 tensor: int32 ``[rows, n]``.

    ``n`` may exceed the codes the words hold; the padding codes past the logical row length
    are returned as 0 (as they are in a well-formed tensor).
    """
    return unpack_stream(words, bits, n)


def unpack_zero_points(zero_point: Tensor, bits: int, out_features: int) -> Tensor:
    """Stored unsigned zero codes, int32 ``[out_features, G]``, from the dim-0 packed layout."""
    return unpack_rows(zero_point.t(), bits, out_features).t()  # [G, words] -> [G, N] -> [N, G]


def _grouped_codes(w: PackedWeight) -> Tensor:
    """Stored codes as int32 ``[N, G, group_size]``, zero-padded past ``in_features``."""
    n_out, n_groups, g = w.out_features, w.n_groups, w.group_size
    padded = n_groups * g
    codes = unpack_rows(w.packed, w.bits, padded)  # zero past the packed stream
    return codes.reshape(n_out, n_groups, g)  # [N, G * g] -> [N, G, g]


def dequantize_weight(w: PackedWeight, dtype: torch.dtype = torch.float32) -> Tensor:
    """Dense ``[N, K]`` weight in ``dtype``, computed in fp32 and rounded once."""
    codes = _grouped_codes(w)  # int32 [N, G, g]
    scale = w.scale.to(torch.float32).unsqueeze(-1)  # [N, G, 1]
    if w.mode == "lut":
        q = _lookup(w.codebook.to(device=codes.device, dtype=torch.float32), codes)
    elif w.mode == "asym":
        zero = unpack_zero_points(w.zero_point, w.bits, w.out_features)  # [N, G]
        q = (codes - zero.unsqueeze(-1)).to(torch.float32)
    else:
        q = codes.to(torch.float32).sub_(1 << (w.bits - 1))
    dense = q.mul_(scale).reshape(w.out_features, -1)  # [N, G, g] -> [N, G * g]
    return dense[:, : w.in_features].to(dtype)


def _lookup(codebook: Tensor, codes: Tensor) -> Tensor:
    """``codebook[codes]`` for int32 codes ``[N, ...]``: one shared ``[2**bits]`` table, or row
    ``n``'s own table of an ``[N, 2**bits]`` codebook (index_select on the flattened table: much
    faster on CPU than advanced indexing or gather)."""
    flat = codes.reshape(codes.shape[0], -1)  # [N, ...] -> [N, J]
    if codebook.dim() == 2:
        rows = torch.arange(codes.shape[0], device=codes.device, dtype=codes.dtype)
        flat = flat + (rows * codebook.shape[1]).unsqueeze(1)
    return codebook.reshape(-1).index_select(0, flat.reshape(-1)).view(codes.shape)


def _period_words(w: PackedWeight) -> Tensor:
    """The packed words as int32 ``[N, periods, words (+ 1)]``: a zero word is appended to each
    period when codes straddle words, so ``word + 1`` is always in range (a view otherwise)."""
    p = period(w.bits)
    if p.words == 1:
        return w.packed.unsqueeze(-1)  # [N, words, 1]: no code straddles
    n_periods = -(-w.packed.shape[1] // p.words)
    packed = F.pad(w.packed, (0, n_periods * p.words - w.packed.shape[1]))
    return F.pad(packed.view(w.out_features, n_periods, p.words), (0, 1))  # [N, periods, words + 1]


def _dequantized_planes(w: PackedWeight) -> Iterator[tuple[int, Tensor]]:
    """For each code position ``j`` of a period: fp32 ``[N, periods]``, the weight columns
    ``period * C + j`` where ``C`` codes fill one period of the stream (``32 // bits`` codes in
    one word for 2/4/8 bits; 32 codes in 3 words for 3 bits, some straddling two words).

    Each plane is a shift-and-mask of the packed words, decoded exactly like
    :func:`dequantize_weight` (``scale * (code - zero)`` or ``scale * codebook[index]``, one fp32
    rounding). One plane exists at a time (``1/C`` of the weight). Columns past ``in_features``
    hold finite junk, to be met by zero activations.
    """
    p = period(w.bits)
    words = _period_words(w)  # [N, periods, words + 1]
    scale = w.scale.to(torch.float32)  # [N, G]
    zero = unpack_zero_points(w.zero_point, w.bits, w.out_features) if w.mode == "asym" else None  # [N, G]
    codebook = w.codebook.to(device=scale.device, dtype=torch.float32) if w.mode == "lut" else None
    first_col = torch.arange(words.shape[1], device=scale.device) * p.codes  # column of code 0 of each period
    same_groups = w.n_groups == 1 or w.group_size % p.codes == 0  # a column's group does not depend on j
    plane_scale, plane_zero = scale, zero  # [N, 1] when there is a single group
    for j in range(p.codes):
        if w.n_groups > 1 and (j == 0 or not same_groups):
            groups = torch.div(first_col + j, w.group_size, rounding_mode="floor").clamp_(max=w.n_groups - 1)
            plane_scale = scale.index_select(1, groups)  # [N, periods]
            plane_zero = zero.index_select(1, groups) if zero is not None else None  # [N, periods]
        codes = code_plane(words[:, :, p.word(j)], words[:, :, p.word(j) + 1] if p.lo(j) < p.bits else None, p, j)  # int32 [N, periods]
        if codebook is not None:
            values = _lookup(codebook, codes)
        else:
            values = codes.sub_(plane_zero if plane_zero is not None else 1 << (w.bits - 1)).to(torch.float32)
        yield j, values.mul_(plane_scale)


def matmul_dequantized(x: Tensor, w: PackedWeight, bias: Tensor | None) -> Tensor:
    """``x · dequant(W)ᵀ + bias`` in fp32, returned in ``x.dtype``, for any leading dims of ``x``.

    Built for CPU speed without materialising the dense weight: with ``C`` codes per period of
    the packed stream, column ``k = period * C + j`` of W lives in "plane" ``j`` (see
    :func:`_dequantized_planes`), so ``x · Wᵀ = Σ_j x[:, j::C] · plane_jᵀ``, one fp32 GEMM of
    depth ``ceil(K / C)`` per plane.
    """
    n_out, k_in, c = w.out_features, w.in_features, period(w.bits).codes
    x2 = x.reshape(-1, k_in).to(torch.float32)  # [..., K] -> [M, K]
    if x2.shape[0] > PLANES_MAX_M:
        y = x2 @ dequantize_weight(w).t()
        if bias is not None:
            y += bias.to(torch.float32)
        return y.to(x.dtype).reshape(*x.shape[:-1], n_out)  # [M, N] -> [..., N]
    m, n_periods = x2.shape[0], -(-w.packed.shape[1] // period(w.bits).words)
    x_planes = F.pad(x2, (0, n_periods * c - k_in)).view(m, n_periods, c)  # [M, periods * C] -> [M, periods, C]
    y = x2.new_zeros((m, n_out)) if bias is None else bias.to(torch.float32).expand(m, n_out).clone()  # [M, N]
    for j, plane in _dequantized_planes(w):
        y.addmm_(x_planes[:, :, j], plane.t())  # [M, periods] @ [periods, N]
    return y.to(x.dtype).reshape(*x.shape[:-1], n_out)  # [M, N] -> [..., N]


def quant_matmul(
    x: Tensor,
    weight_packed: Tensor,
    weight_scale: Tensor,
    weight_zero_point: Tensor | None,
    *,
    bits: int,
    group_size: int,
    in_features: int,
    bias: Tensor | None = None,
    path: str = "auto",
) -> Tensor:
    """Torch twin of :func:`compress.kernels.quant_matmul.quant_matmul`.

    ``path`` is validated for signature parity but every path computes the same thing here:
    dequantize to fp32, then one fp32 matmul.
    """
    check_path(path)
    w = make_packed_weight(
        weight_packed, weight_scale, weight_zero_point, None, bits=bits, group_size=group_size, in_features=in_features
    )
    check_activation(x, in_features)
    return matmul_dequantized(x, w, bias)


def lut_matmul(
    x: Tensor,
    weight_packed: Tensor,
    codebook: Tensor,
    weight_scale: Tensor,
    *,
    bits: int,
    group_size: int,
    in_features: int,
    bias: Tensor | None = None,
    path: str = "auto",
) -> Tensor:
    """Torch twin of :func:`compress.kernels.quant_matmul.lut_matmul` (``path`` as in :func:`quant_matmul`)."""
    check_path(path)
    w = make_packed_weight(
        weight_packed, weight_scale, None, codebook, bits=bits, group_size=group_size, in_features=in_features
    )
    check_activation(x, in_features)
    return matmul_dequantized(x, w, bias)


def dequantize(
    weight_packed: Tensor,
    weight_scale: Tensor,
    weight_zero_point: Tensor | None,
    *,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Torch twin of :func:`compress.kernels.quant_matmul.dequantize`: the dense ``[N, K]`` weight."""
    w = make_packed_weight(
        weight_packed, weight_scale, weight_zero_point, None, bits=bits, group_size=group_size, in_features=in_features
    )
    return dequantize_weight(w, dtype)


def lut_dequantize(
    weight_packed: Tensor,
    codebook: Tensor,
    weight_scale: Tensor,
    *,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Torch twin of :func:`compress.kernels.quant_matmul.lut_dequantize`: the dense ``[N, K]`` weight."""
    w = make_packed_weight(
        weight_packed, weight_scale, None, codebook, bits=bits, group_size=group_size, in_features=in_features
    )
    return dequantize_weight(w, dtype)
