"""The ``quant`` kind: a linear stored as packed integer codes + scales (+ zero points).

:class:`QuantLinear` holds one bit width; its state-dict names are the compressed-tensors
``pack-quantized`` names (``weight_packed``, ``weight_scale``, ``weight_zero_point``,
``weight_shape``), so the same tensors serve our loader, ``transformers`` + ``compressed-tensors``,
and vLLM.

:class:`MixedQuantLinear` holds several widths inside one linear (bit allocation): contiguous
input-column ranges ``[start, stop)``, each a :class:`QuantLinear` of its own width under
``<name>.segments.<i>.*``, after an optional stored input permutation (``input_perm``: the
act-order that made the ranges contiguous). ``y = Σ_s x[..., perm][..., start_s:stop_s] · W_sᵀ + b``,
each term served by the quant kernels.

:class:`RowMixedQuantLinear` holds several widths across output rows instead (``row_segments``:
ranges of stacked rows, each a :class:`QuantLinear` over every input, ``output_perm`` the
original row of each stacked one): ``y[..., output_perm] = cat_s(x · W_sᵀ) (+ b)``.
"""

from __future__ import annotations


import torch
from torch import Tensor, nn

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from compress.algos.quant import QuantizedWeight
from compress.modules.protocol import DecodedWeightCache
from compress.modules.kinds import KindEntry, ModuleKind, SharedTensors, dtype_bytes, original_dtype, register_kind
from compress.kernels.packing import (SUPPORTED_BITS, group_index, legacy_packed_len, pack_int32, packed_len, repack_legacy,
                             unpack_int32)
from compress.kernels import native_cpu
from compress.kernels.quant_matmul import dequantize, path_label, quant_matmul


