"""RCO's optimiser (compress.algos.rco) against brute force and the manifold's invariants."""

from __future__ import annotations

import itertools

import pytest
import torch

from compress.algos import rco


def _brute(units: torch.Tensor, values: torch.Tensor, cap: int, exact: bool) -> tuple[float, int]:
    best, best_total, best_key = float("inf"), -1, None
    N, K = units.shape
    for combo in itertools.product(range(K), repeat=N):
        total = sum(int(units[i, k]) for i, k in enumerate(combo))
        value = sum(float(values[i, k]) for i, k in enumerate(combo))
        if exact:
            key = (abs(total - cap) * 2 + (total > cap), value)
            if best_key is None or key < best_key:
                best_key, best, best_total = key, value, total
        elif total <= cap and value < best:
            best, best_total = value, total
    return best, best_total


@pytest.mark.parametrize("seed", range(40))
def test_mckp_equals_brute_force(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    N = int(torch.randint(1, 7, (1,), generator=g))
    K = int(torch.randint(1, 4, (1,), generator=g))
    units = torch.randint(0, 9, (N, K), generator=g)
    values = torch.rand(N, K, generator=g, dtype=torch.float64)
    cap = int(torch.randint(int(units.min(1).values.sum()), int(units.max(1).values.sum()) + 2, (1,), generator=g))
    for exact in (False, True):
        choice, total = rco.mckp(units, values, cap, exact=exact)
        value = float(values[torch.arange(N), choice].sum())
        best, best_total = _brute(units, values, cap, exact)
        assert value == pytest.approx(best, abs=1e-12)
        assert total == int(units[torch.arange(N), choice].sum())
        if exact:
            assert abs(total - cap) == abs(best_total - cap)
        else:
            assert total <= cap


def test_mckp_skips_unavailable_options_and_refuses_infeasible() -> None:
    units = torch.tensor([[1, 2], [1, 3]])
    values = torch.tensor([[float("inf"), 0.0], [1.0, 0.0]], dtype=torch.float64)
    choice, total = rco.mckp(units, values, 5)
    assert choice.tolist() == [1, 1] and total == 5
    with pytest.raises(ValueError):
        rco.mckp(units, values, 2)


def test_integer_units_reduce_by_gcd_and_round_when_too_big() -> None:
    costs = torch.tensor([[2 * 6, 4 * 6], [2 * 9, 4 * 9]])
    u = rco.integer_units(costs, 3 * 15)
    assert u.exact and u.unit == 3 and u.capacity == 15
    big = rco.integer_units(torch.tensor([[1, 10**9], [1, 10**9]]), 10**9, max_cells=1000)
    assert not big.exact and big.units.max() * 2 <= 1000


def _problem(seed: int, N: int = 12, K: int = 4) -> tuple[torch.Tensor, float, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(N, generator=g, dtype=torch.float64) + 0.2
    w = w / w.sum()
    bits = torch.tensor([2.0, 3.0, 4.0, 8.0][:K], dtype=torch.float64)
    C = w[:, None] * bits[None, :]
    alpha = torch.randn(N, K, generator=g, dtype=torch.float64)
    return C, 3.1, alpha


@pytest.mark.parametrize("seed", range(6))
def test_retraction_hits_the_budget_and_is_monotone(seed: int) -> None:
    C, B, alpha = _problem(seed)
    out, _ = rco.retract(alpha, C, B)
    assert abs(float(rco.expected_cost(out, C)) - B) < 1e-10
    ts = torch.linspace(-20, 20, 201, dtype=torch.float64)
    costs = torch.stack([rco.expected_cost(alpha + t * C, C) for t in ts])
    assert bool((costs[1:] - costs[:-1] >= -1e-12).all())


def test_retraction_refuses_budgets_outside_the_range() -> None:
    C, _, alpha = _problem(0)
    lo, hi = rco.cost_range(C)
    for bad in (lo - 0.1, hi + 0.1, lo):
        with pytest.raises(ValueError):
            rco.retract(alpha, C, bad)


def test_projection_is_tangent_and_transport_keeps_moment_tangent() -> None:
    C, B, alpha = _problem(1)
    alpha, _ = rco.retract(alpha, C, B)
    g = torch.randn_like(alpha)
    n = rco.normal(alpha, C)
    pg = rco.project(g, n)
    assert abs(float((pg * n).sum())) < 1e-12 * float(g.norm() * n.norm())
    # the normal is the cost's gradient
    a = alpha.clone().requires_grad_(True)
    rco.expected_cost(a, C).backward()
    torch.testing.assert_close(a.grad, n)
    adam = rco.TangentAdam(alpha.shape, lr=0.1)
    new = adam.step(alpha, pg)
    new, _ = rco.retract(new, C, B)
    n2 = rco.normal(new, C)
    adam.transport(n2)
    assert abs(float((adam.m * n2).sum())) < 1e-10 * max(float(adam.m.norm() * n2.norm()), 1e-30)


def test_every_step_stays_on_the_budget_and_a_separable_objective_reaches_the_dp_optimum() -> None:
    g = torch.Generator().manual_seed(3)
    N = 6
    sizes = torch.tensor([1, 2, 1, 3, 2, 1])
    bits = torch.tensor([2, 3, 4])
    cost_int = sizes[:, None] * bits[None, :]  # weight-bits
    B_int = 3 * int(sizes.sum())
    total = float(sizes.sum())
    C = cost_int.double() / total
    B = B_int / total
    # a separable loss: each group's error falls with bits at its own rate
    sens = torch.rand(N, generator=g, dtype=torch.float64) * 10 + 0.1
    f = sizes[:, None].double() * sens[:, None] * torch.pow(2.0, -2.0 * bits.double())[None, :]
    best, _ = _brute(cost_int, f, B_int, exact=True)
    ratios = []
    for seed in range(4):  # stochastic (Gumbel samples): every run near the optimum, most runs at it
        steps: list[rco.StepRecord] = []
        res = rco.optimize(lambda p: (p * f.to(p.dtype)).sum(), C, B, rco.uniform_init(C, B), steps=300, lr=0.5,
                           final=rco.integer_units(cost_int, B_int), generator=torch.Generator().manual_seed(seed),
                           callback=steps.append)
        assert max(s.cost_error for s in steps) < 1e-9
        assert int(cost_int[torch.arange(N), res.choice].sum()) == B_int
        ratios.append(float(f[torch.arange(N), res.choice].sum()) / best)
    assert max(ratios) < 1.02
    assert sum(abs(r - 1) < 1e-9 for r in ratios) >= 3


def test_nan_objective_stops_naming_the_step() -> None:
    C, B, _ = _problem(2, N=4)
    from compress.errors import NumericsError

    with pytest.raises(NumericsError, match="step 0"):
        rco.optimize(lambda p: p.sum() * float("nan"), C, B, rco.uniform_init(C, B), steps=3, lr=0.1)


def test_inits_lie_on_the_budget_and_sensitivity_prefers_cheap_options_where_they_cost_little() -> None:
    C, B, _ = _problem(4, N=5)
    bits = torch.tensor([[2.0, 3.0, 4.0, 8.0]] * 5, dtype=torch.float64)
    peaked = rco.budget_init(bits, C, B)
    assert (torch.softmax(peaked, 1).argmax(1) == 1).all()  # B = 3.1: every group peaks at 3 bits
    for a in (rco.uniform_init(C, B), peaked,
              rco.sensitivity_init(torch.rand(5, 4, dtype=torch.float64) + 0.01, C, B)):
        assert abs(float(rco.expected_cost(a, C)) - B) < 1e-10
    err = torch.tensor([[1.0, 0.5, 0.25, 0.01]] * 4 + [[100.0, 10.0, 1.0, 0.1]], dtype=torch.float64)
    a = rco.sensitivity_init(err, C, B)
    assert torch.isfinite(a).all()
    u = rco.uniform_init(C, B)
    assert torch.softmax(a, 1)[4, 0] < torch.softmax(u, 1)[4, 0]  # the sensitive group avoids 2 bits


def test_greedy_stays_under_budget_and_upgrades_the_best_ratio_first() -> None:
    err = torch.tensor([[10.0, 1.0], [2.0, 1.9]], dtype=torch.float64)
    cost = torch.tensor([[1.0, 2.0], [1.0, 2.0]], dtype=torch.float64)
    assert rco.greedy(err, cost, 3.0).tolist() == [1, 0]
    assert rco.greedy(err, cost, 4.0).tolist() == [1, 1]
    with pytest.raises(ValueError):
        rco.greedy(err, cost, 1.0)


def test_temperature_schedule_ends_at_the_end() -> None:
    assert rco.temperature(0, 10, 1.0, 0.01) == 1.0
    assert rco.temperature(9, 10, 1.0, 0.01) == pytest.approx(0.01)
