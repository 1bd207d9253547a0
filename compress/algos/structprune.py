"""StructPrune math (Song, Bai, Zhao; arXiv 2510.03246): group scores, the structured mask,
the layer-wise allocation and the reconstruction of the kept weights. Tensors in, tensors out,
on the device of the inputs.

The paper's method section could not be read (only its abstract); what is here follows the
abstract and the authors' earlier SparseLLM code as reconstructed in the project's method notes
(``methods/structprune_nupes.md`` §1). Reconstructed choices are options whose defaults are
those notes' recommendations:

* **Scores** (read: Wanda-based): a group's score is the group-Wanda sum ``Σ |W_ij|·‖x_j‖`` over
  every weight the group owns (rows it removes read ``x``, columns it removes are read by
  their output), or the L2 aggregate ``√Σ (|W_ij|·‖x_j‖)²`` (option).
* **Mask** (read: "closed-form structured mask"): keep the ``k`` groups of largest score.
* **Allocation** (read: "energy-based asymptotic", "softmax"): each layer's energy is its mean
  group score relative to the mean over layers; the removed share of layer ℓ follows the
  mean-field stationarity ``s_ℓ = 1/(1 + exp((E_ℓ − μ)/T))`` (logistic, default) or its dilute
  limit ``s_ℓ ∝ exp(−E_ℓ/T)`` (softmax), clipped to ``[s_min, s_max]``, with ``μ`` (or the
  scale) found by bisection so the removed parameters equal the budget; whole groups are then
  assigned by largest remainders so the count is exact up to one group's cost.
* **Plan** (:func:`plan_removal`): allocation units are one structure of one layer (its FFN
  channels, its KV groups with their query heads); ``softmax`` spends the budget by the energy
  rule, ``uniform`` equally, ``global`` by one threshold over every group's per-parameter score
  (normalised by its structure's mean) — the reference the paper compares against.
* **Reconstruction** (read: "ADMM-based"): the kept weights minimise the output error
  ``‖X W_kᵀ − X Wᵀ‖²`` under the structured support, by ADMM on ``W = Z`` with ``Z`` on the
  support (scaled dual, penalty ρ), from the masked weights; the iterate with the lowest
  objective so far is kept, so the objective logged per iteration never increases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from compress.errors import NumericsError


# -- scores and masks ------------------------------------------------------------------------
def element_scores(W: Tensor, x_norm: Tensor) -> Tensor:
    """Wanda's ``|W_ij|·‖x_j‖`` for ``W [out, in]`` and the input column norms ``x_norm [in]``."""
    return W.detach().abs().to(torch.float64) * x_norm.to(torch.float64)[None, :]


def row_group_scores(S: Tensor, group_of_row: Tensor, n_groups: int, aggregation: str = "sum") -> Tensor:
    """Per-group score of removing output rows: row ``i`` of ``S [out, in]`` belongs to group
    ``group_of_row[i]`` (a query head's rows, an FFN channel's gate/up row)."""
    per_row = S.sum(1) if aggregation == "sum" else (S ** 2).sum(1)
    out = torch.zeros(n_groups, dtype=torch.float64, device=S.device)
    return out.index_add_(0, group_of_row.to(S.device), per_row)


def col_group_scores(S: Tensor, group_of_col: Tensor, n_groups: int, aggregation: str = "sum") -> Tensor:
    """Per-group score of removing input columns: column ``j`` of ``S [out, in]`` belongs to group
    ``group_of_col[j]`` (an o_proj head's columns, a down_proj channel's column)."""
    per_col = S.sum(0) if aggregation == "sum" else (S ** 2).sum(0)
    out = torch.zeros(n_groups, dtype=torch.float64, device=S.device)
    return out.index_add_(0, group_of_col.to(S.device), per_col)


def finish_scores(total: Tensor, aggregation: str = "sum") -> Tensor:
    """The group score from its summed parts (the square root for the L2 aggregate)."""
    return total if aggregation == "sum" else total.clamp_min(0).sqrt()


def keep_top(scores: Tensor, keep: int) -> Tensor:
    """The closed-form structured mask: indices (ascending) of the ``keep`` largest scores; ties
    go to the lower index so the mask is deterministic."""
    n = scores.numel()
    if not 0 <= keep <= n:
        raise ValueError(f"cannot keep {keep} of {n} groups")
    order = torch.argsort(scores, descending=True, stable=True)
    return torch.sort(order[:keep]).values


