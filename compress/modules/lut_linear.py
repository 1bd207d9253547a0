"""The ``lut`` kind: a linear stored as packed codebook indices + group scales + a codebook.

``W[n, k] = codebook[idx[n, k]] · scale[n, k // group_size]``: non-uniform grids (NUPES'
power-exponent grid, learned codebooks) that a uniform ``quant`` entry cannot express. The
indices are unsigned ``0 .. 2**bits − 1`` in the same dense int32 stream as ``quant`` codes
(``weight_packed``), the codebook is ``[2**bits]`` float32 per linear (``tables: layer``) or
``[out, 2**bits]``, one per output row (``tables: channel``: NUPES with an exponent per channel),
and the forward is served by :func:`compress.kernels.quant_matmul.lut_matmul` (Triton on GPU, its torch
twin on CPU).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from compress.modules.protocol import DecodedWeightCache
from compress.modules.kinds import KindEntry, ModuleKind, SharedTensors, dtype_bytes, original_dtype, register_kind
from compress.kernels.packing import SUPPORTED_BITS, group_index, pack_int32, packed_len, unpack_stream
from compress.kernels.quant_matmul import lut_dequantize, lut_matmul, path_label


class LutLinear(DecodedWeightCache, nn.Module):
    """``y = x · (codebook[idx] · scale)ᵀ + b``.

    Args:
        in_features / out_features: dense shape.
        bits: index width (the codebook has ``2**bits`` entries).
        group_size: input columns per scale (``in_features``: one scale per output channel).
        bias: keep a dense bias; scale_dtype: dtype of the scales and the bias.
        row_tables: one codebook per output row (``[out, 2**bits]``) instead of one per layer.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool,
                 scale_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 row_tables: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.row_tables = row_tables
        #: manifest extras describing the grid (e.g. NUPES' exponent), set by the pass that built it
        self.grid_info: dict = {}
        n_groups = -(-in_features // group_size)
        self.register_buffer("weight_packed", torch.zeros(out_features, packed_len(in_features, bits),
                                                          dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, n_groups, dtype=scale_dtype, device=device))
        table_shape = (out_features, 1 << bits) if row_tables else (1 << bits,)
        self.register_buffer("codebook", torch.zeros(table_shape, dtype=torch.float32, device=device))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=scale_dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_indices(cls, indices: Tensor, codebook: Tensor, scale: Tensor, group_size: int,
                     bias: Tensor | None) -> LutLinear:
        """Pack unsigned ``indices [out, in]`` (values ``< 2**bits``) into a module; ``codebook`` is
        ``[2**bits]`` (one table) or ``[out, 2**bits]`` (one per row)."""
        out_f, in_f = indices.shape
        entries = codebook.shape[-1]
        bits = int(entries).bit_length() - 1
        if codebook.dim() not in (1, 2) or (codebook.dim() == 2 and codebook.shape[0] != out_f) \
                or entries != 1 << bits or bits not in SUPPORTED_BITS:
            raise ValueError(f"codebook must be [2**bits] or [out, 2**bits] for bits in {SUPPORTED_BITS}, "
                             f"got shape {tuple(codebook.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= entries):
            raise ValueError("indices out of the codebook's range")
        m = cls(in_f, out_f, bits, group_size, bias is not None, scale.dtype, device=indices.device,
                row_tables=codebook.dim() == 2)
        m.weight_packed = pack_int32(indices.to(torch.int64) - (1 << (bits - 1)), bits, dim=1)  # stored unsigned
        m.weight_scale = scale.detach().clone()
        m.codebook = codebook.detach().to(torch.float32).clone()
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return m

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense ``[out, in]`` weight (decoded in fp32 by the kernels' dequantizer)."""
        return lut_dequantize(self.weight_packed, self.codebook, self.weight_scale, bits=self.bits,
                              group_size=self.group_size, in_features=self.in_features,
                              dtype=dtype or self.weight_scale.dtype)

    def forward(self, x: Tensor) -> Tensor:
        cached = self._decoded_forward(x)
        if cached is not None:
            return cached
        return lut_matmul(x, self.weight_packed, self.codebook, self.weight_scale, bits=self.bits,
                          group_size=self.group_size, in_features=self.in_features, bias=self.bias)

    def reference_weight(self) -> Tensor:
        """float64 ``codebook[idx] · scale`` decoded with the plain unpacker (no kernel, no twin)."""
        idx = unpack_stream(self.weight_packed, self.bits, self.in_features).long()  # [N, K]
        gidx = group_index(self.in_features, self.group_size, idx.device)  # [K]
        book = self.codebook.to(torch.float64)
        values = book.gather(1, idx) if book.dim() == 2 else book[idx]
        return values * self.weight_scale.to(torch.float64)[:, gidx]

    def kernel_path(self, x: Tensor) -> str:
        if self._dense is not None:
            return "dense cache"
        return path_label(x, self.out_features, self.in_features) + " · lut"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}" + (", row_tables=True" if self.row_tables else ""))

    def manifest_entry(self) -> dict:
        return {"kind": "lut", "bits": self.bits, "group_size": self.group_size, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None,
                "tables": "channel" if self.row_tables else "layer", **self.grid_info}


class LutEntry(KindEntry):
    """A lookup-table quantised linear: ``bits``-wide indices into its own ``[2**bits]`` codebook."""

    kind: Literal["lut"] = "lut"
    bits: int
    group_size: int = Field(ge=1)
    #: one codebook per layer (``[2**bits]``) or per output channel (``[out, 2**bits]``)
    tables: Literal["layer", "channel"] = "layer"
    #: how the codebook was made (e.g. ``power``); informational
    grid: str | None = None
    #: NUPES' power exponent (per layer), or the mean of the per-channel exponents; informational
    exponent: float | None = None
    #: the smallest and largest per-channel exponent (``tables: channel``); informational
    exponent_range: tuple[float, float] | None = None

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in SUPPORTED_BITS:
            raise ValueError(f"bits {v} is not one of {SUPPORTED_BITS}")
        return v


@register_kind("lut", LutEntry)
class LutKind(ModuleKind[LutEntry]):
    def build(self, original: nn.Module, entry: LutEntry, shared: SharedTensors | None) -> nn.Module:
        return LutLinear(entry.in_features, entry.out_features, entry.bits, min(entry.group_size, entry.in_features),
                         entry.bias, original_dtype(original), device="meta", row_tables=entry.tables == "channel")

    def stored_bytes(self, entry: LutEntry, dtype: torch.dtype) -> int:
        sb, out_f, in_f = dtype_bytes(dtype), entry.out_features, entry.in_features
        groups = -(-in_f // min(entry.group_size, in_f))
        tables = out_f if entry.tables == "channel" else 1
        total = out_f * packed_len(in_f, entry.bits) * 4 + out_f * groups * sb + tables * (1 << entry.bits) * 4 + 2 * 8
        return total + (out_f * sb if entry.bias else 0)

    def export_refusal(self, entry: LutEntry) -> str | None:
        return "lookup-table (non-uniform) codes have no compressed-tensors format"
