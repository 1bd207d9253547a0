"""Truncated SVD of linear weights, plain or whitened by the calibration inputs (SVD-LLM).

A linear layer computes ``y = x Wᵀ`` with ``W [out, in]``. A rank-``r`` factorisation is stored
as ``U [in, r]`` and ``V [r, out]`` with ``W_r = (U V)ᵀ``, so ``y ≈ (x U) V``.

* **Plain:** ``W = P Σ Qᵀ``; keep the top ``r`` triplets. This minimises the *weight* error
  ``‖W − W_r‖_F``.
* **Whitened:** with the calibration Gram ``G = XᵀX = L Lᵀ`` (Cholesky, float64), the output
  error is ``‖X (W − W_r)ᵀ‖_F = ‖(W − W_r) L‖_F``. Truncating the SVD of ``W L`` is therefore
  the optimal rank-``r`` approximation *in output space* (Eckart–Young), and
  ``W_r = (W L)_r L⁻¹``. The ``L⁻¹`` is folded into ``U`` with a triangular solve
  (``U = L⁻ᵀ Q_r Σ_r^½``), never an explicit inverse.

Σ is split evenly between the factors (``Σ^½`` in each), which keeps ``U`` and ``V`` at similar
magnitudes for half-precision serving. With ``L = I`` the whitened path is the plain one.

Rank selection counts parameters honestly: a rank-``r`` factorisation stores ``r (in + out)``
numbers against ``in · out`` dense; a layer whose factors would not be smaller stays dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from compress.errors import NumericsError


@dataclass
class Whitening:
    """Lower-triangular ``L`` with ``L Lᵀ = G + shift·I`` (float64) and how it was obtained."""

    L: Tensor
    shift: float  # absolute diagonal shift that was added to G
    method: str  # "cholesky" (damping only) or "eigen-shift" (fallback)


@dataclass
class Spectrum:
    """SVD of ``W L`` (or of ``W``): ``P [out, k]``, ``sigma [k]``, ``Qt [k, in]``, float64."""

    P: Tensor
    sigma: Tensor
    Qt: Tensor
    whitening: Whitening | None

    def energy(self, r: int) -> float:
        """Fraction of ``‖W L‖_F²`` (output energy when whitened) kept by the top ``r``."""
        s2 = self.sigma.double() ** 2
        total = float(s2.sum())
        return float(s2[:r].sum()) / total if total > 0 else 1.0


@dataclass
class Factors:
    """``W_r = (U V)ᵀ``: ``U [in, r]``, ``V [r, out]`` (float64 until cast by the caller)."""

    U: Tensor
    V: Tensor

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])

    def weight(self) -> Tensor:
        """The dense ``[out, in]`` weight the factors stand for."""
        return (self.U @ self.V).T


# -- whitening ------------------------------------------------------------------------------
def whitening(G: Tensor, damp: float = 0.0) -> Whitening:
    """Cholesky factor of the Gram ``G [in, in]`` in float64, damped by ``damp·mean(diag G)``.

    When Cholesky fails (``G`` singular or indefinite from round-off, e.g. dead input channels)
    the spectrum is shifted by ``|λ_min|`` plus the damping (and a floor of ``1e-10·mean diag``)
    and factorised again. NaN/Inf in ``G`` or a zero ``G`` is a :class:`NumericsError`.
    """
    G = G.to(torch.float64)
    if G.dim() != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"G must be square [in, in], got {tuple(G.shape)}")
    if not torch.isfinite(G).all():
        raise NumericsError("the calibration Gram matrix contains NaN/Inf",
                            "the model overflows on the calibration data; check the inputs")
    G = 0.5 * (G + G.T)  # exact symmetry for the factorisation
    scale = float(G.diagonal().mean())
    if scale <= 0:
        raise NumericsError("the calibration Gram matrix is zero (no signal reached this layer)",
                            "check the calibration data, or use --no-whiten")
    eye = torch.eye(G.shape[0], dtype=torch.float64, device=G.device)
    shift = damp * scale
    L, info = torch.linalg.cholesky_ex(G + shift * eye)
    if int(info) == 0:
        return Whitening(L, shift, "cholesky")
    lam_min = float(torch.linalg.eigvalsh(G).min())
    shift = max(-lam_min, 0.0) + max(damp * scale, 1e-10 * scale)
    for _ in range(4):
        L, info = torch.linalg.cholesky_ex(G + shift * eye)
        if int(info) == 0:
            return Whitening(L, shift, "eigen-shift")
        shift *= 10.0
    raise NumericsError("the calibration Gram matrix cannot be factorised even after an eigenvalue shift",
                        "raise --damp or use --no-whiten")


# -- SVD and factors --------------------------------------------------------------------------
def spectrum(W: Tensor, white: Whitening | None = None) -> Spectrum:
    """SVD of ``W`` (plain) or of ``W L`` (whitened), float64, singular values descending."""
    A = W.to(torch.float64)
    if white is not None:
        if white.L.shape[0] != A.shape[1]:
            raise ValueError(f"whitening is [{white.L.shape[0]}]² but W has {A.shape[1]} inputs")
        A = A @ white.L  # [out, in] @ [in, in]
    if not torch.isfinite(A).all():
        raise NumericsError("the weight contains NaN/Inf", "repair the checkpoint")
    P, sigma, Qt = torch.linalg.svd(A, full_matrices=False)  # [out, k], [k], [k, in]
    return Spectrum(P, sigma, Qt, white)


def factors(spec: Spectrum, rank: int) -> Factors:
    """Rank-``rank`` factors from a spectrum, with the whitening folded back by a triangular solve."""
    k = spec.sigma.numel()
    if not 1 <= rank <= k:
        raise ValueError(f"rank must be in [1, {k}], got {rank}")
    root = spec.sigma[:rank].sqrt()
    Uw = spec.Qt[:rank].T * root  # [in, r] = Q_r Σ^½
    V = root[:, None] * spec.P[:, :rank].T  # [r, out] = Σ^½ P_rᵀ
    if spec.whitening is not None:
        # U = L⁻ᵀ Q_r Σ^½: solve Lᵀ U = Q_r Σ^½ (Lᵀ is upper triangular)
        Uw = torch.linalg.solve_triangular(spec.whitening.L.T, Uw, upper=True)
    return Factors(Uw, V)


def truncated_svd(W: Tensor, rank: int, G: Tensor | None = None, damp: float = 0.0) -> Factors:
    """One call: plain (``G is None``) or whitened rank-``rank`` factors of ``W [out, in]``."""
    white = whitening(G, damp) if G is not None else None
    return factors(spectrum(W, white), rank)


# -- errors ------------------------------------------------------------------------------------
def relative_output_error(W: Tensor, W_r: Tensor, G: Tensor) -> float:
    """``‖X(W − W_r)ᵀ‖² / ‖XWᵀ‖²`` from ``G = XᵀX`` (float64 throughout)."""
    G = G.to(torch.float64)
    D = (W.to(torch.float64) - W_r.to(torch.float64))  # [out, in]
    Wd = W.to(torch.float64)
    num = float(((D @ G) * D).sum())
    den = float(((Wd @ G) * Wd).sum())
    return num / den if den > 0 else 0.0


def relative_weight_error(W: Tensor, W_r: Tensor) -> float:
    """``‖W − W_r‖_F² / ‖W‖_F²`` in float64."""
    Wd = W.to(torch.float64)
    den = float((Wd ** 2).sum())
    return float(((Wd - W_r.to(torch.float64)) ** 2).sum()) / den if den > 0 else 0.0


# -- rank arithmetic ---------------------------------------------------------------------------
def lowrank_params(in_features: int, out_features: int, rank: int) -> int:
    """Numbers stored by rank-``rank`` factors: ``U [in, r]`` + ``V [r, out]``."""
    return rank * (in_features + out_features)


def saves_params(in_features: int, out_features: int, rank: int) -> bool:
    """Whether rank-``rank`` factors are strictly smaller than the dense ``[out, in]`` weight."""
    return lowrank_params(in_features, out_features, rank) < in_features * out_features


def rank_for_ratio(in_features: int, out_features: int, ratio: float) -> int | None:
    """Largest rank whose factors store at most ``ratio`` of the dense parameters.

    ``None`` when no rank ≥ 1 both fits the budget and is smaller than the dense weight (the
    layer then stays dense).
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    r = math.floor(ratio * in_features * out_features / (in_features + out_features) + 1e-9)
    r = min(r, in_features, out_features)
    if r < 1 or not saves_params(in_features, out_features, r):
        return None
    return r


