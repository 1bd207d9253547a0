"""SliceGPT math: PCA bases of residual-stream activations, norm-scale folding, rotation and
slicing of weights, shortcut matrices, and the width schedule.

Conventions (``transformers`` layout, ``y = x Wᵀ + b``):

* a *basis* is a ``[D, d]`` float64 matrix with orthonormal columns (the first ``d`` principal
  directions of a residual point); ``None`` stands for the identity at full width ``D`` (a
  point that is neither rotated nor sliced);
* a linear that *reads* the residual gets ``W ← W·B`` (its input columns rotated and sliced);
* a linear that *writes* the residual gets ``W ← Bᵀ·W`` and ``b ← Bᵀ·b``;
* where the residual passes from basis ``A`` to basis ``B`` it is multiplied by ``AᵀB``
  (a *shortcut*, stored as a linear with weight ``BᵀA``).

RMS normalisation is rotation invariant (``‖xQ‖ = ‖x‖``) once its scale γ has been folded into
the linears that read it, which is what makes the rotations function preserving. Everything
here takes and returns tensors; no modules, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from compress.errors import NumericsError


# -- widths ---------------------------------------------------------------------------------
def sliced_width(full: int, fraction: float, multiple: int = 8) -> int:
    """Width kept when ``fraction`` of ``full`` is sliced off.

    ``⌊(1 − fraction)·full⌋`` rounded down to a multiple of ``multiple`` (at least one
    multiple); a point that loses nothing keeps its full width even when ``full`` itself is
    not a multiple.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    d = math.floor((1.0 - fraction) * full + 1e-9)
    if d >= full:
        return full
    return min(full, max(multiple, d - d % multiple))


# -- PCA ------------------------------------------------------------------------------------
@dataclass
class PCA:
    """Principal directions of one residual point.

    Args:
        basis: ``[D, D]`` float64 eigenvectors, columns by decreasing eigenvalue.
        eigenvalues: ``[D]`` float64 eigenvalues of the (undamped) second moment, decreasing.
        damp: damping added to the diagonal before ``eigh``.
    """

    basis: Tensor
    eigenvalues: Tensor
    damp: float

    def kept(self, d: int) -> float:
        """Fraction of the activations' energy (``Σ‖x‖²``) the first ``d`` directions keep."""
        ev = self.eigenvalues.clamp_min(0)
        total = float(ev.sum())
        return float(ev[:d].sum()) / total if total > 0 else 1.0

    def dropped(self, d: int) -> float:
        """Mean energy per row (``E‖x‖²`` of the directions after ``d``) that slicing removes."""
        return float(self.eigenvalues[d:].clamp_min(0).sum())


def pca(second_moment: Tensor, damp: float = 0.01, retries: int = 4) -> PCA:
    """Eigen-decomposition of the un-centred second moment ``E[xᵀx]`` in float64.

    ``damp·mean(diag)`` is added to the diagonal (it shifts eigenvalues, not eigenvectors, and
    keeps ``eigh`` well conditioned); on failure the damping grows ×10 and ``eigh`` retries.
    """
    C = second_moment.to(torch.float64)
    if not torch.isfinite(C).all():
        raise NumericsError("activation statistics contain NaN/Inf",
                            "the model overflows on the calibration data")
    C = 0.5 * (C + C.T)
    scale = float(C.diagonal().mean().clamp_min(1e-30))
    frac = damp
    for _ in range(retries + 1):
        lam = frac * scale
        try:
            vals, vecs = torch.linalg.eigh(C + lam * torch.eye(C.shape[0], dtype=C.dtype, device=C.device))
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            frac = max(frac * 10, 1e-6)
            continue
        if torch.isfinite(vals).all() and torch.isfinite(vecs).all():
            order = torch.argsort(vals, descending=True)
            return PCA(vecs[:, order].contiguous(), vals[order] - lam, lam)
        frac = max(frac * 10, 1e-6)
    raise NumericsError("eigendecomposition of the activation statistics failed after damping",
                        "check the calibration data and the model for overflow")


def basis_of(p: PCA, d: int) -> Tensor:
    """The first ``d`` principal directions, ``[D, d]``."""
    return p.basis[:, :d]


