"""QuantLinear: a linear layer stored as packed integer codes + scales (+ zero points).

Its state-dict names are the compressed-tensors ``pack-quantized`` names
(``weight_packed``, ``weight_scale``, ``weight_zero_point``, ``weight_shape``), so the same
tensors serve our loader, ``transformers`` + ``compressed-tensors``, and vLLM.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from compress.algos.quant import QuantizedWeight
from compress.modules.kinds import original_dtype, register_kind
from kernels.packing import group_index, legacy_packed_len, pack_int32, packed_len, repack_legacy, unpack_int32
from kernels.quant_matmul import dequantize, path_label, quant_matmul


class QuantLinear(nn.Module):
    """``y = x · dequant(W)ᵀ + b`` served by :func:`kernels.quant_matmul.quant_matmul`.

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
        self._dense: Tensor | None = None  # set only inside calibration_cache()
        # how the codes were chosen (recorded in the manifest and the export; no effect on serving)
        self.act_order, self.observer = False, "minmax"

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Tensor | None) -> QuantLinear:
        """Pack a :class:`QuantizedWeight` into a module (CPU)."""
        out_f, in_f = qw.codes.shape
        gs = qw.spec.group_width(in_f)
        m = cls(in_f, out_f, qw.spec.bits, gs, qw.spec.symmetric, bias is not None,
                qw.scale.dtype)
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

    @contextlib.contextmanager
    def calibration_cache(self) -> Iterator[None]:
        """Serve from the dequantised weight, decoded once, while calibration runs many batches
        through this block right after quantising it (numbers identical to the packed path)."""
        self._dense = self.dequantized_weight(torch.float32)
        try:
            yield
        finally:
            self._dense = None

    def forward(self, x: Tensor) -> Tensor:
        if self._dense is not None:
            return torch.nn.functional.linear(x, self._dense.to(x.dtype), self.bias)
        return quant_matmul(x, self.weight_packed, self.weight_scale, self.weight_zero_point,
                            bits=self.bits, group_size=self.group_size,
                            in_features=self.in_features, bias=self.bias)

    def reference_weight(self) -> Tensor:
        """The dense float64 ``[out, in]`` weight, decoded without the kernels or their twin.

        Uses the slow, obvious unpacker of :mod:`kernels.packing`: signed codes minus the zero
        point, times the group scale, all in float64.
        """
        gidx = group_index(self.in_features, self.group_size, self.weight_packed.device)  # [K]
        q = unpack_int32(self.weight_packed, self.bits, self.in_features).to(torch.float64)  # [N, K]
        if self.weight_zero_point is not None:
            zero = unpack_int32(self.weight_zero_point, self.bits, self.out_features, dim=0)  # [N, G]
            q = q - zero.to(torch.float64)[:, gidx]
        return q * self.weight_scale.to(torch.float64)[:, gidx]  # [N, K]

    def reference_forward(self, x: Tensor) -> Tensor:
        """``x · dequant(W)ᵀ + b`` in float64 plain torch (the ``compress validate`` reference)."""
        bias = None if self.bias is None else self.bias.to(torch.float64)
        return torch.nn.functional.linear(x.to(torch.float64), self.reference_weight(), bias)

    def kernel_path(self, x: Tensor) -> str:
        """The code path ``forward(x)`` takes (see :func:`kernels.quant_matmul.path_label`)."""
        if self._dense is not None:
            return "dense cache"
        return path_label(x, self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}")

    def manifest_entry(self) -> dict:
        return {"kind": "quant", "format": "pack-quantized", "bits": self.bits,
                "group_size": self.group_size, "symmetric": self.symmetric,
                "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "act_order": self.act_order, "observer": self.observer}


@register_kind("quant")
def _build_quant(original: nn.Module, entry: dict) -> QuantLinear:
    dtype = original_dtype(original)
    m = QuantLinear(entry["in_features"], entry["out_features"], entry["bits"],
                    entry["group_size"], entry["symmetric"], entry.get("bias", False),
                    dtype, device="meta", legacy_packing=entry.get("packing") == "legacy-v1")
    m.act_order, m.observer = bool(entry.get("act_order", False)), entry.get("observer", "minmax")
    return m
