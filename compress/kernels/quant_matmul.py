"""Quantized matmul ``y = x · dequant(W)ᵀ (+ bias)`` for packed low-bit weights.

Public entry points (the runtime ``QuantLinear`` module calls these):

* :func:`quant_matmul` / :func:`dequantize` — the compressed-tensors ``pack-quantized`` layout
  (signed codes, optional packed zero point; see :mod:`compress.kernels.packing`);
* :func:`lut_matmul` / :func:`lut_dequantize` — the same packing, but each code is an unsigned
  index into a per-layer fp32 codebook (non-uniform grids): ``w = codebook[idx] * scale``.

Each call goes to the Triton kernels (:mod:`compress.kernels.quant_matmul_triton`) or to the plain-torch
twin (:mod:`compress.kernels.quant_matmul_torch`) by :func:`compress.kernels._triton.use_triton`: Triton for CUDA
tensors, the twin on CPU, overridable with ``COMPRESS_KERNELS``. Triton is imported only when
the Triton backend is actually chosen, so this module imports without it.

On the Triton backend ``path="auto"`` picks one of three kernels with :func:`choose_path`:
``"gemv"`` (split-K GEMV, decode), ``"fused"`` (dequant fused into the GEMM, small batches) or
``"dequant"`` (dequantize to ``x.dtype`` then a dense ``torch.matmul``, large batches). Every path
can also be forced. Outputs are in ``x.dtype``; accumulation is fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from compress.kernels import quant_matmul_torch as _torch
from compress.kernels._triton import use_triton

# Crossover thresholds of path="auto". PROVISIONAL: these are guesses, not measurements; they
# stand until the kernel benchmark measures the crossovers on a GPU.
GEMV_MAX_M = 1
"""Largest number of rows (product of x's leading dims) sent to the split-K GEMV."""
FUSED_MAX_M = 64
"""Largest number of rows sent to the fused dequant-GEMM; more rows go to dequant + matmul."""


def choose_path(m: int, n: int, k: int) -> str:
    """The kernel path for an ``[m, k] x [k, n]`` product: ``"gemv"``, ``"fused"`` or ``"dequant"``.

    The provisional rule depends on ``m`` only; ``n`` and ``k`` are part of the signature so that
    measured thresholds may depend on the weight shape without changing callers.
    """
    if m <= GEMV_MAX_M:
        return "gemv"
    if m <= FUSED_MAX_M:
        return "fused"
    return "dequant"


def path_label(x: Tensor, n: int, k: int) -> str:
    """The code path :func:`quant_matmul` takes for ``x [..., k]`` and an ``[n, k]`` weight, as text.

    ``"triton <path>"`` on the Triton backend (``"triton-interpreter <path>"`` under
    ``TRITON_INTERPRET=1``), else ``"torch twin · planes"`` or ``"torch twin · dequant+matmul"``
    (the twin's own split at :data:`compress.kernels.quant_matmul_torch.PLANES_MAX_M` rows).
    """
    m = x.numel() // k if k else 0
    if use_triton(x):
        engine = "triton" if x.is_cuda else "triton-interpreter"
        return f"{engine} {choose_path(m, n, k)}"
    return "torch twin · " + ("planes" if m <= _torch.PLANES_MAX_M else "dequant+matmul")


def quant_matmul(
    x: Tensor,
    weight_packed: Tensor,
    weight_scale: Tensor,
    weight_zero_point: Tensor | None,
    *,
    bits: int,
    group_size: int,
    in_features: int,
    bias: Tensor | None = None,
    path: str = "auto",
) -> Tensor:
    """``x · dequant(W)ᵀ (+ bias)`` for a ``pack-quantized`` weight.

    Args:
        x: activations ``[..., K]`` (fp16, bf16 or fp32); ``K == in_features``.
        weight_packed: int32 ``[N, ceil(K / (32 // bits))]``.
        weight_scale: ``[N, G]`` with ``G = ceil(K / group_size)`` (per-channel: ``group_size = K``).
        weight_zero_point: ``None`` (symmetric) or int32 ``[ceil(N / (32 // bits)), G]``.
        bits: 2, 3, 4 or 8.
        group_size: input columns per scale group; the last group may be shorter.
        in_features: K (the packed rows are padded, so it cannot be inferred).
        bias: optional ``[N]``.
        path: ``"auto"``, ``"gemv"``, ``"fused"`` or ``"dequant"`` (Triton backend only; the torch
            twin computes every path the same way).

    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    kwargs = dict(bits=bits, group_size=group_size, in_features=in_features, bias=bias, path=path)
    if use_triton(x):
        from compress.kernels import quant_matmul_triton

        return quant_matmul_triton.quant_matmul(x, weight_packed, weight_scale, weight_zero_point, **kwargs)
    return _torch.quant_matmul(x, weight_packed, weight_scale, weight_zero_point, **kwargs)


def lut_matmul(
    x: Tensor,
    weight_packed: Tensor,
    codebook: Tensor,
    weight_scale: Tensor,
    *,
    bits: int,
    group_size: int,
    in_features: int,
    bias: Tensor | None = None,
    path: str = "auto",
) -> Tensor:
    """``x · Wᵀ (+ bias)`` with ``W[n, k] = codebook[idx[n, k]] * scale[n, k // group_size]``.

    ``weight_packed`` holds the unsigned indices ``idx`` in ``0 .. 2**bits - 1`` packed exactly like
    :func:`quant_matmul`'s codes; ``codebook`` is ``[2**bits]`` (used in fp32). The other arguments
    and the return value are as in :func:`quant_matmul`.
    """
    kwargs = dict(bits=bits, group_size=group_size, in_features=in_features, bias=bias, path=path)
    if use_triton(x):
        from compress.kernels import quant_matmul_triton

        return quant_matmul_triton.lut_matmul(x, weight_packed, codebook, weight_scale, **kwargs)
    return _torch.lut_matmul(x, weight_packed, codebook, weight_scale, **kwargs)


def dequantize(
    weight_packed: Tensor,
    weight_scale: Tensor,
    weight_zero_point: Tensor | None,
    *,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The dense ``[N, K]`` weight of a ``pack-quantized`` tensor in ``dtype`` (decoded in fp32)."""
    kwargs = dict(bits=bits, group_size=group_size, in_features=in_features, dtype=dtype)
    if use_triton(weight_packed):
        from compress.kernels import quant_matmul_triton

        return quant_matmul_triton.dequantize(weight_packed, weight_scale, weight_zero_point, **kwargs)
    return _torch.dequantize(weight_packed, weight_scale, weight_zero_point, **kwargs)


def lut_dequantize(
    weight_packed: Tensor,
    codebook: Tensor,
    weight_scale: Tensor,
    *,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The dense ``[N, K]`` weight of a lookup-table quantized tensor in ``dtype``."""
    kwargs = dict(bits=bits, group_size=group_size, in_features=in_features, dtype=dtype)
    if use_triton(weight_packed):
        from compress.kernels import quant_matmul_triton

        return quant_matmul_triton.lut_dequantize(weight_packed, codebook, weight_scale, **kwargs)
    return _torch.lut_dequantize(weight_packed, codebook, weight_scale, **kwargs)