class QuantLinear(DecodedWeightCache, nn.Module):
    """``y = x · dequant(W)ᵀ + b`` served by :func:`compress.kernels.quant_matmul.quant_matmul`.

    Args:
        in_features / out_features: dense shape.
        bits: code width; group_size: input columns per scale (``in_features`` = per channel).
        symmetric: no zero points when True.
        bias: keep a dense bias.
        scale_dtype: dtype of the stored scales (the model's dtype).
        legacy_packing: the buffers are shaped for the format-version-1 layout (3-bit codes ten
            to a word) of an old checkpoint; :meth:`after_materialize` converts them.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 symmetric: bool, bias: bool, scale_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, legacy_packing: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.legacy_packing = legacy_packing and 32 % bits != 0  # only 3 bits changed layout
        plen = legacy_packed_len if self.legacy_packing else packed_len
        n_groups = -(-in_features // group_size)
        kw = {"device": device}
        self.register_buffer("weight_packed", torch.zeros(
            out_features, plen(in_features, bits), dtype=torch.int32, **kw))
        self.register_buffer("weight_scale", torch.ones(out_features, n_groups, dtype=scale_dtype, **kw))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], **kw))
        if symmetric:
            self.weight_zero_point = None
        else:
            self.register_buffer("weight_zero_point", torch.zeros(
                plen(out_features, bits), n_groups, dtype=torch.int32, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=scale_dtype, **kw),
                                 requires_grad=False) if bias else None
        # how the codes were chosen (recorded in the manifest and the export; no effect on serving)
        self.act_order, self.observer = False, "minmax"

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Tensor | None) -> QuantLinear:
        """Pack a :class:`QuantizedWeight` into a module (on the device of its codes)."""
        out_f, in_f = qw.codes.shape
        gs = qw.spec.group_width(in_f)
        m = cls(in_f, out_f, qw.spec.bits, gs, qw.spec.symmetric, bias is not None,
                qw.scale.dtype, device=qw.codes.device)
        m.act_order, m.observer = qw.perm is not None, "mse" if qw.spec.mse else "minmax"
        m.weight_packed = pack_int32(qw.codes, qw.spec.bits, dim=1)
        m.weight_scale = qw.scale.clone()
        if qw.zero is not None:
            m.weight_zero_point = pack_int32(qw.zero, qw.spec.bits, dim=0)
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return m

    def after_materialize(self) -> None:
        """Convert buffers read in the format-version-1 layout to the dense stream (once)."""
        if not self.legacy_packing or self.weight_packed.is_meta:
            return
        self.weight_packed = repack_legacy(self.weight_packed, self.bits, self.in_features, dim=1)
        if self.weight_zero_point is not None:
            self.weight_zero_point = repack_legacy(self.weight_zero_point, self.bits, self.out_features, dim=0)
        self.legacy_packing = False

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense ``[out, in]`` weight these codes stand for."""
        return dequantize(self.weight_packed, self.weight_scale, self.weight_zero_point,
                          bits=self.bits, group_size=self.group_size,
                          in_features=self.in_features, dtype=dtype or self.weight_scale.dtype)

    def _native(self, x: Tensor) -> native_cpu.NativeWeight | None:
        """The weight in torch's native CPU layout, when ``x`` is served by it (built once per
        device and cached on the module, not stored)."""
        if x.device.type != "cpu" or not native_cpu.enabled(x) or self.weight_packed.is_meta or self.legacy_packing:
            return None
        if native_cpu.unsupported(self.bits, self.group_size, self.in_features, self.out_features, self.symmetric) is not None:
            return None
        siblings = self.__dict__.get("_siblings")
        if siblings is not None:
            return siblings[0].weight  # the stacked layout of the group (compress.modules.native_siblings)
        nw = getattr(self, "_native_weight", None)
        if nw is None or nw.packed.device != self.weight_packed.device:
            nw = native_cpu.prepare(self.weight_packed, self.weight_scale, self.weight_zero_point, bits=self.bits,
                                    group_size=self.group_size, in_features=self.in_features)
            object.__setattr__(self, "_native_weight", nw)
        return nw

    def forward(self, x: Tensor) -> Tensor:
        cached = self._decoded_forward(x)
        if cached is not None:
            return cached
        nw = self._native(x)
        if nw is not None:
            siblings = self.__dict__.get("_siblings")
            if siblings is not None:
                return siblings[0].forward(siblings[1], x, self.bias)
            return native_cpu.native_linear(x, nw, self.bias)
        return quant_matmul(x, self.weight_packed, self.weight_scale, self.weight_zero_point,
                            bits=self.bits, group_size=self.group_size,
                            in_features=self.in_features, bias=self.bias)

    def reference_weight(self) -> Tensor:
        """The dense float64 ``[out, in]`` weight, decoded without the kernels or their twin.

        Uses the slow, obvious unpacker of :mod:`compress.kernels.packing`: signed codes minus the zero
        point, times the group scale, all in float64.
        """
        gidx = group_index(self.in_features, self.group_size, self.weight_packed.device)  # [K]
        q = unpack_int32(self.weight_packed, self.bits, self.in_features).to(torch.float64)  # [N, K]
        if self.weight_zero_point is not None:
            zero = unpack_int32(self.weight_zero_point, self.bits, self.out_features, dim=0)  # [N, G]
            q = q - zero.to(torch.float64)[:, gidx]
        return q * self.weight_scale.to(torch.float64)[:, gidx]  # [N, K]

    def kernel_path(self, x: Tensor) -> str:
        """The code path ``forward(x)`` takes (see :func:`compress.kernels.quant_matmul.path_label`)."""
        if self._dense is not None:
            return "dense cache"
        nw = self._native(x)
        if nw is not None:
            rows = native_cpu.rows_of(x, self.in_features)
            siblings = self.__dict__.get("_siblings")
            return siblings[0].label(rows) if siblings is not None else native_cpu.label(nw, rows)
        return path_label(x, self.out_features, self.in_features)

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype ``forward(x)`` computes in (bf16 on the native CPU path; else ``x.dtype``)."""
        return native_cpu.compute_dtype() if self._native(x) is not None else x.dtype

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}")

    def manifest_entry(self) -> dict:
        return {"kind": "quant", "format": "pack-quantized", "bits": self.bits,
                "group_size": self.group_size, "symmetric": self.symmetric,
                "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "act_order": self.act_order, "observer": self.observer}


class MixedQuantLinear(nn.Module):
    """A linear whose input columns are quantised at several widths (see the module docstring).

    Args:
        segments: ``(start, stop, bits)`` covering ``[0, in_features)`` in order.
        group_size: input columns per scale inside every segment.
        permuted: keep an ``input_perm`` buffer (``x[..., input_perm]`` feeds the segments).
    """

    def __init__(self, in_features: int, out_features: int, segments: list[tuple[int, int, int]],
                 group_size: int, symmetric: bool, bias: bool, scale_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, permuted: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.symmetric = group_size, symmetric
        self.bounds = [(a, b) for a, b, _ in segments]
        self.segments = nn.ModuleList(
            QuantLinear(b - a, out_features, bits, min(group_size, b - a), symmetric, False, scale_dtype, device)
            for a, b, bits in segments)
        if permuted:
            self.register_buffer("input_perm", torch.arange(in_features, dtype=torch.int32, device=device))
        else:
            self.input_perm = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=scale_dtype, device=device),
                                 requires_grad=False) if bias else None
        self.act_order, self.observer = permuted, "minmax"

    @classmethod
    def from_quantized(cls, parts: list[QuantizedWeight], bias: Tensor | None,
                       perm: Tensor | None = None) -> MixedQuantLinear:
        """Pack per-segment :class:`QuantizedWeight` s (columns in segment order, i.e. already
        permuted by ``perm`` when given) into one module."""
        out_f = parts[0].codes.shape[0]
        spec = parts[0].spec
        if any((qw.spec.symmetric, qw.spec.group_size) != (spec.symmetric, spec.group_size) for qw in parts):
            raise ValueError("every segment of a mixed-width linear needs the same symmetry and group size")
        bounds, start = [], 0
        for qw in parts:
            bounds.append((start, start + qw.codes.shape[1], qw.spec.bits))
            start += qw.codes.shape[1]
        m = cls(start, out_f, bounds, spec.group_width(parts[0].codes.shape[1]), spec.symmetric,
                bias is not None, parts[0].scale.dtype, device=parts[0].codes.device, permuted=perm is not None)
        for i, qw in enumerate(parts):
            m.segments[i] = QuantLinear.from_quantized(qw, None)
        if perm is not None:
            m.input_perm = perm.to(torch.int32).clone()
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        m.observer = "mse" if spec.mse else "minmax"
        return m

    @property
    def bits(self) -> list[int]:
        return [seg.bits for seg in self.segments]

    def _gather(self, x: Tensor) -> Tensor:
        return x if self.input_perm is None else x.index_select(-1, self.input_perm.long())

    def forward(self, x: Tensor) -> Tensor:
        xs = self._gather(x)
        y = sum(seg(xs[..., a:b]) for seg, (a, b) in zip(self.segments, self.bounds, strict=True))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense ``[out, in]`` weight in the original column order."""
        w = torch.cat([seg.dequantized_weight(dtype) for seg in self.segments], dim=1)  # [N, K] permuted
        if self.input_perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.input_perm.long()] = w  # column j of w multiplies x[perm[j]]
        return out

    def reference_forward(self, x: Tensor) -> Tensor:
        """Float64 plain torch: each segment's slow unpack, summed (``compress validate``)."""
        xs = self._gather(x.to(torch.float64))
        y = sum(seg.reference_forward(xs[..., a:b]) for seg, (a, b) in zip(self.segments, self.bounds, strict=True))
        return y if self.bias is None else y + self.bias.to(torch.float64)

    def kernel_path(self, x: Tensor) -> str:
        return f"{self.segments[0].kernel_path(x)} × {len(self.segments)} widths"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, permuted={self.input_perm is not None}")

    def manifest_entry(self) -> dict:
        segs = [QuantSegment(start=a, stop=b, bits=seg.bits)
                for seg, (a, b) in zip(self.segments, self.bounds, strict=True)]
        return QuantEntry(in_features=self.in_features, out_features=self.out_features, bias=self.bias is not None,
                          group_size=self.group_size, symmetric=self.symmetric, segments=segs,
                          permuted=self.input_perm is not None, act_order=self.act_order,
                          observer=self.observer).dump()


