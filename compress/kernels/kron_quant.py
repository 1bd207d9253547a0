"""Online activation path of a FlatQuant linear: Kronecker transform, per-token quantisation,
low-bit matmul.

:func:`kron_quant` goes to the fused Triton kernel (:mod:`.kron_quant_triton`) on CUDA (or under
``TRITON_INTERPRET=1`` with ``COMPRESS_KERNELS=triton``) and to the torch twin
(:mod:`.kron_quant_torch`) elsewhere; :func:`int_linear` multiplies int8 codes exactly with
``torch._int_mm`` (int32 accumulation) where torch has it for the device and the shapes, else
dequantises and runs a float matmul (same result up to float rounding of the sum).
"""

from __future__ import annotations

import torch
from torch import Tensor

from compress.kernels import kron_quant_torch as _torch
from compress.kernels._triton import use_triton


def kron_quant(x: Tensor, left: Tensor | None, right: Tensor | None, bits: int,
               clip: tuple[float, float] = (1.0, 1.0)) -> tuple[Tensor, Tensor]:
    """int8 codes ``[M, n]`` and fp32 scales ``[M, 1]`` of ``x [M, n] · (left ⊗ right)``."""
    if use_triton(x):
        from compress.kernels import kron_quant_triton as _tri

        return _tri.kron_quant(x, left, right, bits, clip)
    return _torch.kron_quant(x, left, right, bits, clip)


def path_label(x: Tensor) -> str:
    """Which engine :func:`kron_quant` and :func:`int_linear` use for ``x``."""
    if use_triton(x):
        engine = "triton fused kron+quant" if x.is_cuda else "triton-interpreter fused kron+quant"
    else:
        engine = "torch kron+quant"
    return f"{engine}, {'int8 _int_mm' if _int_mm_ok(x, 0, 0) else 'dequant matmul'}"


def _int_mm_ok(x: Tensor, k: int, n: int) -> bool:
    if x.device.type == "cpu":
        return True
    # CUDA's int8 GEMM wants more than 16 rows and dims that are multiples of 8
    return x.is_cuda and x.shape[0] > 16 and k % 8 == 0 and n % 8 == 0


def int_linear(codes: Tensor, scale: Tensor, w_codes_t: Tensor, w_scale: Tensor, bias: Tensor | None,
               dtype: torch.dtype) -> Tensor:
    """``(codes · w_codesᵀ) · scale · w_scale (+ bias)`` (shapes as in the twin)."""
    k, n = w_codes_t.shape
    if _int_mm_ok(codes, k, n):
        return _torch.int_linear(codes, scale, w_codes_t, w_scale, bias, dtype)
    y = (codes.float() * scale) @ (w_codes_t.float() * w_scale.float().unsqueeze(0))
    return (y if bias is None else y + bias.float()).to(dtype)