# -- weights --------------------------------------------------------------------------------
def read_side(W: Tensor, basis: Tensor | None, scale: Tensor | None = None) -> Tensor:
    """``(W·diag(scale))·B`` for a linear that reads the residual (float64 math, W's dtype out)."""
    out = W.to(torch.float64)
    if scale is not None:
        out = out * scale.to(torch.float64)[None, :]
    if basis is not None:
        out = out @ basis
    return out.to(W.dtype)


def write_side(W: Tensor, bias: Tensor | None, basis: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``(BᵀW, Bᵀb)`` for a linear that writes the residual (its output rows rotated, sliced)."""
    if basis is None:
        return W, bias
    Wn = (basis.T @ W.to(torch.float64)).to(W.dtype)
    bn = None if bias is None else (basis.T @ bias.to(torch.float64)).to(bias.dtype)
    return Wn, bn


def shortcut_weight(src: Tensor | None, dst: Tensor | None, full: int) -> Tensor | None:
    """Weight (``[d_dst, d_src]``, float64) of the residual map from basis ``src`` to ``dst``.

    The residual in basis ``A`` is carried into basis ``B`` by ``x ↦ x·AᵀB``; as a linear its
    weight is ``BᵀA``. Two identity bases need no shortcut (``None``).
    """
    if src is None and dst is None:
        return None
    dev = (src if src is not None else dst).device  # type: ignore[union-attr]
    A = src if src is not None else torch.eye(full, dtype=torch.float64, device=dev)
    B = dst if dst is not None else torch.eye(full, dtype=torch.float64, device=dev)
    return B.T @ A


def head_map(src: Tensor | None, gamma: Tensor, dst: Tensor | None) -> Tensor:
    """Weight ``[d_dst, d_src]`` of ``x ↦ x·Aᵀ·diag(γ)·B``: the final residual (basis ``A``)
    scaled by the final norm's γ, expressed in the (tied) head's basis ``B``."""
    g = gamma.to(torch.float64)
    D = g.shape[0]
    A = src if src is not None else torch.eye(D, dtype=torch.float64, device=g.device)
    B = dst if dst is not None else torch.eye(D, dtype=torch.float64, device=g.device)
    return B.T @ (g[:, None] * A)


def rotate_rows(E: Tensor, basis: Tensor, chunk: int = 4096) -> Tensor:
    """``E·B`` for a tall matrix (an embedding table) in float64 row chunks, E's dtype out."""
    out = torch.empty(E.shape[0], basis.shape[1], dtype=E.dtype, device=E.device)
    for i in range(0, E.shape[0], chunk):
        out[i:i + chunk] = (E[i:i + chunk].to(torch.float64) @ basis).to(E.dtype)
    return out


# -- normalisation --------------------------------------------------------------------------
def rms_norm_at_width(full: int, width: int, eps: float, dropped: float = 0.0) -> tuple[float, float]:
    """(scale, eps′) making ``scale·x·rsqrt(mean_width(x²) + eps′)`` equal
    ``x·rsqrt((Σx² + dropped)/full + eps)``: an RMSNorm over ``width`` columns that still divides
    by the *original* width, written with the standard module (constant weight, rescaled eps).

    ``dropped`` is the energy the sliced-off directions carried (per token, on average): adding
    it back under the square root restores the norm the unsliced activations had, on average,
    instead of inflating every token whose energy was partly sliced off. 0 is exact invariance.
    """
    r = full / width
    return math.sqrt(r), eps * r + dropped / width


def unit_rows(x: Tensor) -> Tensor:
    """Every row of ``x`` (``[..., D]``) scaled to RMS 1 (norm ``√D``); zero rows stay zero."""
    x32 = x.to(torch.float32)
    rms = x32.pow(2).mean(-1, keepdim=True).sqrt()
    return x32 / rms.clamp_min(torch.finfo(torch.float32).tiny)


def orthonormality_error(B: Tensor) -> float:
    """``max |BᵀB − I|`` (0 for orthonormal columns)."""
    B = B.to(torch.float64)
    return float((B.T @ B - torch.eye(B.shape[1], dtype=torch.float64, device=B.device)).abs().max())
