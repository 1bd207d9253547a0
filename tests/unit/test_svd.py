"""Truncated SVD math (compress/algos/svd.py) against slow, obvious references.

References: plain truncation through the eigenvectors of ``WᵀW`` (not ``torch.linalg.svd``);
whitened truncation through the *symmetric* square root of ``G`` from ``eigh`` (not Cholesky),
``W_r = ((W G^½)_r) G^-½`` — the same optimum reached by a different route.
"""

from __future__ import annotations

import pytest
import torch

from compress.algos import svd
from compress.errors import NumericsError

SHAPES = [(24, 40), (40, 24), (32, 32)]  # (out, in): wide, tall, square


def _weights(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g, dtype=torch.float64)


def _correlated_inputs(in_f: int, rows: int = 400, seed: int = 1) -> torch.Tensor:
    """Rows with a strongly non-isotropic covariance (a few loud, mixed channels)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=g, dtype=torch.float64)
    scales = torch.logspace(0, -3, in_f, dtype=torch.float64)
    return torch.randn(rows, in_f, generator=g, dtype=torch.float64) * scales @ mix


def _reference_plain(W: torch.Tensor, r: int) -> torch.Tensor:
    """Rank-r truncation from the top eigenvectors of WᵀW: W Q_r Q_rᵀ."""
    evals, evecs = torch.linalg.eigh(W.T @ W)
    Q = evecs[:, evals.argsort(descending=True)[:r]]
    return W @ Q @ Q.T


def _reference_whitened(W: torch.Tensor, G: torch.Tensor, r: int) -> torch.Tensor:
    """Output-optimal rank-r weight through the symmetric square root of G."""
    evals, evecs = torch.linalg.eigh(G)
    root = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    inv_root = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    return _reference_plain(W @ root, r) @ inv_root


def _out_err(W: torch.Tensor, W_r: torch.Tensor, X: torch.Tensor) -> float:
    return float(((X @ (W - W_r).T) ** 2).sum() / ((X @ W.T) ** 2).sum())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("whiten", [False, True])
def test_full_rank_reproduces_the_layer_fp32(shape: tuple[int, int], whiten: bool) -> None:
    W = _weights(*shape).float()
    X = _correlated_inputs(shape[1])
    G = (X.T @ X) / X.shape[0] if whiten else None
    f = svd.truncated_svd(W, min(shape), G, damp=0.0)
    U, V = f.U.float(), f.V.float()
    assert U.shape == (shape[1], min(shape)) and V.shape == (min(shape), shape[0])
    x = torch.randn(7, shape[1])
    ref = x.double() @ W.double().T
    err = float((x @ U @ V - ref).abs().max() / ref.abs().max())
    assert err < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_plain_truncation_matches_the_eigenvector_reference(shape: tuple[int, int]) -> None:
    W = _weights(*shape)
    for r in (1, 5, min(shape) - 1):
        got = svd.truncated_svd(W, r).weight()
        assert torch.allclose(got, _reference_plain(W, r), atol=1e-9), r


@pytest.mark.parametrize("shape", SHAPES)
def test_whitened_truncation_matches_the_symmetric_root_reference(shape: tuple[int, int]) -> None:
    W = _weights(*shape)
    X = _correlated_inputs(shape[1])
    G = X.T @ X / X.shape[0]
    for r in (2, 7, min(shape) - 2):
        got = svd.truncated_svd(W, r, G, damp=0.0).weight()
        ref = _reference_whitened(W, G, r)
        assert float((X @ (got - ref).T).norm() / (X @ W.T).norm()) < 1e-8, r


@pytest.mark.parametrize("shape", SHAPES)
def test_whitened_output_error_never_exceeds_plain_on_correlated_inputs(shape: tuple[int, int]) -> None:
    W = _weights(*shape)
    X = _correlated_inputs(shape[1])
    G = X.T @ X / X.shape[0]
    for r in range(1, min(shape)):
        plain = _out_err(W, svd.truncated_svd(W, r).weight(), X)
        white = _out_err(W, svd.truncated_svd(W, r, G, damp=0.0).weight(), X)
        assert white <= plain * (1 + 1e-9), (r, white, plain)
    mid = min(shape) // 2
    plain = _out_err(W, svd.truncated_svd(W, mid).weight(), X)
    white = _out_err(W, svd.truncated_svd(W, mid, G, damp=0.0).weight(), X)
    assert white < 0.5 * plain  # on strongly correlated inputs the gain is large, not marginal


def test_identity_gram_reduces_whitened_to_plain() -> None:
    W = _weights(20, 30)
    for r in (1, 6, 20):
        white = svd.truncated_svd(W, r, torch.eye(30, dtype=torch.float64), damp=0.0)
        plain = svd.truncated_svd(W, r)
        assert torch.allclose(white.U, plain.U, atol=1e-12) and torch.allclose(white.V, plain.V, atol=1e-12)


def test_relative_output_error_from_the_gram_equals_the_direct_one() -> None:
    W = _weights(16, 24)
    X = _correlated_inputs(24)
    W_r = svd.truncated_svd(W, 5).weight()
    assert svd.relative_output_error(W, W_r, X.T @ X) == pytest.approx(_out_err(W, W_r, X), rel=1e-9)
    assert svd.relative_weight_error(W, W) == 0.0


def test_singular_gram_falls_back_to_an_eigenvalue_shift() -> None:
    W = _weights(12, 16)
    X = _correlated_inputs(16, rows=8)  # 8 rows < 16 inputs: G has rank 8
    X[:, 3] = 0.0  # and a dead channel
    G = X.T @ X
    G[5, 5] -= 1e-6 * float(G.diagonal().mean())  # round-off style negative eigenvalue
    white = svd.whitening(G, damp=0.0)
    assert white.method == "eigen-shift" and white.shift > 0
    assert torch.allclose(white.L @ white.L.T, G + white.shift * torch.eye(16, dtype=torch.float64), atol=1e-8)
    f = svd.factors(svd.spectrum(W, white), 6)
    assert torch.isfinite(f.U).all() and torch.isfinite(f.V).all()
    assert _out_err(W, f.weight(), X) <= _out_err(W, svd.truncated_svd(W, 6).weight(), X) + 1e-6


def test_damping_is_relative_to_the_mean_diagonal() -> None:
    G = torch.diag(torch.tensor([4.0, 2.0, 0.0], dtype=torch.float64))
    white = svd.whitening(G, damp=0.5)
    assert white.method == "cholesky" and white.shift == pytest.approx(0.5 * 2.0)


@pytest.mark.parametrize("bad", ["nan", "zero"])
def test_bad_grams_fail_loudly(bad: str) -> None:
    G = torch.eye(4, dtype=torch.float64)
    if bad == "nan":
        G[1, 2] = float("nan")
    else:
        G.zero_()
    with pytest.raises(NumericsError):
        svd.whitening(G)


def test_rank_arithmetic_counts_both_factors() -> None:
    assert svd.rank_for_ratio(576, 576, 0.5) == 144  # 144 · 1152 = 0.5 · 576²
    assert svd.rank_for_ratio(576, 1536, 0.5) == 209  # ⌊0.5 · 576 · 1536 / 2112⌋
    assert svd.lowrank_params(576, 1536, 209) <= 0.5 * 576 * 1536 < svd.lowrank_params(576, 1536, 210)
    assert svd.rank_for_ratio(576, 576, 1.0) is None  # 288 · 1152 = 576²: not smaller, stays dense
    assert svd.rank_for_ratio(10, 10, 0.99) == 4  # 4 · 20 = 80 < 100
    assert svd.rank_for_ratio(4, 4, 0.2) is None  # rank 0 is no factorisation
    assert svd.saves_params(100, 50, 33) and not svd.saves_params(100, 50, 34)
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError):
            svd.rank_for_ratio(8, 8, bad)


def test_rank_for_energy() -> None:
    sigma = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert svd.rank_for_energy(sigma, 9 / 14) == 1
    assert svd.rank_for_energy(sigma, 9 / 14 + 1e-6) == 2
    assert svd.rank_for_energy(sigma, 0.99) == 3
    assert svd.rank_for_energy(sigma, 1.0) == 3
    spec = svd.spectrum(_weights(6, 9))
    r = svd.rank_for_energy(spec.sigma, 0.8)
    assert spec.energy(r) >= 0.8 > spec.energy(r - 1)


def test_per_head_factors_are_independent_heads_in_the_stored_layout() -> None:
    heads, hd, in_f, r = 3, 8, 20, 5
    W = _weights(heads * hd, in_f)
    X = _correlated_inputs(in_f)
    white = svd.whitening(X.T @ X, 0.0)
    hf = svd.head_factors(svd.head_spectra(W, heads, white), r)
    assert hf.U.shape == (in_f, heads * r) and hf.V.shape == (heads, r, hd)
    assert hf.U.numel() + hf.V.numel() == heads * r * (in_f + hd)
    Wr = hf.weight()
    for h in range(heads):
        ref = _reference_whitened(W[h * hd:(h + 1) * hd], X.T @ X, r)
        assert torch.allclose(Wr[h * hd:(h + 1) * hd], ref, atol=1e-8)
        Uh, Vh = hf.U[:, h * r:(h + 1) * r], hf.V[h]
        assert torch.allclose((Uh @ Vh).T, Wr[h * hd:(h + 1) * hd], atol=1e-12)
    full = svd.head_factors(svd.head_spectra(W, heads, None), hd)
    assert torch.allclose(full.weight(), W, atol=1e-10)
