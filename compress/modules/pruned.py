"""The ``pruned`` kind: a linear physically shrunk by structured pruning.

Structured pruning (StructPrune) removes whole channels: MLP intermediate channels (rows of
gate/up and the matching columns of down) and attention heads (rows of q/k/v for a KV group and
its query heads, and the matching columns of o). What remains is a smaller dense linear, stored
as ``weight [kept_out, kept_in]`` (+ bias) under the module's name; the entry keeps the dense
shape it replaced (``in_features``/``out_features``) for sizes and reports. The blocks stay plain
``transformers`` blocks: LLaMA-family attention infers the head count from the projection
width, and the MLP from its linears, so narrower linears are all a pruned block needs, provided
the pass keeps neighbours consistent (the same channels out of gate/up and into down).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from compress.modules.kinds import (KindEntry, ModuleKind, SharedTensors, dtype_bytes, original_dtype, register_kind,
                                    register_transform)


class PrunedLinear(nn.Linear):
    """A dense ``[kept_out, kept_in]`` linear standing for a ``[out, in]`` one."""

    def __init__(self, kept_in: int, kept_out: int, in_features: int, out_features: int, bias: bool,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(kept_in, kept_out, bias=bias, dtype=dtype, device=device)
        self.dense_in, self.dense_out = in_features, out_features

    @classmethod
    def from_dense(cls, linear: nn.Linear, keep_out: Tensor | None = None, keep_in: Tensor | None = None) -> PrunedLinear:
        """Keep the output rows ``keep_out`` and input columns ``keep_in`` (index tensors; None: all)."""
        w = linear.weight.detach()
        rows = torch.arange(w.shape[0], device=w.device) if keep_out is None else keep_out.to(w.device)
        cols = torch.arange(w.shape[1], device=w.device) if keep_in is None else keep_in.to(w.device)
        m = cls(len(cols), len(rows), linear.in_features, linear.out_features, linear.bias is not None, w.dtype,
                device=w.device)
        m.weight.data = w[rows][:, cols].clone()
        if linear.bias is not None:
            m.bias.data = linear.bias.detach()[rows].clone()
        return m.requires_grad_(False)

    def reference_forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(torch.float64)
        return torch.nn.functional.linear(x.to(torch.float64), self.weight.to(torch.float64), bias)

    def kernel_path(self, x: Tensor) -> str:
        return "dense (pruned)"

    def manifest_entry(self) -> dict:
        return {"kind": "pruned", "in_features": self.dense_in, "out_features": self.dense_out,
                "kept_in": self.in_features, "kept_out": self.out_features, "bias": self.bias is not None}


class PrunedEntry(KindEntry):
    kind: Literal["pruned"] = "pruned"
    kept_in: int = Field(ge=1)
    kept_out: int = Field(ge=1)

    @model_validator(mode="after")
    def _within(self) -> PrunedEntry:
        if self.kept_in > self.in_features or self.kept_out > self.out_features:
            raise ValueError(f"kept shape [{self.kept_out}, {self.kept_in}] exceeds the dense "
                             f"[{self.out_features}, {self.in_features}]")
        return self


@register_kind("pruned", PrunedEntry)
class PrunedKind(ModuleKind[PrunedEntry]):
    def build(self, original: nn.Module, entry: PrunedEntry, shared: SharedTensors | None) -> nn.Module:
        return PrunedLinear(entry.kept_in, entry.kept_out, entry.in_features, entry.out_features, entry.bias,
                            original_dtype(original), device="meta")

    def stored_bytes(self, entry: PrunedEntry, dtype: torch.dtype) -> int:
        return (entry.kept_in + (1 if entry.bias else 0)) * entry.kept_out * dtype_bytes(dtype)

    def export_refusal(self, entry: PrunedEntry) -> str | None:
        return "pruned linears are narrower than config.json says; only compress.load rebuilds them"


#: attention attributes some ``transformers`` blocks read their head counts from (OPT's
#: ``num_heads``) instead of inferring them from the projections' widths (LLaMA's)
_HEAD_ATTRS = ("num_heads", "num_attention_heads")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads")


def set_head_counts(attn: nn.Module, heads: int, kv_heads: int) -> None:
    """Tell an attention module with pruned heads how many query and KV heads it has left."""
    for names, value in ((_HEAD_ATTRS, heads), (_KV_ATTRS, kv_heads)):
        for a in names:
            if isinstance(getattr(attn, a, None), int):
                setattr(attn, a, value)


@register_transform("head-counts")
def apply_head_counts(model: nn.Module, transform: dict, adapter: object) -> None:
    """The ``head-counts`` transform: per block ``[query heads, KV heads]`` left after structured
    pruning (blocks not listed keep the config's counts)."""
    layers = model.get_submodule(adapter.layers)  # type: ignore[attr-defined]
    attn_rel = adapter.role("attn")  # type: ignore[attr-defined]
    for i, (heads, kv) in transform["layers"].items():
        set_head_counts(layers[int(i)].get_submodule(attn_rel), int(heads), int(kv))
