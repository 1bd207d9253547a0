"""torch's own CPU kernels for packed low-bit weights (the ops torchao's CPU path runs).

* int4, symmetric or asymmetric, groups of 32/64/128/256 columns dividing the row:
  ``aten._weight_int4pack_mm_for_cpu``, on weights converted once by
  ``aten._convert_weight_to_int4pack_for_cpu`` and a ``[G, N, 2]`` table of (scale, offset);
  torch dequantises ``(u − 8) · scale + offset`` with the unsigned code ``u``, so our
  ``scale · (c − z)`` (signed code ``c = u − 8``, signed zero ``z``) is ``offset = −scale · z``;
* int8 per output channel, symmetric: ``aten._weight_int8pack_mm`` with the int8 codes and the
  per-row scales.

Both ops compute with bf16 activations (their fp32 variants run a slow reference loop), so on
CPU every float activation is rounded to bf16 for them: about 0.4 % relative error per linear,
an order below what 4-bit codes cost (and it is measured: ``benchmarks/serving.py`` scores the
PPL of both paths and compares their greedy tokens). Such a path is held to bf16's validation
tolerance (:func:`compute_dtype`). ``COMPRESS_KERNELS=torch`` keeps every call on the exact twin
(fp32 in, fp32 out). The converted weights are built once per module and device and cached on
the module (not stored); other widths and layouts stay on the torch twin.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch
from torch import Tensor

from compress.kernels.packing import unpack_int32

INT4_GROUPS = (32, 64, 128, 256)
_LITTLE = sys.byteorder == "little"  # the int4 stream read as bytes


@dataclasses.dataclass(frozen=True)
class NativeWeight:
    """A weight in one native op's layout: ``kind`` int4 (``packed`` from the converter, ``table``
    ``[G, N, 2]`` bf16) or int8 (``packed`` the int8 codes ``[N, K]``, ``table`` the scales ``[N]``)."""

    kind: str
    packed: Tensor
    table: Tensor
    group_size: int
    out_features: int
    in_features: int
    #: the stored ``pack-quantized`` tensors (views, no copies), for the dense-rows path
    weight_packed: Tensor | None = None
    weight_scale: Tensor | None = None
    weight_zero_point: Tensor | None = None


def enabled(x: Tensor) -> bool:
    """Whether ``x`` goes to the native ops: any float activation by default (``auto`` or
    ``native``), none with ``COMPRESS_KERNELS=torch``/``triton``."""
    mode = os.environ.get("COMPRESS_KERNELS", "auto").lower()
    return mode in ("auto", "native") and x.is_floating_point()


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
    zero = None if weight_zero_point is None else unpack_int32(weight_zero_point, bits, n, dim=0)  # [N, G]
    nw = from_codes(codes, weight_scale, zero, bits=bits, group_size=group_size)
    if bits == 8:
        return nw
    return dataclasses.replace(nw, weight_packed=weight_packed, weight_scale=weight_scale,
                               weight_zero_point=weight_zero_point)  # the stored stream: the decoded-bf16 path


def from_codes(codes: Tensor, scale: Tensor, zero: Tensor | None, *, bits: int, group_size: int) -> NativeWeight:
    """The native layout of signed ``codes`` ``[N, K]`` with ``scale`` ``[N, G]`` (``[N, 1]`` for
    int8) and signed zero points ``[N, G]`` (None: symmetric). int4 keeps no stored-stream refs,
    so it has no decoded-bf16 path of its own (see :func:`stored`)."""
    n, k = codes.shape
    if bits == 8:
        return NativeWeight("int8", codes.to(torch.int8).contiguous(), scale[:, 0].to(torch.bfloat16).contiguous(),
                            k, n, k, weight_scale=scale)
    unsigned = (codes.to(torch.int32) + 8).contiguous()  # [N, K] in [0, 15]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 1)
    fscale = scale.float()  # [N, G]
    offset = torch.zeros_like(fscale) if zero is None else -fscale * zero.float()
    table = torch.stack([fscale.t(), offset.t()], dim=-1).to(torch.bfloat16).contiguous()  # [G, N, 2]
    return NativeWeight("int4", packed, table, group_size, n, k)


def stored(weight_packed: Tensor, weight_scale: Tensor, weight_zero_point: Tensor | None, *, group_size: int,
           in_features: int) -> NativeWeight | None:
    """An int4 weight for the decoded-bf16 path only (no converted layout: views of the stored
    tensors), or None where that path cannot read the stream (a big-endian host)."""
    if not _LITTLE:
        return None
    empty = weight_packed.new_empty(0)
    return NativeWeight("int4", empty, empty, group_size, weight_packed.shape[0], in_features, weight_packed,
                        weight_scale, weight_zero_point)


DENSE_MIN_M = 64
"""From this many rows on, the weight is decoded to bf16 for the call and multiplied by bf16
GEMM: on this machine's AVX-512 cores the native ops run at about fp32 GEMM speed there while
bf16 GEMM is ~2.5× faster (decode 1536×576: 0.7 ms; crossover measured at 64–128 rows)."""


def native_linear(x: Tensor, w: NativeWeight, bias: Tensor | None) -> Tensor:
    """``x · Wᵀ (+ bias)`` with bf16 activations, ``[..., N]`` in ``x.dtype``: the native op
    below :data:`DENSE_MIN_M` rows, the decoded bf16 weight and a bf16 GEMM from there on."""
    x2 = x.reshape(-1, w.in_features).to(torch.bfloat16)  # [M, K]
    if x2.shape[0] >= DENSE_MIN_M and (w.kind == "int8" or (w.weight_packed is not None and _LITTLE)):
        y = torch.nn.functional.linear(x2, dense_bf16(w))
    elif w.kind == "int4":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, w.packed, w.group_size, w.table)
    else:
        y = torch.ops.aten._weight_int8pack_mm(x2, w.packed, w.table)
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], w.out_features)


def rows_of(x: Tensor, in_features: int) -> int:
    """Rows of ``x`` as a ``[M, in_features]`` matrix."""
    return x.numel() // in_features


def dense_bf16(w: NativeWeight) -> Tensor:
    """The ``[N, K]`` weight decoded for one call: ``scale · (c − z)`` in fp32, rounded to bf16
    (the twin's dequantisation, rounded once). int4 reads the stored little-endian stream as
    bytes: byte ``j`` of a row holds codes ``2j`` (low nibble) and ``2j + 1``."""
    n, k, g = w.out_features, w.in_features, w.group_size
    assert w.weight_scale is not None
    if w.kind == "int8":
        return (w.packed.float() * w.weight_scale.float()).to(torch.bfloat16)  # [N, K] · [N, 1]
    assert w.weight_packed is not None
    b = w.weight_packed.view(torch.uint8)  # [N, 4·words]
    u = torch.stack((b & 15, b >> 4), dim=-1).reshape(n, -1)[:, :k]  # [N, K] unsigned codes
    c = u.reshape(n, k // g, g).float().sub_(8)  # [N, G, g] signed codes
    if w.weight_zero_point is not None:
        c.sub_(unpack_int32(w.weight_zero_point, 4, n, dim=0).float()[:, :, None])
    return c.mul_(w.weight_scale.float()[:, :, None]).reshape(n, k).to(torch.bfloat16)


def label(w: NativeWeight, rows: int = 1) -> str:
    if rows >= DENSE_MIN_M:
        return f"native {w.kind} (decoded to bf16 per call + bf16 GEMM, ≥ {DENSE_MIN_M} rows)"
    op = "_weight_int4pack_mm_for_cpu" if w.kind == "int4" else "_weight_int8pack_mm"
    return f"native {w.kind} (aten.{op}, bf16 activations)"


def compute_dtype() -> torch.dtype:
    """The dtype the native ops compute in (validation holds them to its tolerance)."""
    return torch.bfloat16
