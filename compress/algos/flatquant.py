"""FlatQuant's math (Sun et al., arXiv 2410.09426): Kronecker transforms and the W4A4/KV quantisers.

An invertible transform ``P`` of a linear's input flattens both the activations and the weights
before they are quantised, and leaves the product unchanged:

    x' = (x ⊙ d) · P,      W' = (W ⊘ d) · P^(−T),      x' W'ᵀ = x Wᵀ

(``d``: a per-channel scaling, folded into the preceding norm at export). ``P = P₁ ⊗ P₂`` with
``n = n₁ n₂``, so applying it costs a reshape to ``(…, n₁, n₂)`` and ``P₁ᵀ · X · P₂``
(:func:`kron_apply`) instead of an ``n × n`` matmul.

Quantisers (the reference's, not :mod:`compress.algos.quant`'s compressed-tensors grid):

* symmetric: ``scale = absmax / (2^(b−1) − 1)``, codes ``clamp(round(x / scale), −2^(b−1), 2^(b−1) − 1)``
  (absmax/7 at 4 bits), per output row for weights and per token for activations;
* asymmetric (the KV cache): ``scale = (max − min) / (2^b − 1)``, ``zero = round(−min / scale)``,
  codes in ``[0, 2^b − 1]``, over a range that always holds 0;
* learnable clipping multiplies the row's (token's) max and min by ``sigmoid(θ)``: LWC for weights
  (one θ pair per output row), LAC for activations (one pair per tensor). The activation
  quantisers here take the multipliers ``(sigmoid(θ_max), sigmoid(θ_min))`` themselves, so the
  trained and the served model call the same code.

Rounding goes through a straight-through estimator, so everything here trains. Pure functions:
tensors in, tensors out, on the inputs' device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: θ of a learnable clip factor at initialisation (sigmoid(4) = 0.982, the reference's value)
CLIP_INIT = 4.0


def factor_pair(n: int) -> tuple[int, int]:
    """``(n₁, n₂)`` with ``n₁ n₂ = n``, ``n₁ ≤ n₂`` and ``n₁`` the largest divisor ≤ √n.

    576 → (24, 24), 1536 → (32, 48), 11008 → (86, 128). A prime gives ``(1, n)``: no Kronecker
    form exists and the caller falls back to a dense transform.
    """
    if n < 1:
        raise ValueError(f"cannot factor {n}")
    for a in range(math.isqrt(n), 0, -1):
        if n % a == 0:
            return a, n // a
    return 1, n  # unreachable: a = 1 divides n


def kron_apply(x: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """``x · (left ⊗ right)`` over the last dim, as ``leftᵀ · X · right`` on ``(…, n₁, n₂)``.

    ``left`` is ``[n₁, n₁]``, ``right`` ``[n₂, n₂]``; None stands for an identity factor (the
    width of the other factor then fixes the split). A dense transform is ``left=P`` of the full
    width with ``right=None`` (``n₂ = 1``).
    """
    if left is None and right is None:
        return x
    n = x.shape[-1]
    n1 = left.shape[0] if left is not None else n // right.shape[0]  # type: ignore[union-attr]
    n2 = n // n1
    if n1 * n2 != n:
        raise ValueError(f"a {n1}-wide left factor does not divide width {n}")
    X = x.reshape(*x.shape[:-1], n1, n2)  # [..., n1, n2]
    if right is not None:
        X = X @ right
    if left is not None:
        X = left.transpose(0, 1) @ X
    return X.reshape(x.shape)


def inverse_transpose(p: Tensor) -> Tensor:
    """``P^(−T)`` computed in float64 (the reference's direct-inverse mode), in ``p``'s dtype."""
    return torch.linalg.inv(p.to(torch.float64)).transpose(0, 1).to(p.dtype)


def smooth_scale(w_absmax: Tensor, x_absmax: Tensor, alpha: float) -> Tensor:
    """SmoothQuant-style initial scaling ``d = w_max^(1−α) / x_max^α`` (clamped ≥ 1e-5)."""
    return (w_absmax.pow(1 - alpha) / x_absmax.pow(alpha)).clamp(min=1e-5)


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` forward, identity backward."""
    return (x.round() - x).detach() + x


def clip_rows(w: Tensor, theta_max: Tensor, theta_min: Tensor) -> Tensor:
    """Learnable weight clipping: each row clamped to ``[min·σ(θ_min), max·σ(θ_max)]``
    (``theta_*``: ``[rows, 1]``)."""
    wmax = w.amax(dim=1, keepdim=True) * torch.sigmoid(theta_max)
    wmin = w.amin(dim=1, keepdim=True) * torch.sigmoid(theta_min)
    return torch.clamp(w, min=wmin, max=wmax)


def sym_qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def weight_scale(w: Tensor, bits: int) -> Tensor:
    """Per-row symmetric scale ``max(|min|, max) / (2^(b−1) − 1)`` (≥ 1e-5/qmax): ``[rows, 1]``."""
    xmax = torch.maximum(w.amax(dim=1, keepdim=True).clamp(min=0), -w.amin(dim=1, keepdim=True).clamp(max=0))
    return xmax.clamp(min=1e-5) / sym_qmax(bits)


def weight_codes(w: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Signed codes (float, STE) and per-row scale of ``w`` ([rows, cols])."""
    scale = weight_scale(w, bits)
    q = torch.clamp(round_ste(w / scale), -(1 << (bits - 1)), sym_qmax(bits))
    return q, scale


def fake_quant_weight(w: Tensor, bits: int) -> Tensor:
    """Per-output-channel symmetric fake quantisation (identity at 16 bits)."""
    if bits >= 16:
        return w
    q, scale = weight_codes(w, bits)
    return q * scale


Clip = tuple[Tensor | float, Tensor | float]


def _token_range(x: Tensor, clip: Clip | None) -> tuple[Tensor, Tensor]:
    xmax = x.amax(dim=-1, keepdim=True).clamp(min=0)
    xmin = x.amin(dim=-1, keepdim=True).clamp(max=0)
    if clip is not None:
        xmax = xmax * clip[0]
        xmin = xmin * clip[1]
    return xmin, xmax


def act_codes(x: Tensor, bits: int, clip: Clip | None = None) -> tuple[Tensor, Tensor]:
    """Per-token symmetric codes (float, STE) and scales ``[..., 1]`` of ``x`` over its last dim.

    ``clip``: the LAC multipliers ``(c_max, c_min)`` of a token's max and min (``sigmoid(θ)``).
    An all-zero token gets scale 1.
    """
    xmin, xmax = _token_range(x, clip)
    absmax = torch.maximum(-xmin, xmax)
    scale = torch.where(absmax == 0, torch.ones_like(absmax), absmax / sym_qmax(bits))
    q = torch.clamp(round_ste(x / scale), -(1 << (bits - 1)), sym_qmax(bits))
    return q, scale


def fake_quant_act(x: Tensor, bits: int, clip: Clip | None = None) -> Tensor:
    """Per-token symmetric fake quantisation of activations (identity at 16 bits)."""
    if bits >= 16:
        return x
    q, scale = act_codes(x, bits, clip)
    return (q * scale).to(x.dtype)


def asym_codes(x: Tensor, bits: int, clip: Clip | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token asymmetric codes in ``[0, 2^b − 1]`` (float, STE), scale and zero ``[..., 1]``.

    The KV cache's quantiser: the last dim is one head's channels (one group per head).
    """
    xmin, xmax = _token_range(x, clip)
    both0 = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both0, -torch.ones_like(xmin), xmin)
    xmax = torch.where(both0, torch.ones_like(xmax), xmax)
    maxq = (1 << bits) - 1
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    q = torch.clamp(round_ste(x / scale) + zero, 0, maxq)
    return q, scale, zero


def fake_quant_kv(x: Tensor, bits: int, clip: Clip | None = None) -> Tensor:
    """Per-token, per-head asymmetric fake quantisation of a K or V tensor ``[..., head_dim]``."""
    if bits >= 16:
        return x
    q, scale, zero = asym_codes(x, bits, clip)
    return (scale * (q - zero)).to(x.dtype)


def random_orthogonal(n: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
    """A Haar-random ``n × n`` orthogonal matrix (QR of a Gaussian, signs fixed by R's diagonal)."""
    g = torch.randn(n, n, generator=generator, dtype=torch.float64, device=generator.device)
    q, r = torch.linalg.qr(g)
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).to(dtype).contiguous()


def random_hadamard(n: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
    """An orthogonal ``n × n`` rotation: a normalised Sylvester Hadamard matrix with random ±1
    column signs when ``n`` is a power of two (QuaRot), else a Kronecker product of the largest
    power-of-two Hadamard dividing ``n`` and a random orthogonal matrix of the odd rest."""
    p2 = n & (-n)  # largest power of two dividing n
    h = torch.ones(1, 1, dtype=torch.float64, device=generator.device)
    while h.shape[0] < p2:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = h / math.sqrt(p2)
    if p2 != n:
        h = torch.kron(random_orthogonal(n // p2, generator, torch.float64), h)
    signs = torch.randint(0, 2, (n,), generator=generator, device=generator.device).to(torch.float64) * 2 - 1
    return (h * signs.unsqueeze(0)).to(dtype)


def condition_number(p: Tensor) -> float:
    """2-norm condition number of a square matrix (float64 SVD)."""
    s = torch.linalg.svdvals(p.to(torch.float64))
    return float(s.max() / s.min().clamp_min(1e-300))
