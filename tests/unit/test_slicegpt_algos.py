"""SliceGPT math against slow, obvious references and its invariants: widths, PCA of a known
rotation, orthonormal bases, rotation invariance of a pre-norm residual block, the sliced
RMSNorm's divisor, shortcuts and the tied-head map."""

from __future__ import annotations

import math

import pytest
import torch

from compress.algos.slicegpt import (
    basis_of, head_map, orthonormality_error, pca, read_side, rms_norm_at_width, rotate_rows,
    shortcut_weight, sliced_width, unit_rows, write_side)
from compress.errors import NumericsError

G = torch.Generator().manual_seed(0)


def _orthogonal(n: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=G, dtype=torch.float64))
    return q


def _rms(x: torch.Tensor, eps: float, divisor: int) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) / divisor + eps)


@pytest.mark.parametrize("full,frac,mult,want", [
    (576, 0.2, 8, 456), (576, 0.25, 8, 432), (576, 0.3, 8, 400), (576, 0.1, 8, 512),
    (576, 0.0, 8, 576), (100, 0.0, 8, 100), (100, 0.05, 8, 88), (64, 0.95, 8, 8), (576, 0.2, 1, 460)])
def test_sliced_width(full: int, frac: float, mult: int, want: int) -> None:
    assert sliced_width(full, frac, mult) == want


@pytest.mark.parametrize("frac", [1.0, -0.1, 1.5])
def test_sliced_width_rejects_bad_fractions(frac: float) -> None:
    with pytest.raises(ValueError):
        sliced_width(576, frac)


def test_pca_recovers_a_known_rotation() -> None:
    D = 12
    Q = _orthogonal(D)
    sigma = torch.linspace(3.0, 0.2, D, dtype=torch.float64)
    C = Q @ torch.diag(sigma**2) @ Q.T  # second moment of x = z·diag(σ)·Qᵀ, z white
    p = pca(C, damp=0.01)
    # every principal direction is the matching column of Q up to sign
    overlap = (p.basis.T @ Q).abs()
    assert torch.allclose(overlap, torch.eye(D, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(p.eigenvalues, sigma**2, rtol=1e-9)
    assert torch.all(p.eigenvalues[:-1] >= p.eigenvalues[1:])
    ev = torch.linalg.eigvalsh(C).flip(0)
    assert torch.allclose(p.eigenvalues, ev, rtol=1e-9, atol=1e-9)  # damping removed again
    assert math.isclose(p.kept(4), float(ev[:4].sum() / ev.sum()), rel_tol=1e-9)
    assert math.isclose(p.dropped(4), float(ev[4:].sum()), rel_tol=1e-9)
    assert p.kept(D) == pytest.approx(1.0) and p.dropped(D) == pytest.approx(0.0)


def test_pca_basis_is_orthonormal_even_when_rank_deficient() -> None:
    X = torch.randn(50, 3, generator=G, dtype=torch.float64) @ torch.randn(3, 16, generator=G, dtype=torch.float64)
    p = pca(X.T @ X / 50)
    assert orthonormality_error(p.basis) < 1e-10
    assert p.kept(3) == pytest.approx(1.0, abs=1e-9)


def test_pca_fails_loudly_on_nan() -> None:
    C = torch.eye(4, dtype=torch.float64)
    C[1, 2] = float("nan")
    with pytest.raises(NumericsError):
        pca(C)


def test_rms_norm_at_width_divides_by_the_original_width() -> None:
    full, width, eps = 20, 12, 1e-5
    x = torch.randn(7, width, generator=G, dtype=torch.float64)
    scale, eps2 = rms_norm_at_width(full, width, eps)
    ours = scale * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps2)  # the module's formula
    assert torch.allclose(ours, _rms(x, eps, full), rtol=1e-12)
    scale, eps3 = rms_norm_at_width(full, width, eps, dropped=3.0)
    ours = scale * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps3)
    ref = x / torch.sqrt((x.pow(2).sum(-1, keepdim=True) + 3.0) / full + eps)
    assert torch.allclose(ours, ref, rtol=1e-12)
    assert rms_norm_at_width(full, full, eps) == (1.0, eps)


def _block(x, g1, W1, U1, g2, W2, U2, eps, full, basis_in=None, basis_mid=None, basis_out=None,
           S1=None, S2=None):
    """A pre-norm residual block written out by hand (tanh 'attention', relu 'MLP')."""
    n1 = _rms(x, eps, full) * (1 if g1 is None else g1)
    h = (x if S1 is None else x @ S1.T) + torch.tanh(n1 @ W1.T) @ U1.T
    n2 = _rms(h, eps, full) * (1 if g2 is None else g2)
    return (h if S2 is None else h @ S2.T) + torch.relu(n2 @ W2.T) @ U2.T


