"""GPTQ: quantise a weight matrix column by column, correcting the remaining columns with the
inverse Hessian of the layer input so the *output* error stays small (Frantar et al., 2022).

``H`` is the (un-normalised or normalised; only ratios matter) Gram matrix ``Σ x xᵀ`` of the
layer input. Rows of ``W`` are independent given ``H``, so fused siblings (q/k/v, gate/up) that
read the same input are quantised in one call by stacking their rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from compress.algos.quant import Grid, QuantizedWeight, QuantSpec, find_grid, group_grids, pack_grids
from compress.errors import NumericsError


@dataclass
class GPTQStats:
    """What one GPTQ call did: OBS loss, damping finally used, dead inputs."""

    loss: float
    damp: float
    dead_inputs: int


def inverse_cholesky(H: Tensor, percdamp: float, max_tries: int = 6) -> tuple[Tensor, float]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = percdamp·mean(diag H)``.

    On failure (H not positive definite) the damping is multiplied by 10 and retried;
    after ``max_tries`` failures a :class:`NumericsError` names the problem.
    """
    H = H.to(torch.float64)
    mean_diag = float(torch.diagonal(H).mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    damp = percdamp
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                return U, damp
        damp *= 10
    raise NumericsError(f"Hessian is not positive definite even with damping {damp / 10:g}",
                        "use more calibration samples or a larger --damp")


def _block_size(block_size: int, spec: QuantSpec, in_f: int) -> int:
    """Blocks hold whole groups, so a group's grid is always computed from updated columns."""
    if spec.per_channel(in_f):
        return block_size
    g = spec.group_width(in_f)
    return g * max(1, block_size // g)


def gptq_quantize(W: Tensor, H: Tensor, spec: QuantSpec, *, block_size: int = 128,
                  percdamp: float = 0.01, act_order: bool = False,
                  static_groups: bool = False) -> tuple[QuantizedWeight, GPTQStats]:
    """Quantise ``W`` ([out, in]) given the input Gram matrix ``H`` ([in, in]).

    Args:
        W: weight, any float dtype (computed in float32).
        H: input second moment, accumulated in float64 preferably.
        spec: bits, group size, symmetry, scale dtype.
        block_size: columns per lazy batch update.
        percdamp: damping as a fraction of mean(diag H) (raised automatically on failure).
        act_order: process columns by decreasing ``diag(H)``; forces static groups so the
            checkpoint needs no ``g_idx``.
        static_groups: compute every group's grid from the original W before the loop.

    Returns:
        the quantised weight (codes in the original column order) and statistics.
    """
    if not torch.isfinite(H).all():
        raise NumericsError("the calibration Hessian contains NaN/Inf",
                            "check the model's activations for overflow (try float32)")
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(torch.float64).clone()
    out_f, in_f = W.shape
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    static = static_groups or act_order
    gw = spec.group_width(in_f)
    # a per-channel grid (group ≥ row width included) spans every block, so it is fixed up front
    grids = _static_grids(W, spec) if static or spec.per_channel(in_f) else None

    perm = torch.argsort(torch.diagonal(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    U, damp = inverse_cholesky(H, percdamp)
    U = U.to(torch.float32)

    codes = torch.empty(out_f, in_f, dtype=torch.int8, device=W.device)
    loss = 0.0
    order = perm.tolist() if perm is not None else list(range(in_f))
    dyn_scales: list[Tensor] = []
    dyn_zeros: list[Tensor] = []
    offset = 1 << (spec.bits - 1)
    B = _block_size(block_size, spec, in_f)
    for i1 in range(0, in_f, B):
        i2 = min(i1 + B, in_f)
        W1 = W[:, i1:i2].clone()  # (out, b) updated in place column by column
        Q1 = torch.empty_like(W1)  # unsigned codes of the block
        Err = torch.empty_like(W1)
        Uii = U[i1:i2, i1:i2]
        grid = None
        for i in range(i2 - i1):
            col = i1 + i
            if grids is not None:
                grid = grids[order[col] // gw]
            elif col % gw == 0:
                grid = find_grid(W1[:, i:i + gw], spec)
                dyn_scales.append(grid.scale)
                dyn_zeros.append(grid.zero)
            w = W1[:, i]
            q = torch.clamp_(torch.round_(w / grid.scale).add_(grid.zero), 0, spec.maxq)  # (out,)
            Q1[:, i] = q
            err = torch.sub(w, (q - grid.zero).mul_(grid.scale)).div_(Uii[i, i])
            Err[:, i] = err
            W1[:, i:].addr_(err, Uii[i, i:], alpha=-1)  # lazy OBS update inside the block
        codes[:, order[i1:i2]] = (Q1 - offset).to(torch.int8)
        loss += float((Err.double() ** 2).sum() / 2)  # one device sync per block
        W[:, i2:] -= Err @ U[i1:i2, i2:]

    if grids is not None:
        scales, zeros = [g.scale for g in grids], [g.zero for g in grids]
    else:
        scales, zeros = dyn_scales, dyn_zeros
    qw = pack_grids(codes, scales, zeros, spec, perm)
    return qw, GPTQStats(float(loss), damp, int(dead.sum()))


def _static_grids(W: Tensor, spec: QuantSpec) -> list[Grid]:
    """One grid per group, computed from the (dead-column-zeroed) original weight."""
    return group_grids(W, spec)


def relative_output_error(W: Tensor, Wq: Tensor, H: Tensor) -> float:
    """‖X(W − Ŵ)ᵀ‖² / ‖XWᵀ‖² computed from ``H = XᵀX`` without touching X."""
    H = H.to(torch.float32)
    D = (W - Wq).to(torch.float32)
    num = float(((D @ H) * D).sum(dtype=torch.float64))
    den = float(((W.to(torch.float32) @ H) * W.to(torch.float32)).sum(dtype=torch.float64))
    return num / den if den > 0 else 0.0
