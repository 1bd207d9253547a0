"""The ``dense`` and ``transformed-input`` kinds.

``dense``: a linear kept as a plain ``nn.Linear`` but listed in the manifest (e.g. the inner
linear of a transformed input, whose weight was rewritten).

``transformed-input``: ``y = inner(x T)`` with ``T [in, in]`` read from a ``shared`` group, so
one transform applied to the input that several linears share (q/k/v, gate/up) is stored once
and the group says which linears read it. The inner module is any other kind (``dense``,
``quant``, ...), stored under ``<name>.inner.*``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import model_validator
from torch import Tensor, nn

from compress.modules.kinds import (KindEntry, ModuleKind, SharedTensors, dtype_bytes, entry_bytes, get_kind,
                                    original_dtype, parse_entry, register_kind)


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
    """``inner(x T)``: the input transform ``T`` is tensor ``T`` of shared group ``transform``."""

    def __init__(self, inner: nn.Module, transform: str, shared: SharedTensors) -> None:
        super().__init__()
        self.inner, self.transform = inner, transform
        object.__setattr__(self, "_shared", shared)
        self.in_features, self.out_features = int(inner.in_features), int(inner.out_features)

    @property
    def T(self) -> Tensor:  # noqa: N802
        return self._shared.get(self.transform, "T")

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x @ self.T.to(device=x.device, dtype=x.dtype))  # the holder may sit elsewhere

    @torch.no_grad()
    def reference_forward(self, x: Tensor) -> Tensor:
        xt = x.to(torch.float64) @ self.T.to(torch.float64)
        ref = getattr(self.inner, "reference_forward", None)
        if callable(ref):
            return ref(xt)
        w = self.inner.weight.to(torch.float64)
        b = None if self.inner.bias is None else self.inner.bias.to(torch.float64)
        return torch.nn.functional.linear(xt, w, b)

    def kernel_path(self, x: Tensor) -> str:
        inner = getattr(self.inner, "kernel_path", None)
        return "x·T, then " + (inner(x) if callable(inner) else "torch linear")

    def manifest_entry(self) -> dict:
        inner = getattr(self.inner, "manifest_entry", None)
        inner_entry = inner() if callable(inner) else DenseEntry(
            in_features=self.in_features, out_features=self.out_features,
            bias=self.inner.bias is not None).dump()
        return {"kind": "transformed-input", "in_features": self.in_features, "out_features": self.out_features,
                "transform": self.transform, "inner": inner_entry}


class TransformedInputEntry(KindEntry):
    kind: Literal["transformed-input"] = "transformed-input"
    #: the ``shared`` group holding ``T [in, in]``
    transform: str
    #: the entry of the module that reads the transformed input
    inner: dict

    @model_validator(mode="after")
    def _inner(self) -> TransformedInputEntry:
        inner = parse_entry("inner", self.inner)
        if inner.kind == "transformed-input":
            raise ValueError("a transformed input cannot wrap another one")
        if (inner.in_features, inner.out_features) != (self.in_features, self.out_features):
            raise ValueError("the inner entry's shape differs from the transformed input's")
        return self

    def inner_entry(self) -> KindEntry:
        return parse_entry("inner", self.inner)

    def shared_refs(self) -> list[str]:
        return [self.transform, *self.inner_entry().shared_refs()]


@register_kind("transformed-input", TransformedInputEntry)
class TransformedInputKind(ModuleKind[TransformedInputEntry]):
    def build(self, original: nn.Module, entry: TransformedInputEntry, shared: SharedTensors | None) -> nn.Module:
        assert shared is not None, "the loader attaches the shared tensors before building modules"
        inner = entry.inner_entry()
        return TransformedInput(get_kind(inner.kind).build(original, inner, shared), entry.transform, shared)

    def stored_bytes(self, entry: TransformedInputEntry, dtype: torch.dtype) -> int:
        return entry_bytes(entry.inner_entry(), dtype)

    def export_refusal(self, entry: TransformedInputEntry) -> str | None:
        return "transformed inputs (an online x·T) have no compressed-tensors format"