def test_rotated_block_computes_the_rotated_function() -> None:
    """Fold γ, rotate every point by a different orthogonal basis, carry the residual with
    shortcuts: the block's output is the dense output expressed in the output basis."""
    D, H, eps = 10, 14, 1e-6
    g1, g2 = torch.rand(D, generator=G, dtype=torch.float64) + 0.5, torch.rand(D, generator=G, dtype=torch.float64) + 0.5
    W1, U1 = torch.randn(H, D, generator=G, dtype=torch.float64), torch.randn(D, H, generator=G, dtype=torch.float64)
    W2, U2 = torch.randn(H, D, generator=G, dtype=torch.float64), torch.randn(D, H, generator=G, dtype=torch.float64)
    x = torch.randn(5, D, generator=G, dtype=torch.float64)
    dense = _block(x, g1, W1, U1, g2, W2, U2, eps, D)
    A, B, C = _orthogonal(D), _orthogonal(D), _orthogonal(D)
    W1r, W2r = read_side(W1, A, g1), read_side(W2, B, g2)
    U1r, _ = write_side(U1, None, B)
    U2r, _ = write_side(U2, None, C)
    S1, S2 = shortcut_weight(A, B, D), shortcut_weight(B, C, D)
    rotated = _block(x @ A, None, W1r, U1r, None, W2r, U2r, eps, D, S1=S1, S2=S2)
    assert torch.allclose(rotated, dense @ C, atol=1e-10)
    # slicing every point to its first d directions: same code path, the result is the
    # rotated block restricted to the kept subspaces (sanity of shapes and the divisor)
    d = 6
    sliced = _block(x @ A[:, :d], None, read_side(W1, A[:, :d], g1), write_side(U1, None, B[:, :d])[0],
                    None, read_side(W2, B[:, :d], g2), write_side(U2, None, C[:, :d])[0], eps, D,
                    S1=shortcut_weight(A[:, :d], B[:, :d], D), S2=shortcut_weight(B[:, :d], C[:, :d], D))
    assert sliced.shape == (5, d)


def test_write_side_rotates_bias_and_identity_is_a_no_op() -> None:
    W, b = torch.randn(8, 5, generator=G), torch.randn(8, generator=G)
    Q = _orthogonal(8)[:, :3]
    Wn, bn = write_side(W, b, Q)
    assert torch.allclose(Wn, (Q.T @ W.double()).float(), atol=1e-6)
    assert torch.allclose(bn, (Q.T @ b.double()).float(), atol=1e-6)
    assert write_side(W, b, None) == (W, b)
    assert torch.equal(read_side(W, None), W)


def test_shortcut_weights() -> None:
    D = 9
    A, B = _orthogonal(D)[:, :5], _orthogonal(D)[:, :4]
    x = torch.randn(3, 5, generator=G, dtype=torch.float64)
    assert torch.allclose(x @ shortcut_weight(A, B, D).T, x @ A.T @ B)
    assert shortcut_weight(None, None, D) is None
    assert torch.allclose(shortcut_weight(A, None, D), A)  # back to the original basis
    assert torch.allclose(shortcut_weight(None, B, D), B.T)
    full = shortcut_weight(_orthogonal(D), _orthogonal(D), D)
    assert orthonormality_error(full) < 1e-12  # a full-width shortcut is itself orthogonal
    assert torch.linalg.matrix_norm(shortcut_weight(A, B, D), ord=2) <= 1 + 1e-12


def test_head_map_matches_the_obvious_product() -> None:
    D = 7
    A, B = _orthogonal(D)[:, :4], _orthogonal(D)
    g = torch.rand(D, generator=G, dtype=torch.float64) + 0.5
    x = torch.randn(3, 4, generator=G, dtype=torch.float64)
    assert torch.allclose(x @ head_map(A, g, B).T, x @ A.T @ torch.diag(g) @ B)
    assert torch.allclose(head_map(None, g, None), torch.diag(g))


def test_rotate_rows_in_chunks_equals_one_product() -> None:
    E = torch.randn(1000, 12, generator=G)
    Q = _orthogonal(12)[:, :8]
    assert torch.allclose(rotate_rows(E, Q, chunk=64), (E.double() @ Q).float(), atol=1e-6)


def test_unit_rows() -> None:
    x = torch.randn(4, 6, 16, generator=G) * torch.tensor([1.0, 100.0, 0.01, 5.0])[:, None, None]
    u = unit_rows(x)
    assert torch.allclose(u.pow(2).mean(-1), torch.ones(4, 6), atol=1e-5)
    assert torch.equal(unit_rows(torch.zeros(2, 3)), torch.zeros(2, 3))


def test_basis_of_takes_leading_columns() -> None:
    p = pca(torch.diag(torch.tensor([1.0, 5.0, 3.0], dtype=torch.float64)))
    assert torch.allclose(basis_of(p, 2).abs(), torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
