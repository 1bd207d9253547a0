"""Uniform integer quantisation grids (the RTN quantiser shared by RTN and GPTQ).

Conventions (the compressed-tensors ``pack-quantized`` convention, stated once here):

* unsigned codes ``q ∈ [0, 2^b − 1]``, dequantised as ``scale · (q − zero)``;
* symmetric: ``scale = 2·absmax / (2^b − 1)`` (absmax/7.5 at 4 bits) and ``zero = 2^(b−1)``,
  so the stored signed code ``q − 2^(b−1)`` lies in ``[−2^(b−1), 2^(b−1) − 1]``;
* asymmetric: ``scale = (max − min) / (2^b − 1)`` over a range that always contains 0 and
  ``zero = round(−min / scale)``.

Scales are rounded to their storage dtype *before* codes are computed, so what is stored
dequantises to exactly what the algorithm optimised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class QuantSpec:
    """How one weight matrix is quantised.

    Args:
        bits: code width (2, 3, 4 or 8).
        group_size: input columns per scale; None means one scale per output channel.
        symmetric: symmetric (zero fixed at the midpoint) or asymmetric (zero per group).
        mse: search a shrunk clipping range per row that minimises the L2.4 error.
        scale_dtype: dtype the scales are stored in.
    """

    bits: int
    group_size: int | None = None
    symmetric: bool = True
    mse: bool = False
    scale_dtype: torch.dtype = torch.float32

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def n_groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else math.ceil(in_features / self.group_size)

    def group_width(self, in_features: int) -> int:
        """Columns per group for a layer of ``in_features`` inputs (a group never exceeds the row)."""
        return in_features if self.group_size is None else min(self.group_size, in_features)

    def per_channel(self, in_features: int) -> bool:
        """One scale per output row: no group size, or one at least as wide as the row."""
        return self.group_width(in_features) == in_features


@dataclass
class Grid:
    """Per-row quantisation grid: ``scale`` and unsigned ``zero``, both ``[rows]`` float32."""

    scale: Tensor
    zero: Tensor


def _minmax_grid(xmin: Tensor, xmax: Tensor, spec: QuantSpec) -> Grid:
    xmin = torch.minimum(xmin, torch.zeros_like(xmin))
    xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    if spec.symmetric:
        xmax = torch.maximum(-xmin, xmax)
        xmax = torch.where(xmax == 0, torch.ones_like(xmax), xmax)
        scale = 2 * xmax / spec.maxq
        scale = scale.to(spec.scale_dtype).to(torch.float32)
        zero = torch.full_like(scale, float(1 << (spec.bits - 1)))
        return Grid(scale, zero)
    both0 = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both0, -torch.ones_like(xmin), xmin)
    xmax = torch.where(both0, torch.ones_like(xmax), xmax)
    scale = ((xmax - xmin) / spec.maxq).to(spec.scale_dtype).to(torch.float32)
    zero = torch.clamp(torch.round(-xmin / scale), 0, spec.maxq)
    return Grid(scale, zero)


MSE_COARSE_STEP = 4
"""Default stride of the coarse MSE pass (1: the exhaustive search of GPTQ's reference, which
checkpoints written before issue 18 used)."""


def find_grid(w: Tensor, spec: QuantSpec, grid_points: int = 100, max_shrink: float = 0.8,
              coarse_step: int | None = None) -> Grid:
    """Grid for every row of ``w`` ([rows, cols]) from its min/max (optionally MSE-shrunk).

    With ``spec.mse`` each row's clipping range is shrunk by the factor ``p = 1 − i/grid_points``
    (``i < max_shrink · grid_points``) that minimises the L2.4 error of the row, as GPTQ's
    reference does. The search is coarse to fine: every ``coarse_step``-th factor first, then the
    factors within ``coarse_step − 1`` of each row's best (default :data:`MSE_COARSE_STEP`);
    ``coarse_step=1`` is the exhaustive search. The error evaluation (one ``pow`` per element and candidate) is what costs, so this
    evaluates about ``n / coarse_step + 2 · (coarse_step − 1)`` candidates instead of ``n``.
    """
    w = w.float()
    xmin, xmax = w.min(dim=1).values, w.max(dim=1).values
    grid = _minmax_grid(xmin, xmax, spec)
    if not spec.mse:
        return grid
    n = int(max_shrink * grid_points)
    step = max(1, min(MSE_COARSE_STEP if coarse_step is None else coarse_step, n))
    buf = torch.empty_like(w)
    best = torch.full_like(xmin, float("inf"))
    best_i = torch.zeros(w.shape[0], dtype=torch.long, device=w.device)

    def consider(i: Tensor) -> None:  # i: [rows] shrink indices, valid in [0, n)
        p = (1 - i.double() / grid_points).float()  # the shrink factor rounded once, as a Python float would be
        cand = _minmax_grid(p * xmin, p * xmax, spec)
        err = _lp_error(w, cand, spec.maxq, buf)
        better = err < best
        best.copy_(torch.where(better, err, best))
        best_i.copy_(torch.where(better, i, best_i))
        grid.scale = torch.where(better, cand.scale, grid.scale)
        grid.zero = torch.where(better, cand.zero, grid.zero)

    for i in range(0, n, step):
        consider(torch.full_like(best_i, i))
    centre = best_i.clone()
    for d in [d for k in range(1, step) for d in (-k, k)]:
        i = centre + d
        ok = (i >= 0) & (i < n)
        if bool(ok.any()):
            consider(torch.where(ok, i, centre))  # rows out of range re-evaluate their centre: no change
    return grid


def _lp_error(w: Tensor, grid: Grid, maxq: int, buf: Tensor) -> Tensor:
    """Per-row ``Σ |fake_quant(w) − w|^2.4`` (the same arithmetic as :func:`fake_quant`), in ``buf``."""
    scale, zero = grid.scale.unsqueeze(-1), grid.zero.unsqueeze(-1)  # [rows, 1]
    torch.div(w, scale, out=buf)
    buf.round_().add_(zero).clamp_(0, maxq).sub_(zero).mul_(scale).sub_(w).abs_().pow_(2.4)
    return buf.sum(dim=1)


def quantize_codes(w: Tensor, grid: Grid, maxq: int) -> Tensor:
    """Unsigned integer codes (as float) of ``w`` on ``grid`` (broadcast along the last dim)."""
    scale, zero = grid.scale.unsqueeze(-1), grid.zero.unsqueeze(-1)
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize_codes(q: Tensor, grid: Grid) -> Tensor:
    return grid.scale.unsqueeze(-1) * (q - grid.zero.unsqueeze(-1))


def fake_quant(w: Tensor, grid: Grid, maxq: int) -> Tensor:
    """Quantise then dequantise ``w`` on ``grid``."""
    return dequantize_codes(quantize_codes(w, grid, maxq), grid)


@dataclass
class QuantizedWeight:
    """A quantised matrix in the neutral internal schema (converted to a format at export).

    ``codes`` are signed int8 ``[out, in]`` (unsigned code − 2^(b−1)); ``scale`` is
    ``[out, n_groups]`` in the storage dtype; ``zero`` is signed int8 ``[out, n_groups]`` or
    None for symmetric weights; ``perm`` is the act-order permutation used during GPTQ
    (informational: grids are static so no ``g_idx`` is needed at inference).
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor | None
    spec: QuantSpec
    perm: Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        out_f, in_f = self.codes.shape
        gidx = torch.arange(in_f, device=self.codes.device) // self.spec.group_width(in_f)  # (in,)
        q = self.codes.float()
        if self.zero is not None:
            q = q - self.zero.float()[:, gidx]
        return (q * self.scale.float()[:, gidx]).to(dtype)


