"""BAQ bit allocation (Zhang et al., arXiv 2506.05664): spend an average-bit budget where GPTQ's own
losses say it buys the most.

Loss model: a group ``g`` of ``n_g`` weights quantised at ``b`` bits costs
``L_g(b) = n_g · c_g · 2^(−θ·b)``, with ``c_g`` the group's per-weight OBS loss measured by GPTQ at
a reference width ``b_ref`` (``c_g = ℓ_g / n_g · 2^(θ·b_ref)``). Minimising ``Σ_g L_g`` subject to
``Σ_g n_g b_g = R̄ · Σ_g n_g`` has the closed form (θ = 2 is the Lagrangian's; the paper uses 1.95)

    R_g = R̄ + (1/θ) · log₂(c_g / geomean_n(c)),

under which every group has the same per-weight loss ``c_g · 2^(−θ R_g)`` ("equal loss").

Real kernels store a few widths only, so the continuous ``R_g`` is projected onto a set of
choices (default 2, 3, 4, 8 bits): rounded to the nearest choice, then repaired greedily on the
same loss model until the realised average lies within a tolerance below the budget — the
reference implementation rounds level counts and lets the rate drift instead.

Pure functions: tensors in, tensors out, float64, on the device of the inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

#: the paper's exponent of the rate–loss model (its code hard-codes 1.95)
THETA = 1.95


def group_sensitivity(column_loss: Tensor, rows: int, group_width: int, ref_bits: int,
                      theta: float = THETA) -> Tensor:
    """Per-weight sensitivity ``c_g`` of every group of ``group_width`` consecutive columns
    (the last may be ragged) from GPTQ's per-column OBS losses at ``ref_bits``.

    Args:
        column_loss: ``[in]`` losses of one (row-stacked) weight; rows: its output rows.
    """
    loss = column_loss.to(torch.float64)
    in_f = loss.shape[0]
    n_groups = -(-in_f // group_width)
    padded = torch.zeros(n_groups * group_width, dtype=torch.float64, device=loss.device)
    padded[:in_f] = loss
    per_group = padded.view(n_groups, group_width).sum(dim=1)  # (G,) summed column losses
    cols = torch.full((n_groups,), float(group_width), dtype=torch.float64, device=loss.device)
    cols[-1] = in_f - (n_groups - 1) * group_width
    return per_group / (cols * rows) * 2.0 ** (theta * ref_bits)


def row_block_sensitivity(row_loss: Tensor, in_features: int, sizes: list[int], block: int, ref_bits: int,
                          theta: float = THETA) -> tuple[Tensor, Tensor]:
    """Per-weight sensitivity of every block of ``block`` output rows (cut inside each sibling of
    ``sizes`` rows, the last block of a sibling ragged) from GPTQ's per-row OBS losses at
    ``ref_bits``; returns it and the rows of every block."""
    loss = row_loss.to(torch.float64)
    sums, counts, start = [], [], 0
    for size in sizes:
        for a in range(0, size, block):
            b = min(a + block, size)
            sums.append(loss[start + a:start + b].sum())
            counts.append(b - a)
        start += size
    rows = torch.tensor(counts, dtype=torch.float64, device=loss.device)
    return torch.stack(sums) / (rows * in_features) * 2.0 ** (theta * ref_bits), rows


def closed_form_bits(c: Tensor, n: Tensor, budget: float, theta: float = THETA) -> Tensor:
    """``R_g = R̄ + (1/θ)·log₂(c_g / geomean(c))`` with the geometric mean weighted by ``n``
    (weights per group), so that ``Σ n_g R_g = R̄ Σ n_g`` exactly. Zero sensitivities (dead
    inputs) are floored at 1e-12 of the largest so the logarithm stays finite."""
    c = c.to(torch.float64)
    n = n.to(torch.float64)
    return budget + torch.log2(_floored(c) / _geomean(c, n)) / theta


def _floored(c: Tensor) -> Tensor:
    return c.clamp_min(float(c.max()) * 1e-12 if float(c.max()) > 0 else 1e-300)


def _geomean(c: Tensor, n: Tensor) -> Tensor:
    """Geometric mean of ``c`` weighted by ``n`` (zeros floored, see :func:`closed_form_bits`)."""
    return torch.exp2((n * torch.log2(_floored(c))).sum() / n.sum())


def predicted_loss(c: Tensor, n: Tensor, bits: Tensor, theta: float = THETA) -> Tensor:
    """``L_g(b_g) = n_g c_g 2^(−θ b_g)`` per group."""
    return n.to(torch.float64) * c.to(torch.float64) * torch.exp2(-theta * bits.to(torch.float64))


@dataclass
class Allocation:
    """Widths per group, the realised average and the model's predicted loss."""

    bits: Tensor  # (G,) int64
    realized: float
    predicted: float
    moves: int  # greedy repair steps after rounding


