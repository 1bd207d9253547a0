"""The ``quant-tied`` kind: a quantised head whose codes the token embedding reads too.

When a model ties its head to the token table (SmolLM2, most small decoders) and the head is
quantised (``--quantize-head int8|int4``), the codes are stored once, as the ``shared`` group
``group`` (``compress_shared.<group>.weight_packed`` / ``weight_scale``: the ``pack-quantized``
layout of :class:`QuantLinear`, symmetric), and two modules read them:

* :class:`TiedQuantHead` (``role: head``) — the head, a :class:`QuantLinear` whose buffers are
  the shared tensors (so it takes the same kernels: the native CPU int8/int4 ops, the twin);
* :class:`QuantEmbedding` (``role: embedding``) — the lookup: the packed rows of the looked-up
  tokens, unpacked and scaled (``table[t] = scale[t, g] · code[t, k]``), the same values the head
  multiplies by.

Neither stores a tensor under its own name. ``transformers`` cannot tie a head to an embedding
that has no dense weight, so such an output advertises no ``quantization_config``; keeping a dense
copy of the table (``--dense-embedding``) unties them instead and stores an ordinary quant head.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from compress.kernels.packing import unpack_int32
from compress.modules.kinds import KindEntry, ModuleKind, SharedTensors, original_dtype, register_kind
from compress.modules.quant_linear import QuantLinear

TIED_GROUP = "tied_head"


class TiedQuantEntry(KindEntry):
    """``in_features`` is the hidden width, ``out_features`` the vocabulary (for both roles)."""

    kind: Literal["quant-tied"] = "quant-tied"
    role: Literal["head", "embedding"]
    #: the ``shared`` group holding ``weight_packed [vocab, packed]`` and ``weight_scale [vocab, G]``
    group: str = TIED_GROUP
    bits: Literal[4, 8]
    group_size: int = Field(ge=1)
    observer: Literal["minmax", "mse"] = "minmax"

    def shared_refs(self) -> list[str]:
        return [self.group]


class _SharedCodes:
    """The shared ``weight_packed`` / ``weight_scale`` looked up at every use (moving the model
    moves them once)."""

    group: str
    _shared: SharedTensors

    @property
    def weight_packed(self) -> Tensor:
        return self._shared.get(self.group, "weight_packed")

    @property
    def weight_scale(self) -> Tensor:
        return self._shared.get(self.group, "weight_scale")


class TiedQuantHead(_SharedCodes, QuantLinear):
    """The head ``y = x · dequant(W)ᵀ`` on the shared codes (symmetric, no bias)."""

    weight_zero_point = None

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 shared: SharedTensors, group: str = TIED_GROUP, observer: str = "minmax") -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, True
        self.legacy_packing, self.bias = False, None
        self.group, self.act_order, self.observer = group, False, observer
        object.__setattr__(self, "_shared", shared)  # not a child: its tensors are stored once

    def manifest_entry(self) -> dict:
        return TiedQuantEntry(role="head", group=self.group, bits=self.bits, group_size=self.group_size,
                              in_features=self.in_features, out_features=self.out_features,
                              observer=self.observer).dump()  # type: ignore[arg-type]


class QuantEmbedding(_SharedCodes, nn.Module):
    """``table[ids]`` decoded from the shared head codes, in ``dtype`` (the model's)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int,
                 shared: SharedTensors, group: str = TIED_GROUP, dtype: torch.dtype = torch.float32,
                 observer: str = "minmax") -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.bits, self.group_size, self.group, self.dtype, self.observer = bits, group_size, group, dtype, observer
        object.__setattr__(self, "_shared", shared)

    def forward(self, ids: Tensor) -> Tensor:
        rows = nn.functional.embedding(ids.reshape(-1), self.weight_packed)  # [n, packed] int32
        codes = unpack_int32(rows, self.bits, self.embedding_dim).to(torch.float32)  # [n, K]
        scale = nn.functional.embedding(ids.reshape(-1), self.weight_scale).to(torch.float32)  # [n, G]
        gidx = torch.arange(self.embedding_dim, device=ids.device) // self.group_size  # [K]
        out = (codes * scale[:, gidx]).to(self.dtype)
        return out.reshape(*ids.shape, self.embedding_dim)

    def reference_lookup(self, ids: Tensor) -> Tensor:
        """``table[ids]`` in float64, row by row from the slow unpacker (``compress validate``)."""
        rows = self.weight_packed[ids.reshape(-1)]  # [n, packed]
        codes = unpack_int32(rows, self.bits, self.embedding_dim).to(torch.float64)  # [n, K]
        gidx = torch.arange(self.embedding_dim, device=ids.device) // self.group_size  # [K]
        return (codes * self.weight_scale[ids.reshape(-1)].to(torch.float64)[:, gidx]).reshape(*ids.shape, -1)

    def lookup_path(self) -> str:
        return f"lookup · int{self.bits} rows of shared:{self.group}"

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}, "
                f"codes=shared:{self.group}")

    def manifest_entry(self) -> dict:
        return TiedQuantEntry(role="embedding", group=self.group, bits=self.bits, group_size=self.group_size,
                              in_features=self.embedding_dim, out_features=self.num_embeddings,
                              observer=self.observer).dump()  # type: ignore[arg-type]


def shared_head_tensors(head: QuantLinear) -> dict[str, Tensor]:
    """The tensors of a symmetric :class:`QuantLinear` head to store as the shared group."""
    if head.weight_zero_point is not None or head.bias is not None:
        raise ValueError("a tied head is quantised symmetrically and has no bias")
    return {"weight_packed": head.weight_packed, "weight_scale": head.weight_scale}


@register_kind("quant-tied", TiedQuantEntry)
class TiedQuantKind(ModuleKind[TiedQuantEntry]):
    def build(self, original: nn.Module, entry: TiedQuantEntry, shared: SharedTensors | None) -> nn.Module:
        assert shared is not None, "the loader attaches the shared tensors before building modules"
        if entry.role == "head":
            return TiedQuantHead(entry.in_features, entry.out_features, entry.bits, entry.group_size, shared,
                                 entry.group, entry.observer)
        return QuantEmbedding(entry.out_features, entry.in_features, entry.bits, entry.group_size, shared,
                              entry.group, original_dtype(original), entry.observer)

    def stored_bytes(self, entry: TiedQuantEntry, dtype: torch.dtype) -> int:
        return 0  # the codes are the shared group's (counted once, there)

    def export_refusal(self, entry: TiedQuantEntry) -> str | None:
        return ("the token embedding reads the quantised head's codes (quant-tied), which transformers "
                "cannot tie; pass --dense-embedding for an output it loads")

