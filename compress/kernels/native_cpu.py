"""torch's own CPU kernels for packed low-bit weights (the ops torchao's CPU path runs).

* int4, symmetric or asymmetric, groups of 32/64/128/256 columns dividing the row:
  ``aten._weight_int4pack_mm_for_cpu``, on weights converted once by
  ``aten._convert_weight_to_int4pack_for_cpu`` and a ``[G, N, 2]`` table of (scale, offset);
  torch dequantises ``(u − 8) · scale + offset`` with the unsigned code ``u``, so our
  ``scale · (c − z)`` (signed code ``c = u − 8``, signed zero ``z``) is ``offset = −scale · z``;
* int8 per output channel, symmetric: ``aten._weight_int8pack_mm`` with the int8 codes and the
  per-row scales.

Both ops compute with bf16 activations (their fp32 variants run a slow reference loop). By
default they serve bf16 activations only, where they lose nothing against the twin; with
``COMPRESS_KERNELS=native`` fp32 and fp16 activations are rounded to bf16 for them too (faster,
about 0.4 % relative error per linear: such a path is held to bf16's validation tolerance,
:func:`compute_dtype`), and ``COMPRESS_KERNELS=torch`` keeps every call on the twin. The
converted weights are built once per module and device and cached on the module (not stored);
other widths and layouts stay on the torch twin.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from compress.kernels.packing import unpack_int32

INT4_GROUPS = (32, 64, 128, 256)


@dataclass(frozen=True)
class NativeWeight:
    """A weight in one native op's layout: ``kind`` int4 (``packed`` from the converter, ``table``
    ``[G, N, 2]`` bf16) or int8 (``packed`` the int8 codes ``[N, K]``, ``table`` the scales ``[N]``)."""

    kind: str
    packed: Tensor
    table: Tensor
    group_size: int
    out_features: int
    in_features: int


def enabled(x: Tensor) -> bool:
    """Whether ``x`` goes to the native ops: bf16 activations by default, any float dtype with
    ``COMPRESS_KERNELS=native``, none with ``torch``/``triton``."""
    mode = os.environ.get("COMPRESS_KERNELS", "auto").lower()
    if mode == "native":
        return x.is_floating_point()
    return mode == "auto" and x.dtype == torch.bfloat16


def unsupported(bits: int, group_size: int, in_features: int, out_features: int, symmetric: bool) -> str | None:
    """Why a weight has no native CPU path (None: it has one)."""
    if bits == 4:
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return "this torch has no CPU int4 kernel"
        if group_size >= in_features:
            return "int4 per channel: the CPU int4 kernel takes groups of 32/64/128/256"
        if group_size not in INT4_GROUPS or in_features % group_size:
            return f"int4 group size {group_size} (the CPU int4 kernel takes 32/64/128/256 dividing the row)"
        if out_features % 16:
            return f"int4 with {out_features} output rows (the CPU int4 kernel takes multiples of 16)"
        return None
    if bits == 8:
        if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            return "this torch has no CPU int8 kernel"
        if group_size < in_features or not symmetric:
            return "int8 with groups or zero points (the CPU int8 kernel takes symmetric per-channel weights)"
        if in_features % 16:  # the op reads past the row otherwise (it crashes the process at K = 70, 72, 200)
            return f"int8 with {in_features} input columns (the CPU int8 kernel takes multiples of 16)"
        return None
    return f"{bits}-bit codes (native CPU kernels exist for 4 and 8 bits)"


def prepare(weight_packed: Tensor, weight_scale: Tensor, weight_zero_point: Tensor | None, *, bits: int,
            group_size: int, in_features: int) -> NativeWeight:
    """Convert a ``pack-quantized`` weight to its native layout (once; see :func:`unsupported`)."""
    n = weight_packed.shape[0]
    codes = unpack_int32(weight_packed, bits, in_features)  # [N, K] signed int8
    if bits == 8:
        return NativeWeight("int8", codes.contiguous(), weight_scale[:, 0].to(torch.bfloat16).contiguous(),
                            in_features, n, in_features)
    unsigned = (codes.to(torch.int32) + 8).contiguous()  # [N, K] in [0, 15]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 1)
    scale = weight_scale.float()  # [N, G]
    if weight_zero_point is None:
        offset = torch.zeros_like(scale)
    else:
        zero = unpack_int32(weight_zero_point, bits, n, dim=0).float()  # [N, G] signed
        offset = -scale * zero
    table = torch.stack([scale.t(), offset.t()], dim=-1).to(torch.bfloat16).contiguous()  # [G, N, 2]
    return NativeWeight("int4", packed, table, group_size, n, in_features)


def native_linear(x: Tensor, w: NativeWeight, bias: Tensor | None) -> Tensor:
    """``x · Wᵀ (+ bias)`` through the native op, with bf16 activations; ``[..., N]`` in ``x.dtype``."""
    x2 = x.reshape(-1, w.in_features).to(torch.bfloat16)  # [M, K]
    if w.kind == "int4":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, w.packed, w.group_size, w.table)
    else:
        y = torch.ops.aten._weight_int8pack_mm(x2, w.packed, w.table)
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], w.out_features)


def label(w: NativeWeight) -> str:
    op = "_weight_int4pack_mm_for_cpu" if w.kind == "int4" else "_weight_int8pack_mm"
    return f"native {w.kind} (aten.{op}, bf16 activations)"


def compute_dtype() -> torch.dtype:
    """The dtype the native ops compute in (validation holds them to its tolerance)."""
    return torch.bfloat16