def group_grids(w: Tensor, spec: QuantSpec) -> list[Grid]:
    """One grid per input-column group of ``w`` ([out, in]), all groups searched at once."""
    out_f, in_f = w.shape
    gw = spec.group_width(in_f)
    full = (in_f // gw) * gw
    grids: list[Grid] = []
    if full:
        blocks = w[:, :full].float().reshape(out_f * (full // gw), gw)  # (out*G, g): one row per group
        g = find_grid(blocks, spec)
        scale, zero = g.scale.reshape(out_f, -1), g.zero.reshape(out_f, -1)  # (out, G)
        grids += [Grid(scale[:, j], zero[:, j]) for j in range(full // gw)]
    if full < in_f:  # ragged last group
        grids.append(find_grid(w[:, full:].float(), spec))
    return grids


def rtn_quantize(w: Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest quantisation of ``w`` ([out, in]) with per-group grids."""
    out_f, in_f = w.shape
    gw = spec.group_width(in_f)
    offset = 1 << (spec.bits - 1)
    grids = group_grids(w, spec)
    codes = torch.empty(out_f, in_f, dtype=torch.int8, device=w.device)
    for j, grid in enumerate(grids):
        block = w[:, j * gw:(j + 1) * gw].float()
        codes[:, j * gw:(j + 1) * gw] = (quantize_codes(block, grid, spec.maxq) - offset).to(torch.int8)
    return pack_grids(codes, [g.scale for g in grids], [g.zero for g in grids], spec)


def pack_grids(codes: Tensor, scales: list[Tensor], zeros: list[Tensor], spec: QuantSpec,
               perm: Tensor | None = None) -> QuantizedWeight:
    """Assemble per-group grids (lists of ``[out]`` tensors) into a :class:`QuantizedWeight`."""
    scale = torch.stack(scales, dim=1).to(spec.scale_dtype)  # (out, G)
    zero = None
    if not spec.symmetric:
        zero = (torch.stack(zeros, dim=1) - (1 << (spec.bits - 1))).to(torch.int8)  # (out, G)
    return QuantizedWeight(codes, scale, zero, spec, perm)


def split_rows(qw: QuantizedWeight, sizes: list[int]) -> list[QuantizedWeight]:
    """Split a row-stacked quantised matrix (fused siblings) back into its members."""
    out, start = [], 0
    for n in sizes:
        sl = slice(start, start + n)
        zero = None if qw.zero is None else qw.zero[sl]
        out.append(QuantizedWeight(qw.codes[sl], qw.scale[sl], zero, qw.spec, qw.perm))
        start += n
    return out
