"""Concatenated-matrix SVD estimators, bounds and clustering (compress.algos.concat_svd) against
the exact SVD of the concatenation, on random and structured blocks."""

from __future__ import annotations

import math

import pytest
import torch

from compress.algos import concat_svd as cs


def _case(g: torch.Generator, kind: str) -> tuple[list[torch.Tensor], int]:
    """Blocks ``[m, n_i]`` and a rank: random, shared low-rank subspace, scaled, or rank-deficient."""
    m = int(torch.randint(4, 20, (1,), generator=g))
    k = int(torch.randint(1, 7, (1,), generator=g))
    widths = [int(torch.randint(1, 2 * m, (1,), generator=g)) for _ in range(k)]
    r = int(torch.randint(1, m + 1, (1,), generator=g))
    f = dict(dtype=torch.float64, generator=g)
    if kind == "random":
        blocks = [torch.randn(m, n, **f) for n in widths]
    elif kind == "shared":  # a common rank-s column space plus a little noise
        s = max(1, m // 3)
        base = torch.randn(m, s, **f)
        blocks = [base @ torch.randn(s, n, **f) + 1e-3 * torch.randn(m, n, **f) for n in widths]
    elif kind == "scaled":  # norms over orders of magnitude
        blocks = [10.0 ** float(torch.randint(-3, 4, (1,), generator=g)) * torch.randn(m, n, **f) for n in widths]
    else:  # rank-deficient blocks
        blocks = []
        for n in widths:
            q = int(torch.randint(1, max(2, min(m, n)), (1,), generator=g))
            blocks.append(torch.randn(m, q, **f) @ torch.randn(q, n, **f))
    return blocks, r


KINDS = ("random", "shared", "scaled", "deficient")


def _incremental(est: cs.Estimator, blocks: list[torch.Tensor]) -> float:
    state = est.start(blocks[:1])
    for b in blocks[1:]:
        state = est.add(state, b)
    return est.error(state)


def test_bounds_never_below_exact_and_estimator_exact_with_full_oversampling() -> None:
    """≥ 500 cases: max-norm and residual bounds ≥ exact; Gram estimator = exact when r + p ≥ Σ n_i."""
    g = torch.Generator().manual_seed(0)
    n_cases = 0
    for i in range(600):
        blocks, r = _case(g, KINDS[i % len(KINDS)])
        exact = cs.exact_error(blocks, r)
        for name in ("maxnorm", "residual"):
            bound = _incremental(cs.make_estimator(name, r), blocks)  # type: ignore[arg-type]
            assert bound >= exact - 1e-7, (name, i, bound, exact)  # sqrt of fp64 round-off ~1.5e-8
        cols = sum(b.shape[1] for b in blocks)
        approx = _incremental(cs.GramEstimator(r, oversample=cols), blocks)
        assert approx == pytest.approx(exact, abs=1e-6), (i, approx, exact)
        n_cases += 1
    assert n_cases >= 500


def test_maxnorm_seed_wider_than_rank_credits_only_its_top_energy() -> None:
    """Crediting a wide seed's full norm (the reference code's pitfall) would report error 0 here."""
    g = torch.Generator().manual_seed(1)
    A = torch.randn(10, 30, dtype=torch.float64, generator=g)
    est = cs.MaxNormEstimator(rank=2)
    bound = est.error(est.start([A]))
    assert bound == pytest.approx(cs.exact_error([A], 2), abs=1e-12) and bound > 0.5


def test_gram_estimator_is_close_on_a_shared_subspace() -> None:
    """Blocks sharing a rank-6 space: the bounds see no in-span credit, the estimator is near exact."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(64, 6, dtype=torch.float64, generator=g)
    blocks = [base @ torch.randn(6, 4, dtype=torch.float64, generator=g)
              + 1e-2 * torch.randn(64, 4, dtype=torch.float64, generator=g) for _ in range(12)]
    exact = cs.exact_error(blocks, 8)
    approx = _incremental(cs.GramEstimator(8, 5), blocks)
    assert abs(approx - exact) < 0.1 * exact + 1e-4
    assert _incremental(cs.ResidualEstimator(8), blocks) > 10 * exact


def test_estimators_do_not_change_their_state() -> None:
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randn(8, 5, dtype=torch.float64, generator=g) for _ in range(2))
    for name in ("approx", "residual", "maxnorm"):
        est = cs.make_estimator(name, 3)  # type: ignore[arg-type]
        s0 = est.start([a])
        e0 = est.error(s0)
        est.add(s0, b)
        assert est.error(s0) == e0


def test_identical_blocks_form_one_cluster() -> None:
    g = torch.Generator().manual_seed(4)
    A = torch.randn(16, 4, dtype=torch.float64, generator=g) @ torch.randn(4, 12, dtype=torch.float64, generator=g)
    for name in ("approx", "residual", "maxnorm"):
        res = cs.cluster_blocks([A.clone() for _ in range(6)], rank=4, eps=0.05, estimator=name)  # type: ignore[arg-type]
        if name == "approx":
            assert [sorted(c.members) for c in res.clusters] == [list(range(6))]
            assert res.clusters[0].exact < 1e-6
        else:  # the provable bounds give no in-span credit: sharing is never proven here
            assert all(c.exact <= 0.05 for c in res.clusters)


def test_orthogonal_full_rank_blocks_with_small_eps_are_singletons() -> None:
    g = torch.Generator().manual_seed(5)
    Q, _ = torch.linalg.qr(torch.randn(24, 24, dtype=torch.float64, generator=g))
    blocks = [Q[:, 6 * i: 6 * i + 6] * (1.0 + 0.1 * i) for i in range(4)]  # mutually orthogonal ranges
    for name in ("approx", "residual", "maxnorm"):
        res = cs.cluster_blocks(blocks, rank=6, eps=0.01, estimator=name)  # type: ignore[arg-type]
        assert sorted(len(c.members) for c in res.clusters) == [1, 1, 1, 1]
        assert all(c.exact < 1e-6 for c in res.clusters)  # 0 up to the round-off of a Gram


def test_every_final_cluster_is_confirmed_exactly() -> None:
    g = torch.Generator().manual_seed(6)
    for trial in range(20):
        blocks, r = _case(g, KINDS[trial % len(KINDS)])
        eps = 0.05 + 0.4 * float(torch.rand(1, generator=g))
        res = cs.cluster_blocks(blocks, r, eps, estimator="approx", patience=3, oversample=2)
        assert sorted(j for c in res.clusters for j in c.members) == list(range(len(blocks)))
        for c in res.clusters:
            assert c.exact == pytest.approx(cs.exact_error([blocks[j] for j in c.members], r), abs=1e-6)
            if len(c.members) > 1:
                assert c.exact <= eps
        assert res.exact_svds >= len(res.clusters)
        assert [res.labels[j] for j in res.clusters[0].members] == [0] * len(res.clusters[0].members)


def test_patience_turns_the_rest_into_singletons() -> None:
    g = torch.Generator().manual_seed(7)
    blocks = [torch.randn(10, 10, dtype=torch.float64, generator=g) for _ in range(8)]
    res = cs.cluster_blocks(blocks, rank=2, eps=0.1, patience=2)
    assert len(res.clusters) == 8 and res.evaluations <= 2 * 7


def test_shared_factors_exact_at_full_rank() -> None:
    """At r ≥ rank(M) the shared basis reconstructs every block to fp64 precision."""
    g = torch.Generator().manual_seed(8)
    base = torch.randn(20, 5, dtype=torch.float64, generator=g)
    blocks = [base @ torch.randn(5, n, dtype=torch.float64, generator=g) for n in (3, 9, 14)]
    fac = cs.shared_factors(blocks, 5)
    for b, c in zip(blocks, fac.coefs):
        assert torch.allclose(fac.U @ c, b, atol=1e-12 * float(b.abs().max()), rtol=0)
    assert torch.allclose(fac.U.T @ fac.U, torch.eye(5, dtype=torch.float64), atol=1e-12)


def test_shared_factors_error_matches_exact_error() -> None:
    g = torch.Generator().manual_seed(9)
    blocks = [torch.randn(12, n, dtype=torch.float64, generator=g) for n in (5, 7)]
    fac = cs.shared_factors(blocks, 4)
    num = sum(float((b - fac.U @ c).pow(2).sum()) for b, c in zip(blocks, fac.coefs))
    den = sum(float(b.pow(2).sum()) for b in blocks)
    assert math.sqrt(num / den) == pytest.approx(cs.exact_error(blocks, 4), abs=1e-12)


def test_allocate_ranks_fits_the_budget_and_beats_uniform() -> None:
    g = torch.Generator().manual_seed(10)
    spectra = [torch.sort(torch.rand(30, dtype=torch.float64, generator=g) ** p, descending=True).values
               for p in (1, 4, 8)]
    costs = [50, 80, 50]
    budget = 10 * sum(costs)
    ranks = cs.allocate_ranks(spectra, costs, budget)
    assert sum(r * c for r, c in zip(ranks, costs)) <= budget
    kept = sum(float((s[:r] ** 2).sum()) for s, r in zip(spectra, ranks))
    uniform = sum(float((s[:10] ** 2).sum()) for s in spectra)
    assert kept >= uniform - 1e-12
    with pytest.raises(ValueError):
        cs.allocate_ranks(spectra, costs, 10)


def test_contiguous_groups() -> None:
    assert cs.contiguous_groups(5, 2) == [[0, 1], [2, 3], [4]]


def test_bad_arguments() -> None:
    a = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError):
        cs.cluster_blocks([a], 2, 1.0)
    with pytest.raises(ValueError):
        cs.exact_error([a, torch.randn(5, 3)], 2)
    with pytest.raises(ValueError):
        cs.make_estimator("nope", 2)  # type: ignore[arg-type]


def test_refit_minimises_the_output_error_for_a_fixed_basis() -> None:
    """``C = (BᵀGB)⁻¹BᵀGWᵀ`` beats the plain projection in the metric ``G`` and is exact when the
    basis spans the weight's row space."""
    g = torch.Generator().manual_seed(11)
    X = torch.randn(200, 12, dtype=torch.float64, generator=g) * torch.linspace(0.1, 3, 12, dtype=torch.float64)
    G = X.T @ X
    W = torch.randn(7, 12, dtype=torch.float64, generator=g)
    B = torch.linalg.qr(torch.randn(12, 5, dtype=torch.float64, generator=g)).Q
    C = cs.refit_coefficients(B, W, G, damp=0.0)
    proj = B.T @ W.T
    err = lambda c: float((X @ (W.T - B @ c)).pow(2).sum())  # noqa: E731
    assert err(C) <= err(proj) + 1e-9
    for _ in range(5):  # no perturbation does better
        assert err(C) <= err(C + 1e-3 * torch.randn(C.shape, dtype=torch.float64, generator=g)) + 1e-12
    full = torch.linalg.qr(W.T).Q  # [12, 7] spans W's rows
    assert torch.allclose(full @ cs.refit_coefficients(full, W, G, damp=0.0), W.T, atol=1e-10)


def test_mean_gram_weighs_layers_equally() -> None:
    a = torch.eye(4, dtype=torch.float64) * 100.0
    b = torch.diag(torch.tensor([1.0, 2.0, 3.0, 2.0], dtype=torch.float64))
    m = cs.mean_gram([a, b])
    assert torch.allclose(m, 0.5 * (torch.eye(4, dtype=torch.float64) + b / 2.0))