# -- allocation --------------------------------------------------------------------------------
@dataclass
class Allocation:
    """Groups removed per layer (whole groups) and the continuous shares they round."""

    removed: list[int]
    share: list[float]
    removed_params: int
    target_params: int
    info: dict = field(default_factory=dict)


def layer_energy(mean_scores: Tensor) -> Tensor:
    """Each layer's energy: its mean group score over the mean across layers (1 = average)."""
    m = mean_scores.to(torch.float64)
    ref = m.mean()
    if not torch.isfinite(m).all() or ref <= 0:
        raise NumericsError("group scores are not finite and positive", "check the calibration statistics")
    return m / ref


def _bisect(f, lo: float, hi: float, target: float, iters: int = 200) -> float:  # noqa: ANN001
    """The ``x`` in ``[lo, hi]`` with ``f(x) = target`` for a non-decreasing ``f``."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if f(mid) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def shares(energy: Tensor, weight: Tensor, target: float, *, temperature: float, form: str = "logistic",
           s_min: float = 0.0, s_max: float = 0.9) -> Tensor:
    """Continuous removed shares ``s_ℓ ∈ [s_min, s_max]`` with ``Σ weight_ℓ·s_ℓ = target``.

    ``weight_ℓ`` is the layer's prunable parameter count; ``form`` ``logistic`` is the mean-field
    stationarity ``1/(1 + exp((E − μ)/T))``, ``softmax`` its dilute limit ``c·exp(−E/T)``,
    ``uniform`` the same share everywhere. Lower energy ⇒ larger share. The budget must lie in
    ``[Σ w·s_min, Σ w·s_max]``."""
    E, w = energy.to(torch.float64), weight.to(torch.float64)
    lo_b, hi_b = float((w * s_min).sum()), float((w * s_max).sum())
    if not lo_b - 1e-9 <= target <= hi_b + 1e-9:
        raise ValueError(f"a budget of {target:.0f} parameters is outside [{lo_b:.0f}, {hi_b:.0f}] "
                         "that the per-layer share limits allow")
    if form == "uniform" or temperature == math.inf:
        s = torch.full_like(E, target / float(w.sum()))
        return s.clamp(s_min, s_max)
    if temperature <= 0:
        raise ValueError("the allocation temperature must be positive")
    z = E / temperature
    if form == "logistic":
        def at(mu: float) -> Tensor:
            return torch.sigmoid(mu / temperature - z).clamp(s_min, s_max)
        span = float(z.abs().max()) * temperature + 50 * temperature
        mu = _bisect(lambda m: float((w * at(m)).sum()), -span, span, target)
        return at(mu)
    if form == "softmax":
        base = torch.exp(-(z - z.min()))  # ≤ 1, largest for the lowest energy

        def at_c(log_c: float) -> Tensor:
            return (base * math.exp(log_c)).clamp(s_min, s_max)
        hi = math.log(max(s_max, 1e-12) / float(base.min())) + 1
        lo = math.log(max(s_min, 1e-300)) - 1 if s_min > 0 else -800.0
        return at_c(_bisect(lambda c: float((w * at_c(c)).sum()), lo, hi, target))
    raise ValueError(f"unknown allocation form {form!r} (logistic, softmax or uniform)")


def round_groups(share: Tensor, n_groups: list[int], cost: list[int], target: int, *,
                 min_keep: list[int] | None = None) -> Allocation:
    """Whole groups removed per layer from continuous shares, hitting ``target`` removed parameters
    as closely as whole groups allow: floor first, then one group at a time to the layers with
    the largest remainders (cost-aware), never past a layer's ``n_groups − min_keep``."""
    L = len(n_groups)
    min_keep = min_keep or [1] * L
    cap = [n - m for n, m in zip(n_groups, min_keep, strict=True)]
    want = [float(s) * n for s, n in zip(share.tolist(), n_groups, strict=True)]
    k = [min(int(math.floor(x + 1e-9)), c) for x, c in zip(want, cap, strict=True)]
    removed = sum(ki * c for ki, c in zip(k, cost, strict=True))
    rem = sorted(range(L), key=lambda i: (want[i] - k[i]), reverse=True)
    progress = True
    while removed < target and progress:  # add whole groups where the rounding cut most
        progress = False
        for i in rem:
            if k[i] < cap[i] and removed + cost[i] - target <= target - removed:
                k[i] += 1
                removed += cost[i]
                progress = True
                if removed >= target:
                    break
    while removed > target:  # overshoot by more than half a group: give back the smallest remainder
        cands = [i for i in reversed(rem) if k[i] > 0 and abs(removed - cost[i] - target) < abs(removed - target)]
        if not cands:
            break
        k[cands[0]] -= 1
        removed -= cost[cands[0]]
    return Allocation(k, [float(s) for s in share.tolist()], removed, target)