def rank_for_energy(sigma: Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep at least ``energy`` of ``Σ σ²``."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    s2 = sigma.to(torch.float64) ** 2
    total = float(s2.sum())
    if total <= 0:
        return 1
    cum = torch.cumsum(s2, 0) / total
    r = int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=torch.float64, device=cum.device))) + 1
    return min(max(r, 1), sigma.numel())


# -- per-head factorisation ---------------------------------------------------------------------
@dataclass
class HeadFactors:
    """Per-head factors of a q/k/v projection with ``heads`` heads of ``head_dim`` outputs.

    Storage: ``U [in, heads·r]`` (head ``h``'s basis in columns ``h·r … (h+1)·r − 1``) and
    ``V [heads, r, head_dim]``; head ``h``'s output is ``(x U_h) V_h``. ``heads·r·(in + head_dim)``
    numbers against ``in · heads · head_dim`` dense.
    """

    U: Tensor
    V: Tensor

    @property
    def rank(self) -> int:
        return int(self.V.shape[1])

    def weight(self) -> Tensor:
        """The dense ``[heads·head_dim, in]`` weight the factors stand for."""
        H, r, hd = self.V.shape
        Uh = self.U.view(self.U.shape[0], H, r).permute(1, 0, 2)  # [in, H·r] -> [H, in, r]
        return torch.bmm(Uh, self.V).permute(0, 2, 1).reshape(H * hd, -1)  # [H, in, hd] -> [H·hd, in]


def head_spectra(W: Tensor, heads: int, white: Whitening | None) -> list[Spectrum]:
    """One spectrum per head: rows ``h·hd … (h+1)·hd − 1`` of ``W [heads·hd, in]``."""
    if W.shape[0] % heads:
        raise ValueError(f"{W.shape[0]} output rows do not split into {heads} heads")
    return [spectrum(w, white) for w in W.split(W.shape[0] // heads, dim=0)]


def head_factors(spectra: list[Spectrum], rank: int) -> HeadFactors:
    """Rank-``rank`` factors of every head, stacked into the per-head storage layout."""
    fs = [factors(s, rank) for s in spectra]
    U = torch.cat([f.U for f in fs], dim=1)  # [in, H·r]
    V = torch.stack([f.V for f in fs])  # [H, r, hd]
    return HeadFactors(U, V)


def head_rank_for_ratio(in_features: int, head_dim: int, ratio: float) -> int | None:
    """Per-head rank for a parameter ratio (each head is an ``[head_dim, in]`` block)."""
    return rank_for_ratio(in_features, head_dim, ratio)
