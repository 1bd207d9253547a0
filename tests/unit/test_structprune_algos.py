"""StructPrune math against slow obvious references and the invariants of the method notes
(``methods/structprune_nupes.md`` §1.7): scores, the top-k mask, shares that meet the budget,
whole-group rounding, and the ADMM reconstruction (monotone, exact support, the masked
least-squares optimum, identity at 0 %)."""

from __future__ import annotations

import math

import pytest
import torch

import compress.algos.structprune as sp
from compress.algos.structprune import (
    admm_reconstruct, col_group_scores, element_scores, finish_scores, keep_top, layer_energy,
    masked_least_squares, output_error, round_groups, row_group_scores, shares)


def _gram(n: int, d: int, seed: int, corr: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    X = X + corr * X[:, :1]  # correlated features: least squares has something to do
    return X.T @ X


def test_group_scores_equal_the_loops() -> None:
    g = torch.Generator().manual_seed(0)
    W, x = torch.randn(6, 8, generator=g), torch.rand(8, generator=g) + 0.1
    rows, cols = torch.tensor([0, 0, 1, 2, 2, 1]), torch.tensor([0, 1, 1, 2, 0, 2, 1, 0])
    S = element_scores(W, x)
    for agg in ("sum", "l2"):
        r = finish_scores(row_group_scores(S, rows, 3, agg), agg)
        c = finish_scores(col_group_scores(S, cols, 3, agg), agg)
        for grp in range(3):
            er = [abs(float(W[i, j])) * float(x[j]) for i in range(6) for j in range(8) if rows[i] == grp]
            ec = [abs(float(W[i, j])) * float(x[j]) for i in range(6) for j in range(8) if cols[j] == grp]
            want_r = sum(er) if agg == "sum" else math.sqrt(sum(e * e for e in er))
            want_c = sum(ec) if agg == "sum" else math.sqrt(sum(e * e for e in ec))
            assert float(r[grp]) == pytest.approx(want_r, rel=1e-12)
            assert float(c[grp]) == pytest.approx(want_c, rel=1e-12)


def test_keep_top_is_the_largest_and_deterministic() -> None:
    s = torch.tensor([3.0, 1.0, 3.0, 2.0, 0.5])
    assert keep_top(s, 2).tolist() == [0, 2]
    assert keep_top(s, 5).tolist() == [0, 1, 2, 3, 4]  # keeping every group: the identity
    assert keep_top(s, 0).tolist() == []
    with pytest.raises(ValueError):
        keep_top(s, 6)


@pytest.mark.parametrize("form", ["logistic", "softmax"])
def test_shares_meet_the_budget_and_follow_the_energy(form: str) -> None:
    g = torch.Generator().manual_seed(1)
    for trial in range(50):
        L = 3 + trial % 20
        E = layer_energy(torch.rand(L, generator=g, dtype=torch.float64) + 0.05)
        w = torch.randint(100, 1000, (L,), generator=g).double()
        target = float(w.sum()) * (0.05 + 0.8 * float(torch.rand((), generator=g)))
        s = shares(E, w, target, temperature=0.3, form=form, s_max=0.9)
        assert float((w * s).sum()) == pytest.approx(target, rel=1e-9)
        assert float(s.min()) >= 0 and float(s.max()) <= 0.9 + 1e-12
        order = torch.argsort(E)
        assert all(s[order[i]] >= s[order[i + 1]] - 1e-12 for i in range(L - 1))  # lower energy, more pruned


@pytest.mark.parametrize("form", ["logistic", "softmax", "uniform"])
def test_uniform_energies_give_uniform_shares(form: str) -> None:
    w = torch.tensor([100.0, 300.0, 200.0])
    s = shares(torch.ones(3, dtype=torch.float64), w, 0.3 * 600, temperature=0.5, form=form)
    torch.testing.assert_close(s, torch.full((3,), 0.3, dtype=torch.float64))


def test_high_temperature_is_uniform_and_low_is_greedy() -> None:
    E = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
    w = torch.ones(3, dtype=torch.float64)
    hot = shares(E, w, 0.9, temperature=1e4)
    torch.testing.assert_close(hot, torch.full((3,), 0.3, dtype=torch.float64), atol=1e-4, rtol=0)
    cold = shares(E, w, 0.9, temperature=1e-3, s_max=0.9)
    torch.testing.assert_close(cold, torch.tensor([0.9, 0.0, 0.0], dtype=torch.float64), atol=1e-6, rtol=0)


def test_logistic_shares_minimise_the_free_energy() -> None:
    """The logistic form is the stationary point of Σ k E − T Σ log C(n, k) under the budget."""
    E = torch.tensor([0.6, 1.0, 1.4], dtype=torch.float64)
    n, T, K = 1000, 0.2, 900.0
    s = shares(E, torch.full((3,), float(n), dtype=torch.float64), K, temperature=T, s_max=1 - 1e-9)

    def free(sv: torch.Tensor) -> float:
        h = -(sv * sv.log() + (1 - sv) * (1 - sv).log())
        return float((n * sv * E).sum() - T * (n * h).sum())

    base = free(s)
    d = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)
    for eps in (1e-3, -1e-3):  # moves that keep the budget raise the free energy
        assert free(s + eps * d) > base
        assert free(s + eps * torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64)) > base