# -- reconstruction ----------------------------------------------------------------------------
@dataclass
class Reconstruction:
    """The kept weights and what the ADMM did: objective ``‖X(W_k − W)ᵀ‖²/‖XWᵀ‖²`` before (masked
    weights) and after, per-iteration objective of the best iterate so far, damping used."""

    weight: Tensor
    before: float
    after: float
    history: list[float]
    damp: float


def output_error(W: Tensor, Wk: Tensor, H: Tensor) -> float:
    """``‖X(Wk − W)ᵀ‖² / ‖XWᵀ‖²`` from ``H = XᵀX`` (float64)."""
    D = (Wk - W).to(torch.float64)
    W64 = W.to(torch.float64)
    den = float(((W64 @ H) * W64).sum())
    return float(((D @ H) * D).sum()) / den if den > 0 else 0.0


def admm_reconstruct(W: Tensor, H: Tensor, keep_cols: Tensor, *, iters: int = 30, rho: float = 1.0,
                     percdamp: float = 0.01) -> Reconstruction:
    """Kept input columns' weights minimising ``‖X W_kᵀ − X Wᵀ‖²`` (``W [out, in]``, ``H = XᵀX``
    [in, in]) with every other column zero, by ADMM on the split ``W = Z``:

    ``W ← (W H + ρ(Z − U))(H + ρI)⁻¹`` (one Cholesky of the damped ``H + ρI``, float64), ``Z ← (W + U)``
    on the support, ``U ← U + W − Z``; ``ρ`` is relative to ``mean(diag H)``. Started from the
    masked weights (the no-reconstruction baseline); the best feasible iterate is returned."""
    W64 = W.detach().to(torch.float64)
    H64 = H.detach().to(torch.float64)
    if not torch.isfinite(H64).all():
        raise NumericsError("the calibration Gram for reconstruction has NaN/Inf", "check the calibration data")
    n = H64.shape[0]
    mask = torch.zeros(n, dtype=torch.bool, device=W64.device)
    mask[keep_cols.to(W64.device)] = True
    scale = float(torch.diagonal(H64).mean()) or 1.0
    eye = torch.eye(n, dtype=torch.float64, device=W64.device)
    damp = percdamp
    Hd = H64 + damp * scale * eye  # damped objective Gram (a ridge pull towards W)
    Z = W64 * mask
    best, best_obj = Z, output_error(W64, Z, H64)
    history = [best_obj]
    r = rho * scale
    L, info = torch.linalg.cholesky_ex(Hd + r * eye)
    if int(info) != 0:
        raise NumericsError("the reconstruction system is not positive definite", "raise the damping")
    target = W64 @ Hd  # (out, in): the least-squares right-hand side
    U = torch.zeros_like(W64)
    for _ in range(iters):
        rhs = target + r * (Z - U)
        Wx = torch.cholesky_solve(rhs.T, L).T  # (H + ρI) is symmetric: solve for Wxᵀ
        Z = (Wx + U) * mask
        U = U + Wx - Z
        obj = output_error(W64, Z, H64)
        if obj < best_obj:
            best, best_obj = Z, obj
        history.append(best_obj)
    return Reconstruction(best.to(W.dtype), history[0], best_obj, history, damp)


def masked_least_squares(W: Tensor, H: Tensor, keep_cols: Tensor, percdamp: float = 0.01) -> Tensor:
    """The exact optimum ADMM converges to: ``W_K = W H[:, K] (H[K, K] + λI)⁻¹`` (a slow, obvious
    reference for tests), zeros elsewhere."""
    W64, H64 = W.to(torch.float64), H.to(torch.float64)
    K = keep_cols.to(W64.device)
    scale = float(torch.diagonal(H64).mean()) or 1.0
    Hd = H64 + percdamp * scale * torch.eye(H64.shape[0], dtype=torch.float64, device=H64.device)
    sol = torch.linalg.solve(Hd[K][:, K], (W64 @ Hd[:, K]).T).T  # (out, |K|)
    out = torch.zeros_like(W64)
    out[:, K] = sol
    return out


