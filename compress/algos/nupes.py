"""NUPES / PowerQuant power-exponent quantisation (Yvinec et al., arXiv 2308.05600; ICLR'23 PowerQuant).

A weight is quantised on a uniform grid *after* the automorphism ``w ↦ sign(w)|w|^a`` and
decoded through the inverse power. In the normalised units of the symmetric RTN grid
(``u = w / s`` with ``s = absmax / h`` per group and ``h = (2^b − 1) / 2``, the
compressed-tensors convention of :mod:`compress.algos.quant`):

    ψ_a(u) = sign(u) · h · |u / h|^a                 (maps [−h, h] onto itself)
    code c = clamp(round(ψ_a(u)), −2^(b−1), 2^(b−1) − 1)
    ŵ     = s · T_a[c],   T_a[c] = ψ_{1/a}(c)

so a weight is a group scale times an entry of a ``2^b`` table that depends on the layer's
exponent only (one table per layer, or per output channel when the exponent is per channel).
At ``a = 1`` ψ is the identity and the quantiser *is* symmetric RTN, bit for bit (the code
takes the identity branch exactly there). ``a < 1`` puts more levels near zero, where
bell-shaped weights live.

Which parts are the papers' and which are reconstructions is stated in docs/ARCHITECTURE.md:
the operator and the grid are PowerQuant's (as recalled, not read); the normalisation to RTN's
grid, the bracketed search and the learning details are ours.

Pure functions: tensors in, tensors out, on the device of the inputs; fp32 for the powers
(fp16 under/overflows ``|w|^a``), float64 for the Hessian work.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from compress.algos.gptq import act_order_perm, inverse_cholesky, prepare_problem
from compress.algos.quant import QuantSpec, group_grids

#: smallest exponent the search and the learner allow (a → 0 crowds every level at zero)
A_MIN_DEFAULT = 0.2
A_MAX_DEFAULT = 1.5
_TINY = 1e-30


def half_range(bits: int) -> float:
    """``h = (2^b − 1) / 2``: the grid's half width in code units (7.5 at 4 bits)."""
    return ((1 << bits) - 1) / 2


