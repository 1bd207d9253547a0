"""BAQ's allocation math (compress.algos.baq) and GPTQ with a width per column group: the closed
form's equal-loss property and exact average, the projection onto kernel widths hitting the
budget, and mixed-width GPTQ reducing to plain GPTQ when every group has the same width."""

from __future__ import annotations

import math

import pytest
import torch

from compress.algos import baq
from compress.algos.gptq import gptq_quantize, gptq_quantize_mixed, relative_output_error
from compress.algos.quant import QuantSpec
from compress.modules import MixedQuantLinear

CHOICES = (2, 3, 4, 8)


def _case(seed: int, groups: int = 40, spread: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c = torch.exp(spread * torch.randn(groups, generator=g, dtype=torch.float64))
    n = torch.randint(1, 9, (groups,), generator=g).to(torch.float64) * 64
    return c, n


@pytest.mark.parametrize("theta", [1.95, 2.0])
@pytest.mark.parametrize("seed", range(5))
def test_closed_form_hits_the_average_and_equalises_the_losses(seed: int, theta: float) -> None:
    c, n = _case(seed)
    R = baq.closed_form_bits(c, n, 3.0, theta)
    assert float((n * R).sum() / n.sum()) == pytest.approx(3.0, abs=1e-12)
    per_weight = c * torch.exp2(-theta * R)  # equal loss: the same for every group
    assert float(per_weight.max() / per_weight.min()) == pytest.approx(1.0, abs=1e-9)


def test_closed_form_beats_uniform_by_the_am_gm_ratio() -> None:
    c, n = _case(7)
    R = baq.closed_form_bits(c, n, 3.0, 2.0)
    opt = float(baq.predicted_loss(c, n, R, 2.0).sum())
    uni = float(baq.predicted_loss(c, n, torch.full_like(c, 3.0), 2.0).sum())
    w = n / n.sum()
    geo, mean = math.exp(float((w * torch.log(c)).sum())), float((w * c).sum())
    assert opt / uni == pytest.approx(geo / mean, rel=1e-9) and opt < uni


@pytest.mark.parametrize("budget", [3.0, 4.0, 2.0])
def test_equal_losses_give_uniform_widths(budget: float) -> None:
    c, n = torch.full((30,), 0.7, dtype=torch.float64), torch.full((30,), 128.0, dtype=torch.float64)
    alloc = baq.allocate(c, n, budget, CHOICES)
    assert alloc.bits.tolist() == [int(budget)] * 30 and alloc.realized == budget and alloc.moves == 0


@pytest.mark.parametrize("scoped", [False, True])
@pytest.mark.parametrize("budget", [2.0, 2.5, 3.0, 3.3, 4.0, 5.7, 8.0])
@pytest.mark.parametrize("seed", range(4))
def test_projection_hits_the_budget_on_kernel_widths(seed: int, budget: float, scoped: bool) -> None:
    c, n = _case(seed, groups=400)
    scopes = torch.arange(400) // 20 if scoped else None
    alloc = baq.allocate(c, n, budget, CHOICES, scopes=scopes)
    assert set(alloc.bits.tolist()) <= set(CHOICES)
    realized = float((n * alloc.bits).sum() / n.sum())
    assert realized == pytest.approx(alloc.realized) and budget - 0.01 <= realized <= budget + 1e-12
    if budget in CHOICES:  # never worse than spending the budget uniformly, on its own loss model
        assert alloc.predicted <= float(baq.predicted_loss(c, n, torch.full_like(c, budget)).sum()) * (1 + 1e-12)


def test_projection_matches_the_exhaustive_optimum_on_small_cases() -> None:
    """Few groups, widths 2..4: the rounded-and-repaired allocation's modelled loss is within 5 %
    of the best of all 3^8 assignments under the budget (it is a greedy, not an exact knapsack)."""
    import itertools

    worst = 0.0
    for seed in range(20):
        c, n = _case(seed, groups=8, spread=1.5)
        n = torch.full_like(n, 64.0)
        alloc = baq.allocate(c, n, 3.0, (2, 3, 4), tol=0.2)
        best = min(float(baq.predicted_loss(c, n, torch.tensor(b, dtype=torch.float64)).sum())
                   for b in itertools.product((2, 3, 4), repeat=8) if sum(b) <= 24)
        worst = max(worst, alloc.predicted / best)
    assert worst <= 1.05


def test_budget_outside_the_choices_and_coarse_groups_are_refused() -> None:
    c, n = _case(0, groups=4)
    with pytest.raises(ValueError, match="outside the choices 2..8"):
        baq.allocate(c, n, 1.5, CHOICES)
    with pytest.raises(ValueError, match="too coarse.*nearest"):
        baq.allocate(c, torch.tensor([1.0, 1.0, 1.0, 1e6], dtype=torch.float64), 2.5, CHOICES)


def test_group_sensitivity_means_each_group_and_the_ragged_last_one() -> None:
    loss = torch.arange(1.0, 11.0, dtype=torch.float64)  # 10 columns, groups of 4: 4 + 4 + 2
    c = baq.group_sensitivity(loss, rows=5, group_width=4, ref_bits=3, theta=2.0)
    want = torch.tensor([10 / 20, 26 / 20, 19 / 10], dtype=torch.float64) * 2.0 ** 6
    assert torch.allclose(c, want)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("in_f,gs", [(96, 32), (100, 32)])
def test_one_width_everywhere_is_plain_gptq(act_order: bool, symmetric: bool, in_f: int, gs: int) -> None:
    """Groups of original columns (no act-order, or static groups): exactly GPTQ's codes."""
    g = torch.Generator().manual_seed(in_f)
    W = torch.randn(24, in_f, generator=g)
    X = torch.randn(400, in_f, generator=g, dtype=torch.float64)
    H = X.T @ X / 400
    spec = QuantSpec(3, gs, symmetric, mse=True)
    qw, st = gptq_quantize(W, H, spec, act_order=act_order, block_size=64)
    mixed, st2 = gptq_quantize_mixed(W, H, spec, [3] * spec.n_groups(in_f), act_order=act_order, block_size=64,
                                     static_groups=act_order)
    assert len(mixed.parts) == 1
    assert torch.equal(mixed.dequantize(), qw.dequantize())
    assert torch.equal(st.column_loss, st2.column_loss)
    assert st.loss == pytest.approx(float(st.column_loss.sum()))


@pytest.mark.parametrize("act_order", [False, True])
def test_mixed_widths_store_what_they_solved_and_spend_bits_where_asked(act_order: bool) -> None:
    g = torch.Generator().manual_seed(3)
    W = torch.randn(37, 133, generator=g)  # odd rows, ragged last group (133 = 4·32 + 5)
    X = torch.randn(500, 133, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, 133, dtype=torch.float64)
    H = X.T @ X / 500
    spec = QuantSpec(4, 32, symmetric=False)
    widths = [2, 8, 3, 4, 3]
    mixed, st = gptq_quantize_mixed(W, H, spec, widths, act_order=act_order)
    assert [p.spec.bits for p in mixed.parts] == [2, 4, 8, 3]  # the ragged group's width last
    assert sorted(mixed.perm.tolist()) == list(range(133))
    for p in mixed.parts:  # codes inside each width's signed range
        lo, hi = -(1 << (p.spec.bits - 1)), (1 << (p.spec.bits - 1)) - 1
        assert int(p.codes.min()) >= lo and int(p.codes.max()) <= hi
    lin = MixedQuantLinear.from_quantized(mixed.parts, None, mixed.perm)
    assert torch.allclose(lin.dequantized_weight(torch.float32), mixed.dequantize(), atol=1e-6)
    x = torch.randn(3, 133, dtype=torch.float64)
    assert torch.allclose(lin.reference_forward(x), x @ mixed.dequantize().double().T, atol=1e-5)
    # more bits where asked means less output error than 2 bits everywhere, more than 8 everywhere
    errs = {}
    for name, ws in (("low", [2] * 5), ("mixed", widths), ("high", [8] * 5)):
        deq = gptq_quantize_mixed(W, H, spec, ws, act_order=act_order)[0].dequantize()
        errs[name] = relative_output_error(W, deq, H)
    assert errs["high"] < errs["mixed"] < errs["low"]
    with pytest.raises(ValueError, match="5 group widths for 4"):
        gptq_quantize_mixed(W[:, :128], H[:128, :128], spec, widths)


def test_knapsack_is_exact_and_rescues_coarse_groups() -> None:
    import itertools

    g = torch.Generator().manual_seed(5)
    for _ in range(10):
        costs = torch.randint(1, 9, (6, 3), generator=g).to(torch.float64) * 3
        values = torch.rand(6, 3, generator=g, dtype=torch.float64)
        cap = float(costs.min(dim=1).values.sum() + 12)
        pick = baq.knapsack(costs, values, cap)
        brute = min((sum(float(values[i, k]) for i, k in enumerate(ks)), ks)
                    for ks in itertools.product(range(3), repeat=6)
                    if sum(float(costs[i, k]) for i, k in enumerate(ks)) <= cap)
        assert float(values[torch.arange(6), pick].sum()) == pytest.approx(brute[0])
    # three big layers and one small one at 2..4 bits: rounding + greedy strands bits below 3.0,
    # the exact solve finds an assignment that spends them
    c = torch.tensor([1.0, 8.0, 0.2, 3.0], dtype=torch.float64)
    n = torch.tensor([4096.0, 4096.0, 4096.0, 1024.0], dtype=torch.float64)
    alloc = baq.allocate(c, n, 3.0, (2, 3, 4))
    assert 2.99 <= alloc.realized <= 3.0


def test_act_order_groups_are_cut_from_the_processing_order() -> None:
    """Under act-order (dynamic groups) group g holds the columns ranked g·gs..(g+1)·gs by Hessian
    diagonal; the stored permutation lists them, so the 8-bit group is the most sensitive one."""
    g = torch.Generator().manual_seed(11)
    W = torch.randn(16, 96, generator=g)
    scale = torch.rand(96, generator=g, dtype=torch.float64) * 4 + 0.1
    X = torch.randn(400, 96, generator=g, dtype=torch.float64) * scale
    H = X.T @ X / 400
    order = torch.argsort(torch.diagonal(H), descending=True)
    mixed, _ = gptq_quantize_mixed(W, H, QuantSpec(4, 32), [8, 3, 2], act_order=True)
    assert [p.spec.bits for p in mixed.parts] == [2, 3, 8]
    assert set(mixed.perm[64:].tolist()) == set(order[:32].tolist())  # the 8-bit range: the top 32
    lin = MixedQuantLinear.from_quantized(mixed.parts, None, mixed.perm)
    assert torch.allclose(lin.dequantized_weight(torch.float32), mixed.dequantize(), atol=1e-6)
    fixed, _ = gptq_quantize_mixed(W, H, QuantSpec(4, 32), [8, 3, 2], act_order=True, perm=order.flip(0))
    assert set(fixed.perm[64:].tolist()) == set(order[-32:].tolist())  # a given order is used as is


def test_scoped_repair_weighs_every_scope_alike() -> None:
    """Scopes whose losses differ by orders of magnitude (layers) each keep about the budget: the
    repair after rounding compares losses relative to each scope's own level, not raw ones."""
    g = torch.Generator().manual_seed(2)
    c = torch.exp(0.6 * torch.randn(400, generator=g, dtype=torch.float64))
    c = c * 10.0 ** (torch.arange(400) // 40).to(torch.float64)  # ten scopes, 10^0 .. 10^9
    n = torch.full((400,), 64.0 * 576, dtype=torch.float64)
    scopes = torch.arange(400) // 40
    alloc = baq.allocate(c, n, 3.0, CHOICES, scopes=scopes)
    per_scope = alloc.bits.to(torch.float64).view(10, 40).mean(dim=1)
    assert float((per_scope - 3.0).abs().max()) <= 0.15, per_scope  # rounding inside a scope: ±0.025 a group
