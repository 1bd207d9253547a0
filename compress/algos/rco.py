"""RCO (Helcig & Alistarh, arXiv 2605.00649): exact-budget allocation by Riemannian optimisation on
the manifold of option distributions whose expected cost equals the budget.

Problem: ``N`` groups (linears, or fused siblings), ``K`` options each (bit widths, ranks, ...),
option ``k`` of group ``i`` costing ``C[i, k]`` (in budget units, e.g. that group's share of the
average bits); pick one option per group with ``Σ_i C[i, k_i] = B`` minimising a whole-model loss.

Relaxation: ``p_i = softmax(α_i)``; the constraint surface is ``M = {α : c(α) = Σ_ik p_ik C_ik = B}``.

* tangent projection: the gradient of ``c`` is ``n_ik = p_ik (C_ik − E_{p_i}[C_i])``; a step
  direction loses its component along ``n``;
* retraction: from any ``α``, move along the cost direction, ``α + t·C``, to the ``t`` with
  ``c = B`` by bracketed bisection; ``dc/dt = Σ_i Var_{p_i(t)}(C_i) ≥ 0`` so ``c`` is monotone in
  ``t`` and the root is unique when ``B`` lies strictly inside the feasible range;
* vector transport: Adam's first moment is projected onto the new tangent plane;
* Gumbel straight-through: the forward pass sees a hard sample, the best multiple-choice
  knapsack (MCKP) solution for the perturbed logits ``(α + G)/τ`` under the budget, the backward
  pass the soft ``softmax((α + G)/τ)``; τ decays geometrically;
* final discretisation: the MCKP over ``log p`` at the exact budget (or the nearest feasible
  capacity, reported).

Pure functions: tensors in, tensors out, float64, on the device of the inputs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from compress.errors import NumericsError

#: cells of the final DP table above which integer costs are rounded to a coarser unit
MAX_DP_CELLS = 1 << 26


# -- multiple-choice knapsack ---------------------------------------------------------------------
def mckp(units: Tensor, values: Tensor, capacity: int, *, exact: bool = False) -> tuple[Tensor, int]:
    """One option per row minimising ``Σ values`` under integer ``units`` (``[N, K]``).

    ``exact=False``: total ≤ ``capacity``. ``exact=True``: total == ``capacity`` when some
    assignment has it, else the feasible total nearest to it (below on a tie). Options whose value
    is ``+inf`` are never taken. Returns the choice per row and its total.

    Raises:
        ValueError: no assignment fits (every row's cheapest option is too dear together).
    """
    units = units.to(torch.int64)
    N, K = units.shape
    vals = values.to(torch.float64)
    top = capacity if not exact else int(units.max(dim=1).values.sum())
    top = max(top, 0)
    inf = float("inf")
    dp = torch.full((top + 1,), inf, dtype=torch.float64, device=vals.device)  # best value at exact total
    dp[0] = 0.0
    choice = torch.zeros(N, top + 1, dtype=torch.int16, device=vals.device)
    for i in range(N):
        new = torch.full_like(dp, inf)
        arg = torch.zeros(top + 1, dtype=torch.int16, device=vals.device)
        for k in range(K):
            w, v = int(units[i, k]), float(vals[i, k])
            if w > top or not math.isfinite(v):
                continue
            cand = torch.full_like(dp, inf)
            cand[w:] = dp[: top + 1 - w] + v
            better = cand < new
            new = torch.where(better, cand, new)
            arg = torch.where(better, torch.full_like(arg, k), arg)
        dp, choice[i] = new, arg
    feasible = torch.isfinite(dp)
    if exact:
        totals = torch.nonzero(feasible).flatten()
        if totals.numel() == 0:
            raise ValueError("no assignment is feasible")
        dist = (totals - capacity).abs() * 2 + (totals > capacity).long()  # ties go below
        at = int(totals[int(dist.argmin())])
    else:
        if not bool(feasible[: capacity + 1].any()):
            raise ValueError("no assignment fits the capacity")
        at = int(torch.argmin(dp[: capacity + 1]))
    total = at
    out = torch.empty(N, dtype=torch.int64, device=vals.device)
    for i in range(N - 1, -1, -1):
        k = int(choice[i, at])
        out[i] = k
        at -= int(units[i, k])
    return out, total


@dataclass(frozen=True)
class Units:
    """Integer costs for the DP: ``units [N, K]`` and ``capacity``; ``unit`` is the size of one
    unit in the caller's integer cost; ``exact`` is False when costs were rounded (too many cells)."""

    units: Tensor
    capacity: int
    unit: int
    exact: bool


def integer_units(costs: Tensor, budget: int, max_cells: int = MAX_DP_CELLS) -> Units:
    """Reduce integer ``costs`` (``[N, K]``, e.g. weight-bits or bytes) and ``budget`` by their
    greatest common divisor; when the table would still exceed ``max_cells`` round to the coarsest
    unit that fits (the realised total is then computed from the true costs by the caller)."""
    costs = costs.to(torch.int64)
    g = 0
    for v in torch.unique(costs).tolist():
        g = math.gcd(g, int(v))
    g = math.gcd(g, int(budget)) or 1
    N = costs.shape[0]
    top = int(costs.max(dim=1).values.sum()) // g
    if N * (top + 1) <= max_cells:
        return Units(costs // g, int(budget) // g, g, True)
    unit = math.ceil(int(costs.max(dim=1).values.sum()) * N / max_cells)
    return Units(torch.div(costs + unit // 2, unit, rounding_mode="floor"), int(round(budget / unit)), unit, False)


def scaled_units(C: Tensor, budget: float, resolution: int) -> tuple[Tensor, int]:
    """The reference's per-step DP discretisation: ``round(C·resolution)`` with capacity
    ``floor(B·resolution)`` (C in budget units, e.g. average bits)."""
    return (C * resolution).round().to(torch.int64), int(math.floor(budget * resolution + 1e-9))


# -- the constraint manifold ----------------------------------------------------------------------
def probabilities(alpha: Tensor) -> Tensor:
    return torch.softmax(alpha, dim=1)


def expected_cost(alpha: Tensor, C: Tensor) -> Tensor:
    """``c(α) = Σ_ik softmax(α_i)_k C_ik``."""
    return (probabilities(alpha) * C).sum()


def normal(alpha: Tensor, C: Tensor) -> Tensor:
    """Gradient of :func:`expected_cost` w.r.t. ``α``: ``p_ik (C_ik − E_{p_i}[C_i])``."""
    p = probabilities(alpha)
    return p * (C - (p * C).sum(dim=1, keepdim=True))


def project(g: Tensor, n: Tensor) -> Tensor:
    """``g`` without its component along ``n`` (unchanged when ``n`` is zero)."""
    nn2 = float((n * n).sum())
    if nn2 <= 0.0:
        return g
    return g - (float((g * n).sum()) / nn2) * n


def cost_range(C: Tensor) -> tuple[float, float]:
    """The cheapest and the dearest assignment's cost."""
    return float(C.min(dim=1).values.sum()), float(C.max(dim=1).values.sum())


def retract(alpha: Tensor, C: Tensor, budget: float, *, tol: float | None = None,
            max_iter: int = 200) -> tuple[Tensor, float]:
    """``α + t·C`` with ``c(α + t·C) = B`` (within ``tol``, default ``1e-12·max(1, |B|)``) by
    doubling a bracket around 0 and bisecting; returns the point and ``t``.

    Raises:
        ValueError: ``B`` is not strictly inside the feasible range of costs.
    """
    lo_c, hi_c = cost_range(C)
    spread = hi_c - lo_c
    if not lo_c < budget < hi_c:
        raise ValueError(f"a budget of {budget:g} is not strictly inside the feasible range "
                         f"[{lo_c:g}, {hi_c:g}]")
    tol = 1e-12 * max(1.0, abs(budget)) if tol is None else tol

    def f(t: float) -> float:
        return float(expected_cost(alpha + t * C, C)) - budget

    scale = 1.0 / max(float(C.abs().max()), 1e-30)
    lo, hi = -scale, scale
    for _ in range(200):
        if f(lo) <= 0.0:
            break
        lo *= 2.0
    for _ in range(200):
        if f(hi) >= 0.0:
            break
        hi *= 2.0
    t = 0.0
    for _ in range(max_iter):
        t = 0.5 * (lo + hi)
        v = f(t)
        if abs(v) <= tol or hi - lo <= 1e-300:
            break
        if v < 0.0:
            lo = t
        else:
            hi = t
    if abs(f(t)) > max(tol, 1e-9 * spread):
        raise NumericsError(f"the retraction onto the budget did not converge (|c − B| = {abs(f(t)):.3g})",
                            "report this; try --init uniform")
    return alpha + t * C, t


class TangentAdam:
    """Adam on the manifold: the caller passes the projected gradient; after the step and the
    retraction :meth:`transport` projects the first moment onto the new tangent plane (the second
    moment is a per-coordinate scale and stays)."""

    def __init__(self, shape: torch.Size, *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, device: torch.device | None = None) -> None:
        self.lr, self.betas, self.eps = lr, betas, eps
        self.m = torch.zeros(shape, dtype=torch.float64, device=device)
        self.v = torch.zeros(shape, dtype=torch.float64, device=device)
        self.t = 0

    def step(self, alpha: Tensor, grad: Tensor, lr: float | None = None) -> Tensor:
        b1, b2 = self.betas
        self.t += 1
        self.m.mul_(b1).add_(grad, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        m_hat = self.m / (1 - b1 ** self.t)
        v_hat = self.v / (1 - b2 ** self.t)
        return alpha - (self.lr if lr is None else lr) * m_hat / (v_hat.sqrt() + self.eps)

    def transport(self, n: Tensor) -> None:
        self.m = project(self.m, n)


# -- sampling and schedules --------------------------------------------------------------------
def temperature(step: int, steps: int, start: float, end: float) -> float:
    """Geometric decay from ``start`` (step 0) to ``end`` (the last step)."""
    if steps <= 1:
        return end
    return start * (end / start) ** (step / (steps - 1))


def gumbel_straight_through(alpha: Tensor, tau: float, units: Tensor, capacity: int,
                            generator: torch.Generator | None = None,
                            available: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Hard-forward, soft-backward sample: ``onehot(k) − sg(s) + s`` with ``s = softmax(z)``,
    ``z = (α + G)/τ`` and ``k`` the MCKP optimum of ``Σ z_ik`` under ``capacity``; returns it and ``k``."""
    u = torch.rand(alpha.shape, dtype=torch.float64, device=alpha.device, generator=generator)
    g = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-16)))
    z = (alpha + g) / tau
    soft = torch.softmax(z, dim=1)
    hard, _ = mckp(units, _masked(-z.detach(), available), capacity)
    onehot = torch.nn.functional.one_hot(hard, alpha.shape[1]).to(soft.dtype)
    return onehot - soft.detach() + soft, hard


def _masked(values: Tensor, available: Tensor | None) -> Tensor:
    """``values`` with unavailable options at ``+inf`` (never chosen by :func:`mckp`)."""
    if available is None:
        return values
    return torch.where(available, values, torch.full_like(values, float("inf")))


def mask_logits(alpha: Tensor, available: Tensor | None) -> Tensor:
    """Unavailable options 1000 below their row's lowest available logit (probability 0)."""
    if available is None:
        return alpha
    low = torch.where(available, alpha, torch.full_like(alpha, float("inf"))).min(dim=1, keepdim=True).values
    return torch.where(available, alpha, low - 1000.0)


# -- initialisation ---------------------------------------------------------------------------
def uniform_init(C: Tensor, budget: float) -> Tensor:
    """``α = −β·C`` on the budget (every group prefers cheap options alike): the retraction of 0."""
    return retract(torch.zeros_like(C, dtype=torch.float64), C.to(torch.float64), budget)[0]


def budget_init(bits: Tensor, C: Tensor, budget: float, width: float = 1.0) -> Tensor:
    """Every group peaked at the options whose per-weight cost ``bits [N, K]`` is nearest the
    average budget: ``α_ik = −(bits_ik − B̄)² / (2·width²)``, retracted onto the budget (``B̄`` in
    the same per-weight units as ``bits``, i.e. ``budget / Σ_i w_i`` when ``C = w·bits``)."""
    w = (C.to(torch.float64) / bits.to(torch.float64).clamp_min(1e-30)).mean(dim=1)  # (N,) group weights
    mean_bits = budget / float(w.sum())
    alpha = -((bits.to(torch.float64) - mean_bits) ** 2) / (2.0 * width ** 2)
    return retract(alpha, C.to(torch.float64), budget)[0]


def sensitivity_init(errors: Tensor, C: Tensor, budget: float) -> Tensor:
    """``α_ik = −log(err_ik / Σ_k err_ik)`` centred per group, retracted onto the budget. Zero or
    unavailable (``inf``) errors are floored / given ``α = −∞``-like logits (``−60`` below the row)."""
    err = errors.to(torch.float64)
    finite = torch.isfinite(err)
    err = torch.where(finite, err, torch.zeros_like(err))
    total = err.sum(dim=1, keepdim=True).clamp_min(1e-300)
    norm = (err / total).clamp_min(1e-12)
    alpha = -torch.log(norm)
    alpha = alpha - alpha.mean(dim=1, keepdim=True)
    alpha = torch.where(finite, alpha, alpha.min(dim=1, keepdim=True).values - 60.0)
    return retract(alpha, C.to(torch.float64), budget)[0]


# -- the optimiser -----------------------------------------------------------------------------
@dataclass
class StepRecord:
    step: int
    loss: float
    tau: float
    cost_error: float  # |c(α) − B| after the retraction
    hard_cost: float  # cost of the (last) hard sample
    seconds: float


@dataclass
class RCOResult:
    alpha: Tensor
    choice: Tensor  # (N,) the final discrete assignment
    total_units: int
    history: list[StepRecord] = field(default_factory=list)


Objective = Callable[[Tensor], Tensor]


def optimize(objective: Objective, C: Tensor, budget: float, alpha0: Tensor, *, steps: int, lr: float,
             tau_start: float = 1.0, tau_end: float = 0.01, samples: int = 1, resolution: int = 500,
             final: Units | None = None, generator: torch.Generator | None = None,
             available: Tensor | None = None,
             callback: Callable[[StepRecord], None] | None = None) -> RCOResult:
    """Minimise ``objective(p)`` (``p [N, K]`` one-hot-like, differentiable) over assignments with
    cost ``B``. ``alpha0`` must lie on the budget (:func:`uniform_init`, :func:`sensitivity_init`).

    ``final`` gives the exact integer costs for the last DP (default: ``C`` at ``resolution·20``);
    ``available`` (``[N, K]`` bool) marks the options a group can take (others are never chosen).

    Raises:
        NumericsError: the objective or its gradient is NaN/Inf (the step is named).
    """
    C = C.to(torch.float64)
    alpha = alpha0.to(torch.float64).clone()
    units, cap = scaled_units(C, budget, resolution)
    adam = TangentAdam(alpha.shape, lr=lr, device=alpha.device)
    history: list[StepRecord] = []
    for step in range(steps):
        t0 = time.perf_counter()
        tau = temperature(step, steps, tau_start, tau_end)
        grad = torch.zeros_like(alpha)
        total, hard_cost = 0.0, 0.0
        for _ in range(samples):
            a = alpha.detach().requires_grad_(True)
            p, hard = gumbel_straight_through(a, tau, units, cap, generator, available)
            loss = objective(p)
            if not torch.isfinite(loss.detach()):
                raise NumericsError(f"the objective is {float(loss.detach())} at step {step}",
                                    "check the calibration data; lower --lr")
            loss.backward()
            assert a.grad is not None
            grad += a.grad / samples
            total += float(loss.detach()) / samples
            hard_cost = float(C.gather(1, hard[:, None]).sum())
        if not torch.isfinite(grad).all():
            raise NumericsError(f"the gradient of the objective has NaN/Inf at step {step}", "lower --lr")
        g = project(grad, normal(alpha, C))
        alpha = adam.step(alpha, g)
        alpha, _ = retract(alpha, C, budget)
        adam.transport(normal(alpha, C))
        rec = StepRecord(step, total, tau, abs(float(expected_cost(alpha, C)) - budget), hard_cost,
                         time.perf_counter() - t0)
        history.append(rec)
        if callback is not None:
            callback(rec)
    choice, total_units = discretize(alpha, C, budget, final, resolution * 20, available)
    return RCOResult(alpha, choice, total_units, history)


def discretize(alpha: Tensor, C: Tensor, budget: float, final: Units | None = None,
               resolution: int = 10000, available: Tensor | None = None) -> tuple[Tensor, int]:
    """The MCKP maximising ``Σ log p_ik`` at the exact budget (``final``'s integer costs) or the
    nearest feasible capacity."""
    logp = torch.log_softmax(alpha.to(torch.float64), dim=1)
    values = _masked(-logp, available)
    if final is None:
        units, cap = scaled_units(C.to(torch.float64), budget, resolution)
        return mckp(units, values, cap, exact=True)
    return mckp(final.units, values, final.capacity, exact=True)


# -- the greedy baseline --------------------------------------------------------------------------
def greedy(errors: Tensor, costs: Tensor, budget: float) -> Tensor:
    """Start every group at its cheapest option; repeatedly take the single upgrade (to any dearer
    option of one group) with the largest error reduction per unit of extra cost that still fits
    ``budget``. The per-layer error-per-byte knapsack heuristic; its total stays ≤ ``budget``."""
    err = errors.to(torch.float64)
    cost = costs.to(torch.float64)
    err = torch.where(torch.isfinite(err), err, torch.full_like(err, float("inf")))
    cheapest = torch.where(torch.isfinite(err), cost, torch.full_like(cost, float("inf"))).argmin(dim=1)
    choice = cheapest.clone()
    rows = torch.arange(err.shape[0], device=err.device)
    spent = float(cost[rows, choice].sum())
    if spent > budget * (1 + 1e-12):
        raise ValueError(f"the cheapest assignment costs {spent:g}, over the budget {budget:g}")
    while True:
        cur_e = err[rows, choice][:, None]
        cur_c = cost[rows, choice][:, None]
        extra = cost - cur_c
        gain = cur_e - err
        ok = (extra > 0) & (gain > 0) & (spent + extra <= budget * (1 + 1e-12)) & torch.isfinite(err)
        if not bool(ok.any()):
            return choice
        ratio = torch.where(ok, gain / extra, torch.full_like(gain, -1.0))
        flat = int(ratio.argmax())
        i, k = divmod(flat, err.shape[1])
        spent += float(extra[i, k])
        choice[i] = k
