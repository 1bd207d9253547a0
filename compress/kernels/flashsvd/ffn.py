"""Backend dispatch for the FlashSVD rank-space FFN blocks.

Triton (``ffn_triton``) for CUDA tensors or when ``COMPRESS_KERNELS=triton``; the streaming torch
twin (``ffn_torch``) otherwise.  Triton is imported lazily, only when that backend is chosen.
"""

from __future__ import annotations

from torch import Tensor

from .._triton import use_triton
from . import ffn_torch


def flash_swiglu_ffn(
    x: Tensor,
    Ug: Tensor,
    Vg: Tensor,
    Uu: Tensor,
    Vu: Tensor,
    Ud: Tensor,
    Vd: Tensor,
    bg: Tensor | None = None,
    bu: Tensor | None = None,
    bd: Tensor | None = None,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """Decoder SwiGLU FFN from rank-space factors: ``(silu(x Ug Vg + bg) * (x Uu Vu + bu)) Ud Vd + bd``.

    Shapes: ``x [..., in]``, ``Ug/Uu [in, r]``, ``Vg/Vu [r, D]``, ``Ud [D, rd]``, ``Vd [rd, out]``,
    biases ``[D]``/``[out]`` or None.  ``Ug is Uu`` (a jointly factored gate/up basis) computes
    ``x @ U`` once.  The ``L × D`` intermediate is never materialised.  Returns ``[..., out]``
    in ``x.dtype`` (written into ``out`` when given).
    """
    if use_triton(x):
        from . import ffn_triton

        return ffn_triton.flash_swiglu_ffn(x, Ug, Vg, Uu, Vu, Ud, Vd, bg, bu, bd, out=out)
    return ffn_torch.flash_swiglu_ffn(x, Ug, Vg, Uu, Vu, Ud, Vd, bg, bu, bd, out=out)


def flash_gelu_ffn(
    x: Tensor,
    U1: Tensor,
    V1: Tensor,
    b1: Tensor | None,
    U2: Tensor,
    V2: Tensor,
    b2: Tensor | None,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """Encoder (BERT) FFN from rank-space factors: ``gelu(x U1 V1 + b1) U2 V2 + b2``, exact GELU.

    Shapes: ``x [..., in]``, ``U1 [in, r1]``, ``V1 [r1, D]``, ``U2 [D, r2]``, ``V2 [r2, out]``.
    The ``L × D`` intermediate is never materialised.  Returns ``[..., out]`` in ``x.dtype``.
    """
    if use_triton(x):
        from . import ffn_triton

        return ffn_triton.flash_gelu_ffn(x, U1, V1, b1, U2, V2, b2, out=out)
    return ffn_torch.flash_gelu_ffn(x, U1, V1, b1, U2, V2, b2, out=out)
