"""GPTQ: quantise a weight matrix column by column, correcting the remaining columns with the
inverse Hessian of the layer input so the *output* error stays small (Frantar et al., 2022).

``H`` is the (un-normalised or normalised; only ratios matter) Gram matrix ``Σ x xᵀ`` of the
layer input. Rows of ``W`` are independent given ``H``, so fused siblings (q/k/v, gate/up) that
read the same input are quantised in one call by stacking their rows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from compress.algos.quant import Grid, QuantizedWeight, QuantSpec, find_grid, group_grids, pack_grids
from compress.errors import NumericsError


@dataclass
class GPTQStats:
    """What one GPTQ call did: OBS loss (total, per input column in the original column order and
    per output row, float64: BAQ's sensitivities), damping finally used, dead inputs."""

    loss: float
    damp: float
    dead_inputs: int
    column_loss: Tensor | None = None
    row_loss: Tensor | None = None  # float64 [out]: the same losses summed over every column of a row


@dataclass
class MixedQuantizedWeight:
    """GPTQ output with a width per column group (BAQ).

    ``parts`` hold the columns of each width as one :class:`QuantizedWeight` (whole groups, the
    ragged last group last), in the order ``perm`` lists them: column ``j`` of
    ``torch.cat(parts)`` multiplies ``x[perm[j]]``. ``group_bits`` is the width of every group
    (see :func:`gptq_quantize_mixed` for what a group is).
    """

    parts: list[QuantizedWeight]
    perm: Tensor
    group_bits: list[int]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        w = torch.cat([p.dequantize(dtype) for p in self.parts], dim=1)  # (out, in) in perm order
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out


def inverse_cholesky(H: Tensor, percdamp: float, max_tries: int = 6) -> tuple[Tensor, float]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = percdamp·mean(diag H)``.

    On failure (H not positive definite) the damping is multiplied by 10 and retried;
    after ``max_tries`` failures a :class:`NumericsError` names the problem.
    """
    H = H.to(torch.float64)
    mean_diag = float(torch.diagonal(H).mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    damp = percdamp
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                return U, damp
        damp *= 10
    raise NumericsError(f"Hessian is not positive definite even with damping {damp / 10:g}",
                        "use more calibration samples or a larger --damp")


def _block_size(block_size: int, spec: QuantSpec, in_f: int) -> int:
    """Blocks hold whole groups, so a group's grid is always computed from updated columns."""
    if spec.per_channel(in_f):
        return block_size
    g = spec.group_width(in_f)
    return g * max(1, block_size // g)


def gptq_quantize(W: Tensor, H: Tensor, spec: QuantSpec, *, block_size: int = 128,
                  percdamp: float = 0.01, act_order: bool = False,
                  static_groups: bool = False) -> tuple[QuantizedWeight, GPTQStats]:
    """Quantise ``W`` ([out, in]) given the input Gram matrix ``H`` ([in, in]).

    Args:
        W: weight, any float dtype (computed in float32).
        H: input second moment, accumulated in float64 preferably.
        spec: bits, group size, symmetry, scale dtype.
        block_size: columns per lazy batch update.
        percdamp: damping as a fraction of mean(diag H) (raised automatically on failure).
        act_order: process columns by decreasing ``diag(H)``; forces static groups so the
            checkpoint needs no ``g_idx``.
        static_groups: compute every group's grid from the original W before the loop.

    Returns:
        the quantised weight (codes in the original column order) and statistics.
    """
    solved, stats = _solve(W, H, spec, None, block_size, percdamp, act_order or None, static_groups)
    offset = 1 << (spec.bits - 1)
    codes = (solved.codes.to(torch.int16) - offset).to(torch.int8)
    return pack_grids(codes, solved.scales, solved.zeros, spec, solved.perm), stats


def act_order_perm(H: Tensor) -> Tensor:
    """Columns by decreasing Hessian diagonal (dead inputs, diagonal 0, count as 1 as in the solve)."""
    d = torch.diagonal(H).to(torch.float64).clone()
    d[d == 0] = 1.0
    return torch.argsort(d, descending=True)


def group_columns(in_f: int, group_width: int, perm: Tensor | None, device: torch.device) -> list[Tensor]:
    """Original column indices of every group: ``group_width`` consecutive columns of the
    processing order (``perm``, or the original order), the last group ragged when it must be."""
    order = perm.to(device) if perm is not None else torch.arange(in_f, device=device)
    return [order[a:a + group_width] for a in range(0, in_f, group_width)]


def gptq_quantize_mixed(W: Tensor, H: Tensor, spec: QuantSpec, group_bits: list[int], *, block_size: int = 128,
                        percdamp: float = 0.01, act_order: bool = False, static_groups: bool = False,
                        perm: Tensor | None = None) -> tuple[MixedQuantizedWeight, GPTQStats]:
    """GPTQ with its own width for every column group (``spec.bits`` is ignored): each group's
    grid has ``2^bits`` levels and the OBS error feedback runs across groups of different widths
    exactly as inside one width (BAQ).

    Groups are ``spec.group_size`` consecutive columns *of the processing order*: under act-order
    the columns of similar Hessian diagonal share a group (and its width), with grids computed
    from the updated weights as the loop reaches them (GPTQ's dynamic groups); the stored
    permutation makes that free at inference (no ``g_idx``). ``static_groups`` instead groups
    original columns with grids from the original weights. ``perm`` fixes the act-order
    permutation (e.g. the one the allocation was planned with) instead of deriving it from ``H``.

    The codes are regrouped by width for storage (:class:`MixedQuantizedWeight`).
    """
    in_f = W.shape[1]
    n_groups = spec.n_groups(in_f) if not spec.per_channel(in_f) else 1
    if len(group_bits) != n_groups:
        raise ValueError(f"{len(group_bits)} group widths for {n_groups} column groups")
    if perm is None and act_order:
        perm = act_order_perm(H)
    solved, stats = _solve(W, H, spec, list(group_bits), block_size, percdamp, perm, static_groups, permuted=True)
    gw = spec.group_width(in_f)
    cols = group_columns(in_f, gw, None if static_groups else solved.perm, W.device)
    return _regroup(solved, spec, list(group_bits), cols), stats


def gptq_quantize_rows(W: Tensor, H: Tensor, spec: QuantSpec, row_bits: list[int], *, block_size: int = 128,
                       percdamp: float = 0.01, act_order: bool = False,
                       static_groups: bool = False) -> tuple[list[tuple[Tensor, QuantizedWeight]], GPTQStats]:
    """GPTQ with a width per output row (``spec.bits`` is ignored). Rows are independent given the
    Hessian and the column order, so each width's rows are one ordinary GPTQ call — exactly what a
    single call with a per-row grid would compute. Returns ``(rows, quantised rows)`` per width,
    narrowest first, and the statistics of all rows together."""
    if len(row_bits) != W.shape[0]:
        raise ValueError(f"{len(row_bits)} row widths for {W.shape[0]} rows")
    widths = torch.tensor(row_bits, device=W.device)
    parts, loss, dead, damp = [], 0.0, 0, percdamp
    col_loss = torch.zeros(W.shape[1], dtype=torch.float64, device=W.device)
    row_loss = torch.zeros(W.shape[0], dtype=torch.float64, device=W.device)
    for b in sorted(set(row_bits)):
        rows = torch.nonzero(widths == b).flatten()
        qw, st = gptq_quantize(W[rows], H, replace(spec, bits=b), block_size=block_size, percdamp=percdamp,
                               act_order=act_order, static_groups=static_groups)
        parts.append((rows, qw))
        loss, dead, damp = loss + st.loss, st.dead_inputs, max(damp, st.damp)
        col_loss += st.column_loss  # type: ignore[operator]
        row_loss[rows] = st.row_loss  # type: ignore[index]
    return parts, GPTQStats(loss, damp, dead, col_loss, row_loss)


def prepare_problem(W: Tensor, H: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 copy of ``W`` and float64 copy of ``H`` for a GPTQ column loop, with dead inputs
    (zero Hessian diagonal) given a unit diagonal and zero weights; also returns the dead mask.
    Raises :class:`NumericsError` for a NaN/Inf Hessian."""
    if not torch.isfinite(H).all():
        raise NumericsError("the calibration Hessian contains NaN/Inf",
                            "check the model's activations for overflow (try float32)")
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(torch.float64).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H, dead


@dataclass
class _Solved:
    """Unsigned codes ``[out, in]`` (original column order) and one grid per group."""

    codes: Tensor
    scales: list[Tensor]
    zeros: list[Tensor]
    perm: Tensor | None


def _solve(W: Tensor, H: Tensor, spec: QuantSpec, group_bits: list[int] | None, block_size: int,
           percdamp: float, perm: Tensor | bool | None, static_groups: bool,
           permuted: bool = False) -> tuple[_Solved, GPTQStats]:
    """The GPTQ column loop at ``spec.bits``, or with one width per group (``group_bits``).

    ``perm``: the processing order (a permutation), ``True`` for act-order from ``H``, or None.
    Groups are original columns with static grids under act-order (``permuted`` False: what
    :func:`gptq_quantize` stores), or consecutive columns of the processing order with dynamic
    grids (``permuted`` True and not ``static_groups``).
    """
    W, H, dead = prepare_problem(W, H)
    out_f, in_f = W.shape
    act_order = perm is not None and perm is not False
    static = static_groups or (act_order and not permuted)
    gw = spec.group_width(in_f)
    n_groups = -(-in_f // gw)
    bits = group_bits if group_bits is not None else [spec.bits] * n_groups
    specs = {b: replace(spec, bits=b) for b in set(bits)}
    maxqs = [(1 << b) - 1 for b in bits]
    # a per-channel grid (group ≥ row width included) spans every block, so it is fixed up front
    grids = _static_grids(W, spec, bits) if static or spec.per_channel(in_f) else None

    if perm is True:
        perm = torch.argsort(torch.diagonal(H), descending=True)
    elif not act_order:
        perm = None
    if perm is not None:
        perm = perm.to(W.device)
        W, H = W[:, perm], H[perm][:, perm]
    U, damp = inverse_cholesky(H, percdamp)
    U = U.to(torch.float32)

    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=W.device)
    col_loss = torch.empty(in_f, dtype=torch.float64, device=W.device)
    row_loss = torch.zeros(out_f, dtype=torch.float64, device=W.device)
    order = perm.tolist() if perm is not None else list(range(in_f))
    dyn_scales: list[Tensor] = []
    dyn_zeros: list[Tensor] = []
    B = _block_size(block_size, spec, in_f)
    for i1 in range(0, in_f, B):
        i2 = min(i1 + B, in_f)
        W1 = W[:, i1:i2].clone()  # (out, b) updated in place column by column
        Q1 = torch.empty_like(W1)  # unsigned codes of the block
        Err = torch.empty_like(W1)
        Uii = U[i1:i2, i1:i2]
        grid = None
        for i in range(i2 - i1):
            col = i1 + i
            if grids is not None:  # static: the group of the original column
                g = order[col] // gw
                grid = grids[g]
            else:  # dynamic: the group of the processing position
                g = col // gw
                if col % gw == 0:
                    grid = find_grid(W1[:, i:i + gw], specs[bits[g]])
                    dyn_scales.append(grid.scale)
                    dyn_zeros.append(grid.zero)
            w = W1[:, i]
            q = torch.clamp_(torch.round_(w / grid.scale).add_(grid.zero), 0, maxqs[g])  # (out,)
            Q1[:, i] = q
            err = torch.sub(w, (q - grid.zero).mul_(grid.scale)).div_(Uii[i, i])
            Err[:, i] = err
            W1[:, i:].addr_(err, Uii[i, i:], alpha=-1)  # lazy OBS update inside the block
        codes[:, order[i1:i2]] = Q1.to(torch.uint8)
        sq = Err.double() ** 2 / 2  # (out, b) OBS loss of every weight of the block
        col_loss[order[i1:i2]] = sq.sum(dim=0)
        row_loss += sq.sum(dim=1)
        W[:, i2:] -= Err @ U[i1:i2, i2:]

    loss = float(col_loss.sum())  # one device sync per call
    if grids is not None:
        scales, zeros = [g.scale for g in grids], [g.zero for g in grids]
    else:
        scales, zeros = dyn_scales, dyn_zeros
    return _Solved(codes, scales, zeros, perm), GPTQStats(loss, damp, int(dead.sum()), col_loss, row_loss)


def _regroup(solved: _Solved, spec: QuantSpec, group_bits: list[int], cols: list[Tensor]) -> MixedQuantizedWeight:
    """Gather the columns of each width into one part, groups in order inside a part (``cols``:
    the original columns of every group); the part holding the ragged last group goes last,
    since a ragged group must end a segment."""
    in_f = solved.codes.shape[1]
    gw = spec.group_width(in_f)
    last = len(group_bits) - 1
    ragged = in_f % gw != 0
    widths = sorted(set(group_bits), key=lambda b: (ragged and b == group_bits[last], b))
    parts, order = [], []
    for b in widths:
        gs = [g for g, gb in enumerate(group_bits) if gb == b]
        idx = torch.cat([cols[g] for g in gs])
        codes = (solved.codes[:, idx].to(torch.int16) - (1 << (b - 1))).to(torch.int8)  # (out, cols of width b)
        part = pack_grids(codes, [solved.scales[g] for g in gs], [solved.zeros[g] for g in gs], replace(spec, bits=b))
        parts.append(part)
        order.append(idx)
    return MixedQuantizedWeight(parts, torch.cat(order), list(group_bits))


def _static_grids(W: Tensor, spec: QuantSpec, bits: list[int]) -> list[Grid]:
    """One grid per group, computed from the (dead-column-zeroed) original weight at its width."""
    if len(set(bits)) == 1:
        return group_grids(W, replace(spec, bits=bits[0]))
    in_f = W.shape[1]
    gw = spec.group_width(in_f)
    grids: list[Grid | None] = [None] * len(bits)
    for b in set(bits):
        gs = [g for g, gb in enumerate(bits) if gb == b]
        idx = torch.cat([torch.arange(g * gw, min((g + 1) * gw, in_f), device=W.device) for g in gs])
        # the groups of width b side by side (ragged last group, if any, last): grids in that order
        for g, grid in zip(gs, group_grids(W[:, idx], replace(spec, bits=b)), strict=True):
            grids[g] = grid
    return grids  # type: ignore[return-value]


def relative_output_error(W: Tensor, Wq: Tensor, H: Tensor) -> float:
    """‖X(W − Ŵ)ᵀ‖² / ‖XWᵀ‖² computed from ``H = XᵀX`` without touching X."""
    H = H.to(torch.float32)
    D = (W - Wq).to(torch.float32)
    num = float(((D @ H) * D).sum(dtype=torch.float64))
    den = float(((W.to(torch.float32) @ H) * W.to(torch.float32)).sum(dtype=torch.float64))
    return num / den if den > 0 else 0.0