def test_budget_outside_the_limits_is_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        shares(torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), 1.95, temperature=1.0,
               s_max=0.9)


def test_rounding_hits_the_budget_within_half_a_group() -> None:
    g = torch.Generator().manual_seed(2)
    for _ in range(200):
        L = int(torch.randint(2, 12, (), generator=g))
        n = [int(v) for v in torch.randint(4, 64, (L,), generator=g)]
        cost = [int(v) for v in torch.randint(10, 500, (L,), generator=g)]
        total = sum(a * b for a, b in zip(n, cost, strict=True))
        target = int(total * float(torch.rand((), generator=g)) * 0.8)
        w = torch.tensor([a * b for a, b in zip(n, cost, strict=True)], dtype=torch.float64)
        s = shares(layer_energy(torch.rand(L, generator=g, dtype=torch.float64) + 0.1), w, target,
                   temperature=0.5, s_max=0.9)
        a = round_groups(s, n, cost, target)
        assert abs(a.removed_params - target) <= max(cost) / 2 + 1e-9
        assert all(0 <= k <= ni - 1 for k, ni in zip(a.removed, n, strict=True))
        assert a.removed_params == sum(k * c for k, c in zip(a.removed, cost, strict=True))


def test_admm_is_monotone_exact_on_the_support_and_reaches_the_optimum() -> None:
    for seed in range(5):
        H = _gram(400, 24, seed)
        W = torch.randn(10, 24, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
        keep = keep_top(torch.rand(24, generator=torch.Generator().manual_seed(seed)), 14)
        rec = admm_reconstruct(W, H, keep, iters=200)
        assert all(b <= a + 1e-15 for a, b in zip(rec.history, rec.history[1:]))  # never increases
        dropped = torch.ones(24, dtype=torch.bool)
        dropped[keep] = False
        assert torch.count_nonzero(rec.weight[:, dropped]) == 0  # whole columns removed, exactly
        assert rec.before == pytest.approx(output_error(W, W * (~dropped), H), rel=1e-12)
        want = masked_least_squares(W, H, keep)
        assert rec.after <= rec.before
        assert rec.after == pytest.approx(output_error(W, want, H), rel=1e-4)


def test_admm_with_every_column_kept_is_the_identity() -> None:
    H = _gram(200, 12, 3)
    W = torch.randn(5, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    rec = admm_reconstruct(W, H, torch.arange(12))
    torch.testing.assert_close(rec.weight, W)
    assert rec.before == 0.0 and rec.after == 0.0


def _units(seed: int, layers: int = 6) -> list:
    from compress.algos.structprune import Unit

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(layers):
        scale = 0.5 + float(torch.rand((), generator=g)) * (1 + i)  # deeper layers matter more
        out.append(Unit(f"layer {i} ffn", torch.rand(64, generator=g, dtype=torch.float64) * scale * 300, 300,
                        min_keep=8, multiple=8))
        out.append(Unit(f"layer {i} heads", torch.rand(3, generator=g, dtype=torch.float64) * scale * 5000,
                        5000, min_keep=1))
    return out


@pytest.mark.parametrize("method", ["softmax", "uniform", "global"])
def test_plans_hit_the_budget_within_the_limits(method: str) -> None:
    from compress.algos.structprune import plan_removal

    for seed in range(20):
        units = _units(seed)
        total = sum(u.n * u.cost for u in units)
        for frac in (0.1, 0.3, 0.5):
            budget = int(frac * total)
            a = plan_removal(units, budget, method=method, temperature=1.0)
            assert a.removed_params == sum(k * u.cost for k, u in zip(a.removed, units, strict=True))
            assert abs(a.removed_params - budget) <= max(u.cost * u.multiple for u in units) / 2
            for k, u in zip(a.removed, units, strict=True):
                assert u.least_removed() <= k <= u.removable() and k % u.multiple == 0


def test_uniform_energies_plan_uniform_and_lower_energy_is_pruned_more() -> None:
    from compress.algos.structprune import Unit, plan_removal

    same = [Unit(f"layer {i} ffn", torch.ones(100, dtype=torch.float64), 10) for i in range(4)]
    a = plan_removal(same, 4 * 30 * 10, method="softmax")
    assert a.removed == [30, 30, 30, 30]
    ramp = [Unit(f"layer {i} ffn", torch.full((100,), 1.0 + i, dtype=torch.float64), 10) for i in range(4)]
    b = plan_removal(ramp, 4 * 30 * 10, method="softmax")
    assert b.removed == sorted(b.removed, reverse=True) and b.removed[0] > b.removed[-1]
    assert plan_removal(ramp, 4 * 30 * 10, method="uniform").removed == [30, 30, 30, 30]


def test_global_threshold_is_the_greedy_order() -> None:
    from compress.algos.structprune import Unit, plan_removal

    units = [Unit("layer 0 ffn", torch.tensor([1.0, 5.0, 9.0], dtype=torch.float64), 1),
             Unit("layer 1 ffn", torch.tensor([2.0, 3.0, 8.0], dtype=torch.float64), 1)]
    a = plan_removal(units, 3, method="global")
    assert a.removed == [1, 2]  # scores 1, 2, 3 go first (the mean is the same for both units)


def test_an_impossible_budget_is_refused() -> None:
    from compress.algos.structprune import Unit, plan_removal

    with pytest.raises(ValueError, match="outside what the per-layer limits allow"):
        plan_removal([Unit("layer 0 ffn", torch.ones(4, dtype=torch.float64), 10, min_keep=2)], 30)


def test_mean_compensation_keeps_the_mean_output() -> None:
    """``(W − Ŵ) μ`` added to the bias makes the pruned (and re-fitted) linear's mean output over
    the inputs equal the dense one's, for any kept columns and any re-fitted weights."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64) + torch.linspace(-2, 3, 12, dtype=torch.float64)
    w = torch.randn(7, 12, generator=g, dtype=torch.float64)
    cols = torch.tensor([0, 3, 4, 9, 11])
    for w_hat in (w[:, cols], torch.randn(7, 5, generator=g, dtype=torch.float64)):
        shift = sp.mean_compensation(w, w_hat, cols, x.mean(0))
        torch.testing.assert_close((x[:, cols] @ w_hat.T + shift).mean(0), (x @ w.T).mean(0))
    assert torch.equal(sp.mean_compensation(w, w, torch.arange(12), x.mean(0)), torch.zeros(7, dtype=torch.float64))
