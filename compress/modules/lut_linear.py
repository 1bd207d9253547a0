"""The ``lut`` kind: a linear stored as packed codebook indices + group scales + a codebook.

``W[n, k] = codebook[idx[n, k]] · scale[n, k // group_size]``: non-uniform grids (NUPES'
power-exponent grid, learned codebooks) that a uniform ``quant`` entry cannot express. The
indices are unsigned ``0 .. 2**bits − 1`` in the same dense int32 stream as ``quant`` codes
(``weight_packed``), the codebook is ``[2**bits]`` float32 per linear, and the forward is served
by :func:`kernels.quant_matmul.lut_matmul` (Triton on GPU, its torch twin on CPU).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from compress.modules.protocol import DecodedWeightCache
from compress.modules.kinds import KindEntry, ModuleKind, SharedTensors, dtype_bytes, original_dtype, register_kind
from kernels.packing import SUPPORTED_BITS, group_index, pack_int32, packed_len, unpack_stream
from kernels.quant_matmul import lut_dequantize, lut_matmul, path_label


class LutLinear(DecodedWeightCache, nn.Module):
    """``y = x · (codebook[idx] · scale)ᵀ + b``.

    Args:
        in_features / out_features: dense shape.
        bits: index width (the codebook has ``2**bits`` entries).
        group_size: input columns per scale (``in_features``: one scale per output channel).
        bias: keep a dense bias; scale_dtype: dtype of the scales and the bias.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool,
                 scale_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        n_groups = -(-in_features // group_size)
        self.register_buffer("weight_packed", torch.zeros(out_features, packed_len(in_features, bits),
                                                          dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, n_groups, dtype=scale_dtype, device=device))
        self.register_buffer("codebook", torch.zeros(1 << bits, dtype=torch.float32, device=device))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=scale_dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_indices(cls, indices: Tensor, codebook: Tensor, scale: Tensor, group_size: int,
                     bias: Tensor | None) -> LutLinear:
        """Pack unsigned ``indices [out, in]`` (values ``< len(codebook)``) into a module (CPU)."""
        out_f, in_f = indices.shape
        bits = int(codebook.numel()).bit_length() - 1
        if codebook.dim() != 1 or codebook.numel() != 1 << bits or bits not in SUPPORTED_BITS:
            raise ValueError(f"codebook must have 2**bits entries for bits in {SUPPORTED_BITS}, "
                             f"got shape {tuple(codebook.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= codebook.numel()):
            raise ValueError("indices out of the codebook's range")
        m = cls(in_f, out_f, bits, group_size, bias is not None, scale.dtype, device=indices.device)
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
        return self.codebook.to(torch.float64)[idx] * self.weight_scale.to(torch.float64)[:, gidx]

    def kernel_path(self, x: Tensor) -> str:
        if self._dense is not None:
            return "dense cache"
        return path_label(x, self.out_features, self.in_features) + " · lut"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}")

    def manifest_entry(self) -> dict:
        return {"kind": "lut", "bits": self.bits, "group_size": self.group_size, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None}


class LutEntry(KindEntry):
    """A lookup-table quantised linear: ``bits``-wide indices into its own ``[2**bits]`` codebook."""

    kind: Literal["lut"] = "lut"
    bits: int
    group_size: int = Field(ge=1)
    #: how the codebook was made (e.g. ``nupes power 0.6``); informational
    grid: str | None = None

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
                         entry.bias, original_dtype(original), device="meta")

    def stored_bytes(self, entry: LutEntry, dtype: torch.dtype) -> int:
        sb, out_f, in_f = dtype_bytes(dtype), entry.out_features, entry.in_features
        groups = -(-in_f // min(entry.group_size, in_f))
        total = out_f * packed_len(in_f, entry.bits) * 4 + out_f * groups * sb + (1 << entry.bits) * 4 + 2 * 8
        return total + (out_f * sb if entry.bias else 0)

    def export_refusal(self, entry: LutEntry) -> str | None:
        return "lookup-table (non-uniform) codes have no compressed-tensors format"