def code_range(bits: int) -> tuple[int, int]:
    """Signed codes ``[−2^(b−1), 2^(b−1) − 1]`` (the stored index is ``code + 2^(b−1)``)."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def power_map(u: Tensor, a: Tensor | float, h: float) -> Tensor:
    """``ψ_a(u) = sign(u)·h·|u/h|^a``, fp32, computed as ``exp(a·ln|u/h|)`` with exact zeros
    masked out (so neither the value nor the gradient in ``a`` or ``u`` is NaN at ``u = 0``).
    ``a`` broadcasts against ``u`` (a float, or ``[rows, 1]`` for one exponent per row); where
    ``a == 1`` the result is ``u`` itself, exactly."""
    u = u.to(torch.float32)
    a_t = torch.as_tensor(a, dtype=torch.float32, device=u.device)
    mag = u.abs()
    nz = mag > 0
    log_mag = torch.log(torch.where(nz, mag / h, torch.ones_like(mag)))  # 0 where u = 0: finite
    out = torch.where(nz, torch.sign(u) * h * torch.exp(a_t * log_mag), torch.zeros_like(u))
    return torch.where(a_t == 1, u, out)


@dataclass(frozen=True)
class PowerSpec:
    """How one matrix is power-quantised.

    Args:
        bits: code width (2, 3, 4 or 8).
        group_size: input columns per scale (None: one scale per output channel).
        mse: shrink each group's scale to minimise the L2.4 error of the *power* quantiser.
        scale_dtype: storage dtype of the scales (they are rounded to it before any code is made).
    """

    bits: int
    group_size: int | None = None
    mse: bool = False
    scale_dtype: torch.dtype = torch.float32

    def uniform(self) -> QuantSpec:
        """The symmetric RTN spec whose grid (scales, code range) this quantiser shares."""
        return QuantSpec(self.bits, self.group_size, True, False, self.scale_dtype)


def group_index(in_features: int, spec: PowerSpec, device: torch.device) -> Tensor:
    """``[in]`` group of every input column."""
    gw = spec.uniform().group_width(in_features)
    return torch.arange(in_features, device=device) // gw


def absmax_scales(W: Tensor, spec: PowerSpec) -> Tensor:
    """``[out, G]`` fp32 scales ``absmax / h`` per group, rounded through ``scale_dtype`` —
    the very scales symmetric RTN computes (:func:`compress.algos.quant.group_grids`)."""
    grids = group_grids(W, spec.uniform())
    return torch.stack([g.scale for g in grids], dim=1)  # (out, G)


def encode(W: Tensor, scale: Tensor, a: Tensor | float, spec: PowerSpec) -> Tensor:
    """Signed int8 codes ``[out, in]`` of ``W`` on the power grid with ``scale [out, G]`` and
    exponent ``a`` (a float or ``[out]``)."""
    gidx = group_index(W.shape[1], spec, W.device)
    u = W.to(torch.float32) / scale.to(torch.float32)[:, gidx]  # (out, in) in grid units
    lo, hi = code_range(spec.bits)
    return torch.clamp(torch.round(power_map(u, _rows(a, W), half_range(spec.bits))), lo, hi).to(torch.int8)


def table(a: Tensor | float, bits: int, device: torch.device | None = None) -> Tensor:
    """fp32 lookup table ``T_a[idx] = ψ_{1/a}(idx − 2^(b−1))``: ``[2^b]`` for one exponent, or
    ``[out, 2^b]`` for one exponent per output channel (``a`` of shape ``[out]``)."""
    lo, hi = code_range(bits)
    a_t = torch.as_tensor(a, dtype=torch.float32, device=device)
    codes = torch.arange(lo, hi + 1, dtype=torch.float32, device=a_t.device)  # (2^b,)
    inv = 1.0 / a_t
    if a_t.dim() == 0:
        return power_map(codes, inv if float(a_t) != 1 else 1.0, half_range(bits))
    return power_map(codes.expand(a_t.shape[0], -1), inv.unsqueeze(1), half_range(bits))  # (out, 2^b)


def decode(codes: Tensor, scale: Tensor, a: Tensor | float, spec: PowerSpec) -> Tensor:
    """fp32 ``ŵ = s · T_a[c]`` of signed codes ``[out, in]``."""
    gidx = group_index(codes.shape[1], spec, codes.device)
    idx = codes.to(torch.int64) - code_range(spec.bits)[0]  # unsigned table index
    t = table(a, spec.bits, codes.device)
    vals = t[idx] if t.dim() == 1 else t.gather(1, idx)
    return vals * scale.to(torch.float32)[:, gidx]


def _rows(a: Tensor | float, W: Tensor) -> Tensor | float:
    """``a`` shaped to broadcast over the rows of ``W`` (``[out]`` → ``[out, 1]``)."""
    if isinstance(a, Tensor) and a.dim() == 1:
        return a.to(W.device).unsqueeze(1)
    return a


@dataclass
class PowerQuantized:
    """A power-quantised matrix: signed int8 ``codes [out, in]``, ``scale [out, G]`` (storage
    dtype), the exponent (float, or fp32 ``[out]`` per channel) and the spec."""

    codes: Tensor
    scale: Tensor
    exponent: Tensor | float
    spec: PowerSpec

    def dequantize(self) -> Tensor:
        return decode(self.codes, self.scale, self.exponent, self.spec)

    def table(self) -> Tensor:
        return table(self.exponent, self.spec.bits, self.codes.device)


def power_scales(W: Tensor, a: Tensor | float, spec: PowerSpec, grid_points: int = 100,
                 max_shrink: float = 0.8) -> Tensor:
    """Group scales: absmax, or (``spec.mse``) each group's shrink of it that minimises the L2.4
    error of the power quantiser at exponent ``a`` — the power-grid twin of RTN's MSE grid."""
    s0 = absmax_scales(W, spec)
    if not spec.mse:
        return s0
    gidx = group_index(W.shape[1], spec, W.device)
    Wf = W.to(torch.float32)
    best_err = torch.full_like(s0, float("inf"))
    best = s0.clone()
    for i in range(int(max_shrink * grid_points)):
        s = (s0 * (1 - i / grid_points)).to(spec.scale_dtype).to(torch.float32)
        err = (decode(encode(Wf, s, a, spec), s, a, spec) - Wf).abs().pow(2.4)  # (out, in)
        g_err = torch.zeros_like(s0).index_add_(1, gidx, err)  # (out, G)
        better = g_err < best_err
        best_err = torch.where(better, g_err, best_err)
        best = torch.where(better, s, best)
    return best