class RowMixedQuantLinear(nn.Module):
    """A linear whose output rows are quantised at several widths (BAQ per output-row block).

    Args:
        segments: ``(start, stop, bits)`` over the *stacked* rows, covering ``[0, out_features)``;
            each range is a :class:`QuantLinear` of that width reading every input column.
        output_perm: (a buffer) the original row of every stacked row, so
            ``y[..., output_perm] = cat_s(x · W_sᵀ)``.
    """

    def __init__(self, in_features: int, out_features: int, segments: list[tuple[int, int, int]],
                 group_size: int, symmetric: bool, bias: bool, scale_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.symmetric = group_size, symmetric
        self.bounds = [(a, b) for a, b, _ in segments]
        self.segments = nn.ModuleList(
            QuantLinear(in_features, b - a, bits, group_size, symmetric, False, scale_dtype, device)
            for a, b, bits in segments)
        self.register_buffer("output_perm", torch.arange(out_features, dtype=torch.int32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=scale_dtype, device=device),
                                 requires_grad=False) if bias else None
        self.act_order, self.observer = False, "minmax"

    @classmethod
    def from_quantized(cls, parts: list[tuple[Tensor, QuantizedWeight]], bias: Tensor | None) -> RowMixedQuantLinear:
        """Pack ``(original rows, their QuantizedWeight)`` per width into one module."""
        spec = parts[0][1].spec
        if any((qw.spec.symmetric, qw.spec.group_size) != (spec.symmetric, spec.group_size) for _, qw in parts):
            raise ValueError("every segment of a mixed-width linear needs the same symmetry and group size")
        in_f = parts[0][1].codes.shape[1]
        bounds, start = [], 0
        for rows, qw in parts:
            bounds.append((start, start + rows.numel(), qw.spec.bits))
            start += rows.numel()
        m = cls(in_f, start, bounds, spec.group_width(in_f), spec.symmetric, bias is not None, parts[0][1].scale.dtype,
                device=parts[0][1].codes.device)
        for i, (_, qw) in enumerate(parts):
            m.segments[i] = QuantLinear.from_quantized(qw, None)
        m.output_perm = torch.cat([rows for rows, _ in parts]).to(torch.int32)
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        m.act_order = parts[0][1].perm is not None
        m.observer = "mse" if spec.mse else "minmax"
        return m

    @property
    def bits(self) -> list[int]:
        return [seg.bits for seg in self.segments]

    def _unstack(self, y: Tensor) -> Tensor:
        """Stacked outputs ``[..., out]`` back into the original row order (the inverse
        permutation is computed once per stored ``output_perm``, not on every call)."""
        key = (self.output_perm.data_ptr(), self.output_perm.device)
        if getattr(self, "_inverse_key", None) != key:
            self._inverse = torch.argsort(self.output_perm.long())
            self._inverse_key = key
        return y.index_select(-1, self._inverse)

    def forward(self, x: Tensor) -> Tensor:
        y = self._unstack(torch.cat([seg(x) for seg in self.segments], dim=-1))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense ``[out, in]`` weight in the original row order."""
        w = torch.cat([seg.dequantized_weight(dtype) for seg in self.segments], dim=0)  # [N, K] stacked rows
        out = torch.empty_like(w)
        out[self.output_perm.long()] = w
        return out

    def reference_forward(self, x: Tensor) -> Tensor:
        """Float64 plain torch: each segment's slow unpack, unstacked (``compress validate``)."""
        x = x.to(torch.float64)
        y = self._unstack(torch.cat([seg.reference_forward(x) for seg in self.segments], dim=-1))
        return y if self.bias is None else y + self.bias.to(torch.float64)

    def kernel_path(self, x: Tensor) -> str:
        return f"{self.segments[0].kernel_path(x)} × {len(self.segments)} row widths"

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, row bits={self.bits}"

    def manifest_entry(self) -> dict:
        segs = [QuantSegment(start=a, stop=b, bits=seg.bits)
                for seg, (a, b) in zip(self.segments, self.bounds, strict=True)]
        return QuantEntry(in_features=self.in_features, out_features=self.out_features, bias=self.bias is not None,
                          group_size=self.group_size, symmetric=self.symmetric, row_segments=segs,
                          act_order=self.act_order, observer=self.observer).dump()


class QuantSegment(BaseModel):
    """Input columns ``[start, stop)`` (after ``input_perm``) stored at ``bits``."""

    model_config = ConfigDict(extra="forbid")

    start: int = Field(ge=0)
    stop: int = Field(ge=1)
    bits: int


class QuantEntry(KindEntry):
    """A quantised linear: one width (``bits``) or contiguous column ranges (``segments``)."""

    kind: Literal["quant"] = "quant"
    format: Literal["pack-quantized"] = "pack-quantized"
    bits: int | None = None
    group_size: int = Field(ge=1)
    symmetric: bool
    act_order: bool = False
    observer: str = "minmax"
    #: ``legacy-v1``: 3-bit codes ten to a word (format-version-1 checkpoints)
    packing: Literal["legacy-v1"] | None = None
    segments: list[QuantSegment] | None = None
    #: the segments read ``x[..., input_perm]`` (a stored int32 permutation)
    permuted: bool = False
    #: ranges of (stacked) output rows at their widths, ``output_perm`` mapping them back
    row_segments: list[QuantSegment] | None = None

    @model_validator(mode="after")
    def _widths(self) -> QuantEntry:
        given = [x is not None for x in (self.bits, self.segments, self.row_segments)]
        if sum(given) != 1:
            raise ValueError("give exactly one of bits, segments and row_segments")
        bad = [b for _, _, b in self.widths() if b not in SUPPORTED_BITS]
        if bad:
            raise ValueError(f"bits {bad[0]} is not one of {SUPPORTED_BITS}")
        if self.segments is not None:
            _check_segments(self.segments, self.in_features, self.group_size)
        elif self.permuted:
            raise ValueError("permuted applies to segments only")
        if self.row_segments is not None:
            _check_segments(self.row_segments, self.out_features, self.out_features + 1)
        return self

    def widths(self) -> list[tuple[int, int, int]]:
        """``(start, stop, bits)`` of every column range (one range for a single width), or of
        every row range under ``row_segments``."""
        if self.row_segments is not None:
            return [(s.start, s.stop, s.bits) for s in self.row_segments]
        if self.segments is None:
            return [(0, self.in_features, int(self.bits))]  # type: ignore[arg-type]
        return [(s.start, s.stop, s.bits) for s in self.segments]

    def average_bits(self) -> float:
        span = self.out_features if self.row_segments is not None else self.in_features
        return sum((b - a) * bits for a, b, bits in self.widths()) / span


def _check_segments(segments: list[QuantSegment], in_features: int, group_size: int) -> None:
    pos = 0
    for s in segments:
        if s.start != pos or s.stop <= s.start:
            raise ValueError(f"segments must cover [0, {in_features}) in order; [{s.start}, {s.stop}) "
                             f"does not start at {pos}")
        if group_size < in_features and s.start % group_size:
            raise ValueError(f"segment start {s.start} is not a multiple of group_size {group_size}")
        pos = s.stop
    if pos != in_features:
        raise ValueError(f"segments end at {pos}, not at in_features {in_features}")


def _width_bytes(out_f: int, in_f: int, bits: int, group_size: int, symmetric: bool, scale_bytes: int,
                 legacy: bool = False) -> int:
    """Codes + scales (+ packed zero points) + ``weight_shape`` of one single-width range."""
    plen = legacy_packed_len if legacy and 32 % bits else packed_len
    groups = -(-in_f // min(group_size, in_f))
    total = out_f * plen(in_f, bits) * 4 + out_f * groups * scale_bytes + 2 * 8
    return total if symmetric else total + plen(out_f, bits) * groups * 4


@register_kind("quant", QuantEntry)
class QuantKind(ModuleKind[QuantEntry]):
    def build(self, original: nn.Module, entry: QuantEntry, shared: SharedTensors | None) -> nn.Module:
        dtype = original_dtype(original)
        if entry.row_segments is not None:
            m: nn.Module = RowMixedQuantLinear(entry.in_features, entry.out_features, entry.widths(), entry.group_size,
                                               entry.symmetric, entry.bias, dtype, device="meta")
        elif entry.segments is not None:
            m = MixedQuantLinear(entry.in_features, entry.out_features, entry.widths(), entry.group_size,
                                            entry.symmetric, entry.bias, dtype, device="meta",
                                            permuted=entry.permuted)
        else:
            m = QuantLinear(entry.in_features, entry.out_features, int(entry.bits), entry.group_size,  # type: ignore[arg-type]
                            entry.symmetric, entry.bias, dtype, device="meta",
                            legacy_packing=entry.packing == "legacy-v1")
        m.act_order, m.observer = entry.act_order, entry.observer
        return m

    def stored_bytes(self, entry: QuantEntry, dtype: torch.dtype) -> int:
        sb = dtype_bytes(dtype)
        if entry.row_segments is not None:
            total = sum(_width_bytes(b - a, entry.in_features, bits, entry.group_size, entry.symmetric, sb)
                        for a, b, bits in entry.widths()) + entry.out_features * 4  # + output_perm
        else:
            total = sum(_width_bytes(entry.out_features, b - a, bits, entry.group_size, entry.symmetric, sb,
                                     entry.packing == "legacy-v1") for a, b, bits in entry.widths())
        total += entry.out_features * sb if entry.bias else 0
        return total + (entry.in_features * 4 if entry.permuted else 0)

    def export_refusal(self, entry: QuantEntry) -> str | None:
        if entry.segments is not None or entry.row_segments is not None:
            return "mixed bit widths inside one linear have no compressed-tensors format"
        return None