def allocate(c: Tensor, n: Tensor, budget: float, choices: tuple[int, ...], *, theta: float = THETA,
             scopes: Tensor | None = None, tol: float = 0.01) -> Allocation:
    """Project the closed form onto ``choices`` and hit ``budget`` (average bits per weight).

    Args:
        c: ``[G]`` per-weight sensitivities; n: ``[G]`` weights per group.
        scopes: ``[G]`` ints: the closed form's geometric mean is taken inside each scope (the
            paper: one layer); None = one scope over every group.
        tol: the realised average must end in ``[budget − tol, budget]``.

    Raises:
        ValueError: the budget lies outside the choices, or the groups are too coarse to come
            within ``tol`` of it (the nearest realisable average is named).
    """
    ch = sorted(set(choices))
    if not ch[0] <= budget <= ch[-1]:
        raise ValueError(f"an average of {budget:g} bits is outside the choices {ch[0]}..{ch[-1]}")
    c = c.to(torch.float64)
    n = n.to(torch.float64)
    raw = c
    if scopes is None:
        R = closed_form_bits(c, n, budget, theta)
    else:  # each scope's losses in units of its own geometric mean: the repair then weighs every
        # scope alike (the closed form is unchanged by that scaling)
        R, c = torch.empty_like(c), c.clone()
        for s in torch.unique(scopes):
            m = scopes == s
            R[m] = closed_form_bits(c[m], n[m], budget, theta)
            c[m] = raw[m] / _geomean(raw[m], n[m])
    table = torch.tensor(ch, dtype=torch.float64, device=c.device)
    idx = (R.unsqueeze(1) - table).abs().argmin(dim=1)  # (G,) nearest choice
    idx, moves = _repair(idx, table, c, n, budget, theta)
    bits = table[idx]
    realized = float((n * bits).sum() / n.sum())
    if realized < budget - tol - 1e-12:  # coarse groups: the greedy strands bits; solve the knapsack exactly
        losses = predicted_loss(c.unsqueeze(1), n.unsqueeze(1), table.unsqueeze(0), theta)  # (G, K)
        costs = n.unsqueeze(1) * table.unsqueeze(0)  # (G, K) bits
        exact = knapsack(costs, losses, budget * float(n.sum()), floor=(budget - tol) * float(n.sum()))
        if exact is not None:
            idx, bits = exact, table[exact]
            realized = float((n * bits).sum() / n.sum())
    if not budget - tol - 1e-12 <= realized <= budget + 1e-12:
        raise ValueError(f"the groups are too coarse for an average of {budget:g} ± {tol:g} bits "
                         f"(nearest: {realized:.4f})")
    return Allocation(bits.to(torch.int64), realized, float(predicted_loss(raw, n, bits, theta).sum()), moves)


def _repair(idx: Tensor, table: Tensor, c: Tensor, n: Tensor, budget: float, theta: float) -> tuple[Tensor, int]:
    """Greedy repair on the loss model: while over the budget, take the step down that costs the
    least loss per bit saved; then, while some step up still fits, the one that buys the most loss
    per bit spent. Every step moves one group to the neighbouring choice."""
    idx = idx.clone()
    total = float(n.sum())
    spent = float((n * table[idx]).sum())
    cap = budget * total * (1 + 1e-12)
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=c.device)
    moves = 0
    k = len(table)
    while spent > cap:
        down = (idx - 1).clamp_min(0)
        saved = n * (table[idx] - table[down])  # (G,) bits saved by one step down
        cost = predicted_loss(c, n, table[down], theta) - predicted_loss(c, n, table[idx], theta)
        ratio = torch.where(saved > 0, cost / saved.clamp_min(1e-30), inf)
        g = int(ratio.argmin())
        if not torch.isfinite(ratio[g]):
            break
        idx[g] -= 1
        spent -= float(saved[g])
        moves += 1
    while True:
        up = (idx + 1).clamp_max(k - 1)
        extra = n * (table[up] - table[idx])
        gain = predicted_loss(c, n, table[idx], theta) - predicted_loss(c, n, table[up], theta)
        fits = (extra > 0) & (spent + extra <= cap)
        ratio = torch.where(fits, gain / extra.clamp_min(1e-30), -inf)
        g = int(ratio.argmax())
        if not bool(fits[g]):
            return idx, moves
        idx[g] += 1
        spent += float(extra[g])
        moves += 1


def knapsack(costs: Tensor, values: Tensor, capacity: float, floor: float = 0.0,
             max_cells: int = 1 << 27) -> Tensor | None:
    """Multiple-choice knapsack: one option per row of ``costs``/``values`` (``[G, K]``) minimising
    ``Σ values`` with ``floor ≤ Σ costs ≤ capacity``, solved exactly by dynamic programming over
    costs in units of their greatest common divisor (costs must be integers). None when the table
    would exceed ``max_cells`` (G × capacity units) or nothing fits."""
    ic = costs.round().to(torch.int64)
    unit = 0
    for v in torch.unique(ic).tolist():
        unit = math.gcd(unit, int(v))
    unit = max(unit, 1)
    ic = ic // unit
    cap = int(capacity // unit)
    G, K = ic.shape
    if G * (cap + 1) > max_cells:
        return None
    inf = float("inf")
    dp = torch.full((cap + 1,), inf, dtype=torch.float64, device=values.device)  # best loss at exact cost
    dp[0] = 0.0
    choice = torch.empty(G, cap + 1, dtype=torch.int8, device=values.device)
    for g in range(G):
        new = torch.full_like(dp, inf)
        arg = torch.zeros(cap + 1, dtype=torch.int8, device=values.device)
        for k in range(K):
            w = int(ic[g, k])
            if w > cap:
                continue
            cand = torch.full_like(dp, inf)
            cand[w:] = dp[: cap + 1 - w] + values[g, k]
            better = cand < new
            new = torch.where(better, cand, new)
            arg = torch.where(better, torch.tensor(k, dtype=torch.int8, device=arg.device), arg)
        dp, choice[g] = new, arg
    lo = min(cap, max(0, math.ceil(floor / unit - 1e-9)))
    if not torch.isfinite(dp[lo:]).any():
        return None
    at = lo + int(torch.argmin(dp[lo:]))
    out = torch.empty(G, dtype=torch.int64, device=values.device)
    for g in range(G - 1, -1, -1):
        k = int(choice[g, at])
        out[g] = k
        at -= int(ic[g, k])
    return out