def power_quantize(W: Tensor, a: Tensor | float, spec: PowerSpec) -> PowerQuantized:
    """Round-to-nearest on the power grid at exponent ``a`` (data-free)."""
    scale = power_scales(W, a, spec)
    return PowerQuantized(encode(W, scale, a, spec), scale.to(spec.scale_dtype), a, spec)


def row_errors(W: Tensor, a: Tensor | float, spec: PowerSpec) -> Tensor:
    """float64 ``[out]`` squared reconstruction error of every row at exponent ``a``."""
    q = power_quantize(W, a, spec)
    return ((q.dequantize() - W.to(torch.float32)).double() ** 2).sum(dim=1)


# -- data-free exponent search ------------------------------------------------------------------

GOLDEN = (math.sqrt(5) - 1) / 2


def bracketed_min(f: Callable[[Tensor], Tensor], lo: float, hi: float, n: int, points: int = 27,
                  iters: int = 24, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Minimise ``n`` independent 1-D functions over ``[lo, hi]``: ``f(a [n]) → [n]`` values.

    A grid of ``points`` exponents (1.0 always among them, so the result is never worse than
    RTN's) brackets each minimum between the grid neighbours of its best point; golden-section
    search then refines inside that bracket. PowerQuant's reconstruction error is locally convex
    in ``a``, so the bracket holds the minimum; the best point ever evaluated is returned, so the
    result is at least as good as the grid's. Returns ``(argmin [n], min [n])``.
    """
    grid = torch.linspace(lo, hi, points, dtype=torch.float64, device=device)
    if lo < 1 < hi:
        grid = torch.unique(torch.cat([grid, torch.ones(1, dtype=torch.float64, device=device)]))
    vals = torch.stack([f(torch.full((n,), float(g), dtype=torch.float64, device=device)) for g in grid])  # (P, n)
    k = vals.argmin(dim=0)  # (n,)
    best_a, best_v = grid[k].clone(), vals.gather(0, k[None]).squeeze(0).clone()
    left = grid[(k - 1).clamp_min(0)]
    right = grid[(k + 1).clamp_max(len(grid) - 1)]
    x1 = right - GOLDEN * (right - left)
    x2 = left + GOLDEN * (right - left)
    f1, f2 = f(x1), f(x2)
    for _ in range(iters):
        for x, fx in ((x1, f1), (x2, f2)):
            better = fx < best_v
            best_a, best_v = torch.where(better, x, best_a), torch.where(better, fx, best_v)
        go_left = f1 < f2  # the minimum lies in [left, x2]: drop (x2, right]; else drop [left, x1)
        right = torch.where(go_left, x2, right)
        left = torch.where(go_left, left, x1)
        xn = torch.where(go_left, right - GOLDEN * (right - left), left + GOLDEN * (right - left))
        fn = f(xn)  # one new evaluation per function and step
        x1, x2, f1, f2 = (torch.where(go_left, xn, x2), torch.where(go_left, x1, xn),
                          torch.where(go_left, fn, f2), torch.where(go_left, f1, fn))
    for x, fx in ((x1, f1), (x2, f2)):
        better = fx < best_v
        best_a, best_v = torch.where(better, x, best_a), torch.where(better, fx, best_v)
    return best_a, best_v


def search_exponent(W: Tensor, spec: PowerSpec, lo: float = A_MIN_DEFAULT, hi: float = A_MAX_DEFAULT,
                    per_channel: bool = False, points: int = 27, iters: int = 24) -> tuple[Tensor | float, float]:
    """The data-free exponent: ``argmin_a ‖W − Ŵ_a‖²`` over ``[lo, hi]`` (:func:`bracketed_min`),
    one per layer or (``per_channel``) one per output row. Returns ``(a, squared error)``; a
    per-layer ``a`` is a float, a per-channel one an fp32 ``[out]`` tensor."""
    if not 0 < lo <= 1 <= hi:
        raise ValueError(f"exponent bounds [{lo}, {hi}] must be positive and contain 1 (RTN)")
    out_f = W.shape[0]
    if per_channel:
        a, err = bracketed_min(lambda x: row_errors(W, x.to(torch.float32), spec), lo, hi, out_f, points, iters,
                               W.device)
        return a.to(torch.float32), float(err.sum())
    a, err = bracketed_min(lambda x: row_errors(W, float(x[0]), spec).sum().reshape(1), lo, hi, 1, points, iters,
                           W.device)
    return float(a[0]), float(err[0])


# -- GPTQ on the power grid ---------------------------------------------------------------------

@dataclass
class PowerGPTQStats:
    loss: float
    damp: float
    dead_inputs: int


def gptq_power(W: Tensor, H: Tensor, a: Tensor | float, spec: PowerSpec, *, block_size: int = 128,
               percdamp: float = 0.01, act_order: bool = True) -> tuple[PowerQuantized, PowerGPTQStats]:
    """GPTQ's column loop with the power quantiser: each column is rounded to its nearest power-grid
    level and the error is spread over the columns not yet quantised through the inverse Hessian
    (Frantar et al.). Scales are static (from the original weights, :func:`power_scales`), so the
    act-order permutation needs nothing at inference."""
    Wf, H, dead = prepare_problem(W, H)
    out_f, in_f = Wf.shape
    scale = power_scales(Wf, a, spec).to(spec.scale_dtype)
    col_scale = scale.to(torch.float32)[:, group_index(in_f, spec, W.device)]  # (out, in)
    tab = table(a, spec.bits, W.device)  # [2^b] or [out, 2^b]
    lo_c, hi_c = code_range(spec.bits)
    h, a_rows = half_range(spec.bits), _rows(a, Wf)
    perm = act_order_perm(H).to(W.device) if act_order else torch.arange(in_f, device=W.device)
    Wp, Hp, Sp = Wf[:, perm], H[perm][:, perm], col_scale[:, perm]
    U, damp = inverse_cholesky(Hp, percdamp)
    U = U.to(torch.float32)
    codes = torch.empty(out_f, in_f, dtype=torch.int8, device=W.device)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1, Err = Wp[:, i1:i2].clone(), torch.empty(out_f, i2 - i1, device=W.device)
        Uii = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            s = Sp[:, i1 + i]
            c = torch.clamp(torch.round(power_map(W1[:, i] / s, a_rows if isinstance(a_rows, float)
                                                  else a_rows[:, 0], h)), lo_c, hi_c)
            idx = (c - lo_c).long()
            q = (tab[idx] if tab.dim() == 1 else tab.gather(1, idx[:, None])[:, 0]) * s
            codes[:, perm[i1 + i]] = c.to(torch.int8)
            err = (W1[:, i] - q) / Uii[i, i]
            Err[:, i] = err
            W1[:, i:].addr_(err, Uii[i, i:], alpha=-1)
        loss += (Err.double() ** 2).sum() / 2
        Wp[:, i2:] -= Err @ U[i1:i2, i2:]
    return PowerQuantized(codes, scale, a, spec), PowerGPTQStats(float(loss), damp, int(dead.sum()))


# -- the learned (data-driven) quantiser ----------------------------------------------------------

def _round_ste(x: Tensor) -> Tensor:
    """round(x) forward, identity backward (straight-through)."""
    return x + (torch.round(x) - x).detach()


def fake_power_quant(z: Tensor, scale: Tensor, a: Tensor, spec: PowerSpec) -> Tensor:
    """Differentiable ``ŵ = s · ψ_{1/a}(clamp(round_ste(ψ_a(z))))`` of latent weights ``z [out, in]``
    in grid units (``w / s`` at the start), group scales ``scale [out, G]`` and exponent ``a``
    (a 0-d tensor, or ``[out]``). The latent can cross any number of levels (NUPES' "whole
    quantised space", not AdaRound's up-or-down), the gradient reaches ``z``, ``s`` and ``a``,
    and zeros contribute no ``a``-gradient (:func:`power_map` masks them)."""
    h = half_range(spec.bits)
    lo, hi = code_range(spec.bits)
    a_r = a.unsqueeze(1) if a.dim() == 1 else a
    c = torch.clamp(_round_ste(power_map(z, a_r, h)), lo, hi)
    gidx = group_index(z.shape[1], spec, z.device)
    return power_map(c, 1.0 / a_r, h) * scale[:, gidx]


def learned_codes(z: Tensor, a: Tensor | float, spec: PowerSpec) -> Tensor:
    """The signed int8 codes a trained latent ``z`` (grid units) rounds to."""
    lo, hi = code_range(spec.bits)
    return torch.clamp(torch.round(power_map(z.detach(), _rows(a, z), half_range(spec.bits))), lo, hi).to(torch.int8)