# -- the model-wide plan -----------------------------------------------------------------------
@dataclass
class Unit:
    """One allocation unit: a structure of one layer (``layer 3 ffn``: its channels; ``heads``:
    its KV groups), its group scores, the parameters one group holds, and how many groups it
    must keep at least (and may keep at most)."""

    name: str
    scores: Tensor
    cost: int
    min_keep: int = 1
    max_keep: int | None = None
    multiple: int = 1  # removed groups come in multiples of this (kernel-friendly widths)

    @property
    def n(self) -> int:
        return int(self.scores.numel())

    def removable(self) -> int:
        """Most groups this unit may lose (a multiple of ``multiple``)."""
        most = self.n - self.min_keep
        return max(0, most - most % self.multiple)

    def least_removed(self) -> int:
        """Fewest groups it must lose (``max_keep``), rounded up to a multiple."""
        least = 0 if self.max_keep is None else max(0, self.n - self.max_keep)
        return min(self.removable(), -(-least // self.multiple) * self.multiple)


def per_param_scores(unit: Unit) -> Tensor:
    """A unit's group scores per parameter, comparable across structures of different cost."""
    return unit.scores.to(torch.float64) / unit.cost


def plan_removal(units: list[Unit], budget: int, *, method: str = "softmax", temperature: float = 1.0,
                 form: str = "softmax") -> Allocation:
    """Groups removed per unit so that the removed parameters equal ``budget`` as closely as
    whole groups (and their multiples) allow.

    * ``softmax``: energy-based shares (:func:`shares`, ``form`` softmax or logistic) with
      ``T = temperature · std(E)`` over the units' energies (mean per-parameter group score
      relative to the mean over units), then whole groups by :func:`round_groups`;
    * ``uniform``: the same share in every unit;
    * ``global``: one threshold over every group of the model, by per-parameter score divided by
      its structure's mean (so heads and channels compare), lowest first — the memory-hungry
      reference (here from the scan's scores, so it is not memory-hungry).
    Every unit keeps ``[min_keep, max_keep]`` groups."""
    lo = sum(u.least_removed() * u.cost for u in units)
    hi = sum(u.removable() * u.cost for u in units)
    if not lo <= budget <= hi:
        raise ValueError(f"removing {budget:,} parameters is outside what the per-layer limits allow "
                         f"({lo:,}..{hi:,})")
    if method == "global":
        return _global(units, budget)
    dev = units[0].scores.device
    weight = torch.tensor([float(u.n * u.cost) for u in units], dtype=torch.float64, device=dev)
    s_min = torch.tensor([u.least_removed() / u.n for u in units], dtype=torch.float64, device=dev)
    s_max = torch.tensor([u.removable() / u.n for u in units], dtype=torch.float64, device=dev)
    if method == "uniform":
        s = _bounded_uniform(weight, s_min, s_max, budget)
        info: dict = {}
    elif method == "softmax":
        E = layer_energy(torch.stack([per_param_scores(u).mean() for u in units]))
        std = float(E.std()) if len(units) > 1 else 0.0
        T = temperature * std if std > 0 else math.inf
        s = _bounded_shares(E, weight, budget, T, form, s_min, s_max)
        info = {"energy": [float(e) for e in E], "temperature": T}
    else:
        raise ValueError(f"unknown allocation {method!r} (softmax, uniform or global)")
    alloc = _round_units(units, s, budget)
    alloc.info.update(info)
    return alloc


def _bounded_uniform(w: Tensor, s_min: Tensor, s_max: Tensor, budget: float) -> Tensor:
    """One share for every unit, clipped to each unit's limits, meeting the budget."""
    def at(t: float) -> Tensor:
        return torch.minimum(torch.maximum(torch.full_like(w, t), s_min), s_max)
    return at(_bisect(lambda t: float((w * at(t)).sum()), 0.0, 1.0, budget))


def _bounded_shares(E: Tensor, w: Tensor, budget: float, T: float, form: str, s_min: Tensor,
                    s_max: Tensor) -> Tensor:
    """:func:`shares` with per-unit limits (the scalar ``μ``/scale solved under them)."""
    if T == math.inf:
        return _bounded_uniform(w, s_min, s_max, budget)
    z = (E - E.min()) / T
    if form == "logistic":
        def at(mu: float) -> Tensor:
            return torch.minimum(torch.maximum(torch.sigmoid(mu - z), s_min), s_max)
        x = _bisect(lambda m: float((w * at(m)).sum()), -float(z.max()) - 60, 60.0, budget)
        return at(x)
    if form == "softmax":
        base = torch.exp(-z)

        def at_c(log_c: float) -> Tensor:
            return torch.minimum(torch.maximum(base * math.exp(log_c), s_min), s_max)
        x = _bisect(lambda c: float((w * at_c(c)).sum()), -800.0, float(z.max()) + 5, budget)
        return at_c(x)
    raise ValueError(f"unknown allocation form {form!r} (softmax or logistic)")


def _round_units(units: list[Unit], s: Tensor, budget: int) -> Allocation:
    """Whole groups (in each unit's multiples) per unit from continuous shares, by largest
    remainders, never outside a unit's limits; then the closest achievable total."""
    step = [u.multiple for u in units]
    want = [float(si) * u.n for si, u in zip(s.tolist(), units, strict=True)]
    k = [min(max(int(math.floor(x / m + 1e-9)) * m, u.least_removed()), u.removable())
         for x, m, u in zip(want, step, units, strict=True)]
    removed = sum(ki * u.cost for ki, u in zip(k, units, strict=True))
    changed = True
    while changed and removed != budget:
        changed = False
        add = removed < budget
        # the unit whose whole-group count is furthest below (adding) or above (giving back) its share
        order = sorted(range(len(units)), key=lambda i: (want[i] - k[i]) / step[i], reverse=add)
        for i in order:
            d = step[i] * units[i].cost * (1 if add else -1)
            ok = k[i] + step[i] <= units[i].removable() if add else k[i] - step[i] >= units[i].least_removed()
            if ok and abs(removed + d - budget) < abs(removed - budget):
                k[i] += step[i] if add else -step[i]
                removed += d
                changed = True
                break
    return Allocation(k, [float(x) for x in s.tolist()], removed, budget)


def _global(units: list[Unit], budget: int) -> Allocation:
    """Remove groups model-wide in ascending normalised score until the budget is spent."""
    by_kind: dict[str, list[Tensor]] = {}
    for u in units:
        by_kind.setdefault(u.name.split()[-1], []).append(per_param_scores(u))
    mean = {kind: float(torch.cat(v).mean()) or 1.0 for kind, v in by_kind.items()}
    cands = []  # (normalised score, unit index, position in the unit's ascending order)
    for i, u in enumerate(units):
        sc = per_param_scores(u) / mean[u.name.split()[-1]]
        asc = torch.sort(sc).values.tolist()
        for j in range(0, u.removable(), u.multiple):  # a step of `multiple` groups, scored by its best
            cands.append((asc[j + u.multiple - 1], i, j))
    k = [u.least_removed() for u in units]
    removed = sum(ki * u.cost for ki, u in zip(k, units, strict=True))
    for _score, i, j in sorted(cands):
        u = units[i]
        if j < k[i]:
            continue  # already removed by the unit's floor
        d = u.multiple * u.cost
        if j != k[i] or abs(removed + d - budget) >= abs(removed - budget):
            continue
        k[i] += u.multiple
        removed += d
    shares_ = [ki / u.n for ki, u in zip(k, units, strict=True)]
    return Allocation(k, shares_, removed, budget, {"method": "global"})


def mean_compensation(weight: Tensor, kept_weight: Tensor, cols: Tensor, mean: Tensor) -> Tensor:
    """Bias shift ``(W − Ŵ) μ`` that keeps a linear's mean output when its input columns outside
    ``cols`` are removed and the kept ones become ``kept_weight`` (FLAP's baseline bias
    compensation, extended to a re-fitted ``Ŵ``). ``weight``: (out, in); ``kept_weight``:
    (out, len(cols)); ``mean``: (in,) input mean. Float64, returned on the inputs' device."""
    w = weight.detach().to(torch.float64)
    mu = mean.to(device=w.device, dtype=torch.float64)
    mu_kept = mu[cols.to(w.device)]  # (len(cols),)
    return w @ mu - kept_weight.detach().to(torch.float64) @ mu_kept
