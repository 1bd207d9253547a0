"""The ``dense`` and ``transformed-input`` kinds.

``dense``: a linear kept as a plain ``nn.Linear`` but listed in the manifest (e.g. the inner
linear of a transformed input, whose weight was rewritten).

``transformed-input``: ``y = inner(x T)`` with ``T [in, in]`` (or its Kronecker factors) read
from a ``shared`` group, so one transform applied to the input that several linears share
(q/k/v, gate/up) is stored once and the group says which linears read it. The inner module is
any other kind (``dense``, ``quant``, ...), stored under ``<name>.inner.*``. With ``act_bits``
the transformed input is quantised per token before the product (FlatQuant's W4A4 linears).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import model_validator
from torch import Tensor, nn

from compress.algos.flatquant import act_codes, kron_apply
from compress.kernels.kron_quant import int_linear, kron_quant
from compress.kernels.kron_quant import path_label as kron_path
from compress.kernels.packing import unpack_int32
from compress.modules.kinds import (KindEntry, ModuleKind, SharedTensors, dtype_bytes, entry_bytes, get_kind,
                                    original_dtype, parse_entry, register_kind)
from compress.modules.quant_linear import QuantLinear


class DenseEntry(KindEntry):
    kind: Literal["dense"] = "dense"


@register_kind("dense", DenseEntry)
class DenseKind(ModuleKind[DenseEntry]):
    def build(self, original: nn.Module, entry: DenseEntry, shared: SharedTensors | None) -> nn.Module:
        return nn.Linear(entry.in_features, entry.out_features, bias=entry.bias, device="meta",
                         dtype=original_dtype(original))

    def stored_bytes(self, entry: DenseEntry, dtype: torch.dtype) -> int:
        return (entry.in_features + (1 if entry.bias else 0)) * entry.out_features * dtype_bytes(dtype)

    def export_refusal(self, entry: DenseEntry) -> str | None:
        return None  # a plain linear: compressed-tensors leaves it alone


class TransformedInput(nn.Module):
    """``inner(quant(x · T))``: the input transform of shared group ``transform`` (``form``
    ``dense``: tensor ``T [in, in]``; ``kron``: ``left [n₁, n₁]`` and, unless ``kron-left``,
    ``right [n₂, n₂]``, applied as ``x · (left ⊗ right)``), then — when ``act_bits`` is set —
    FlatQuant's per-token symmetric quantisation with clip multipliers ``act_clip`` and an exact
    int8 product with the inner module's codes (:mod:`compress.kernels.kron_quant`)."""

    def __init__(self, inner: nn.Module, transform: str | None, shared: SharedTensors | None, form: str = "dense",
                 act_bits: int | None = None, act_clip: tuple[float, float] = (1.0, 1.0)) -> None:
        super().__init__()
        self.inner, self.transform, self.form = inner, transform, form
        self.act_bits, self.act_clip = act_bits, (float(act_clip[0]), float(act_clip[1]))
        object.__setattr__(self, "_shared", shared)
        object.__setattr__(self, "_int_weight", None)
        self.in_features, self.out_features = int(inner.in_features), int(inner.out_features)

    @property
    def T(self) -> Tensor:  # noqa: N802
        """The dense ``[in, in]`` transform (the Kronecker product for ``kron`` forms)."""
        left, right = self.factors()
        if left is None:
            return torch.eye(self.in_features)
        if right is None:
            return left if left.shape[0] == self.in_features else torch.kron(
                left, torch.eye(self.in_features // left.shape[0], dtype=left.dtype, device=left.device))
        return torch.kron(left, right)

    def factors(self) -> tuple[Tensor | None, Tensor | None]:
        if self.form == "identity":
            return None, None
        if self.form == "dense":
            return self._shared.get(self.transform, "T"), None
        right = None if self.form == "kron-left" else self._shared.get(self.transform, "right")
        return self._shared.get(self.transform, "left"), right

    def _transformed(self, x: Tensor) -> Tensor:
        left, right = self.factors()
        kw = {"device": x.device, "dtype": x.dtype}  # the holder may sit elsewhere
        return kron_apply(x, None if left is None else left.to(**kw), None if right is None else right.to(**kw))

    def _codes_weight(self) -> tuple[Tensor, Tensor] | None:
        """The inner module's int8 codes ``[in, out]`` and per-row scales, when it is a per-channel
        symmetric quant linear (cached after the first call; not part of the state)."""
        inner = self.inner
        if not (isinstance(inner, QuantLinear) and inner.symmetric and inner.group_size >= inner.in_features
                and inner.bits <= 8) or inner.weight_packed.is_meta:
            return None
        if self._int_weight is None or self._int_weight[0].device != inner.weight_packed.device:
            codes = unpack_int32(inner.weight_packed, inner.bits, inner.in_features)  # [out, in] int8
            object.__setattr__(self, "_int_weight", (codes.t().contiguous(), inner.weight_scale[:, 0].float()))
        return self._int_weight

    def forward(self, x: Tensor) -> Tensor:
        if self.act_bits is None:
            return self.inner(self._transformed(x))
        x2 = x.reshape(-1, self.in_features)  # [M, in]
        left, right = self.factors()
        codes, scale = kron_quant(x2, left, right, self.act_bits, self.act_clip)
        w = self._codes_weight()
        if w is not None:
            y = int_linear(codes, scale, w[0], w[1], self.inner.bias, x.dtype)
        else:
            y = self.inner((codes.float() * scale).to(x.dtype))
        return y.reshape(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def reference_forward(self, x: Tensor) -> Tensor:
        """Float64: the transform, the activation quantiser (its codes, except where the value
        sits on a rounding tie within 1e-4 of a step, where the kernel's code is taken: fp32 and
        fp64 sums may round either way there) and the inner reference."""
        left, right = self.factors()
        xt = kron_apply(x.to(torch.float64), *(None if f is None else f.to(torch.float64) for f in (left, right)))
        if self.act_bits is not None:
            q, scale = act_codes(xt, self.act_bits, self.act_clip)
            kq, _ = kron_quant(x.reshape(-1, self.in_features), left, right, self.act_bits, self.act_clip)
            kq = kq.reshape(q.shape).double()
            u = xt / scale
            tie = ((u - torch.floor(u)) - 0.5).abs() < 1e-4
            q = torch.where(tie & ((kq - q).abs() == 1), kq, q)
            xt = q * scale
        ref = getattr(self.inner, "reference_forward", None)
        if callable(ref):
            return ref(xt)
        w = self.inner.weight.to(torch.float64)
        b = None if self.inner.bias is None else self.inner.bias.to(torch.float64)
        return torch.nn.functional.linear(xt, w, b)

    def kernel_path(self, x: Tensor) -> str:
        if self.act_bits is not None:
            w = "int8 codes" if self._codes_weight() is not None else "inner module"
            return f"{kron_path(x)} (A{self.act_bits}), weights: {w}"
        inner = getattr(self.inner, "kernel_path", None)
        return "x·T, then " + (inner(x) if callable(inner) else "torch linear")

    def manifest_entry(self) -> dict:
        inner = getattr(self.inner, "manifest_entry", None)
        inner_entry = inner() if callable(inner) else DenseEntry(
            in_features=self.in_features, out_features=self.out_features,
            bias=self.inner.bias is not None).dump()
        entry = {"kind": "transformed-input", "in_features": self.in_features, "out_features": self.out_features,
                 "transform": self.transform, "form": self.form, "inner": inner_entry}
        if self.act_bits is not None:
            entry.update(act_bits=self.act_bits, act_clip=list(self.act_clip))
        return entry


class TransformedInputEntry(KindEntry):
    kind: Literal["transformed-input"] = "transformed-input"
    #: the ``shared`` group holding ``T [in, in]`` or the factors (None for ``identity``)
    transform: str | None = None
    #: the entry of the module that reads the transformed input
    inner: dict
    #: ``dense`` (tensor ``T``), ``kron`` (``left`` ⊗ ``right``), ``kron-left`` (``left`` ⊗ I) or
    #: ``identity`` (no transform: the activation quantiser alone)
    form: Literal["dense", "kron", "kron-left", "identity"] = "dense"
    #: per-token activation quantisation of the transformed input (None: none)
    act_bits: Literal[4, 8] | None = None
    #: multipliers of each token's max and min before its scale is taken (learned clipping)
    act_clip: tuple[float, float] = (1.0, 1.0)

    @model_validator(mode="after")
    def _inner(self) -> TransformedInputEntry:
        inner = parse_entry("inner", self.inner)
        if (self.transform is None) != (self.form == "identity"):
            raise ValueError("a transform group is needed exactly when the form is not identity")
        if inner.kind == "transformed-input":
            raise ValueError("a transformed input cannot wrap another one")
        if (inner.in_features, inner.out_features) != (self.in_features, self.out_features):
            raise ValueError("the inner entry's shape differs from the transformed input's")
        return self

    def inner_entry(self) -> KindEntry:
        return parse_entry("inner", self.inner)

    def shared_refs(self) -> list[str]:
        return [*([self.transform] if self.transform else []), *self.inner_entry().shared_refs()]


@register_kind("transformed-input", TransformedInputEntry)
class TransformedInputKind(ModuleKind[TransformedInputEntry]):
    def build(self, original: nn.Module, entry: TransformedInputEntry, shared: SharedTensors | None) -> nn.Module:
        assert shared is not None or entry.transform is None, "the loader attaches the shared tensors first"
        inner = entry.inner_entry()
        return TransformedInput(get_kind(inner.kind).build(original, inner, shared), entry.transform, shared,
                                entry.form, entry.act_bits, entry.act_clip)

    def stored_bytes(self, entry: TransformedInputEntry, dtype: torch.dtype) -> int:
        return entry_bytes(entry.inner_entry(), dtype)

    def export_refusal(self, entry: TransformedInputEntry) -> str | None:
        if entry.act_bits is not None:
            return "quantised activations behind an online transform (FlatQuant) have no compressed-tensors format"
        return "transformed inputs (an online x·T) have no compressed-tensors format"
