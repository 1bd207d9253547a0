"""LowRankLinear: a linear layer stored as two factors, ``y = (x U) V + b``.

Whole-matrix layout (``heads == 1``): ``U [in, r]``, ``V [r, out]``, served by
:func:`compress.kernels.lowrank.lowrank_matmul` (the rank-space tile stays on chip on CUDA; the CPU twin
bounds it to a row chunk).

Per-head layout (q/k/v with ``heads > 1``): ``U [in, heads·r]`` (head ``h``'s basis in columns
``h·r … (h+1)·r − 1``) and ``V [heads, r, head_dim]``; head ``h``'s output is ``(x U_h) V_h``.
It stores ``heads·r·(in + head_dim)`` numbers. The FlashSVD attention block consumes it through
:meth:`LowRankLinear.stacked_v` (the block-diagonal ``[heads·r, heads·head_dim]`` form).

Checkpoint tensors: ``<name>.U``, ``<name>.V`` (and ``<name>.bias``); the manifest entry carries
``kind: lowrank``, the dense shape, the rank and the layout.

The ``lowrank-shared`` kind (:class:`SharedBasisLinear`) reads its input basis ``U [in, r]``
from a ``shared`` group (one basis for several linears that see the same kind of input, e.g.
q/k/v, or one role across layers) and stores only its own ``V [r, out]`` (and bias).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from typing import Literal

from pydantic import Field

from compress.modules.kinds import KindEntry, ModuleKind, SharedTensors, dtype_bytes, original_dtype, register_kind
from compress.kernels._triton import use_triton
from compress.kernels.lowrank import lowrank_matmul


class LowRankLinear(nn.Module):
    """``y ≈ x Wᵀ + b`` with ``Wᵀ = U V`` (whole) or per-head blocks ``U_h V_h``.

    Args:
        in_features / out_features: dense shape.
        rank: rank (per head when ``heads > 1``).
        heads: 1 for a whole-matrix factorisation, else the number of heads (``out`` splits
            into ``heads`` blocks of ``out // heads``).
        bias: keep a dense bias; dtype: dtype of the factors.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, *, heads: int = 1,
                 bias: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if heads < 1 or out_features % heads:
            raise ValueError(f"out_features={out_features} does not split into {heads} heads")
        self.in_features, self.out_features, self.rank, self.heads = in_features, out_features, rank, heads
        kw = {"dtype": dtype, "device": device}
        self.U = nn.Parameter(torch.zeros(in_features, heads * rank, **kw), requires_grad=False)
        v_shape = (rank, out_features) if heads == 1 else (heads, rank, out_features // heads)
        self.V = nn.Parameter(torch.zeros(*v_shape, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, **kw), requires_grad=False) if bias else None

    @classmethod
    def from_factors(cls, U: Tensor, V: Tensor, bias: Tensor | None, dtype: torch.dtype) -> LowRankLinear:
        """Wrap factors: ``U [in, r]``/``V [r, out]`` or per-head ``U [in, H·r]``/``V [H, r, hd]``."""
        heads = 1 if V.dim() == 2 else V.shape[0]
        rank = V.shape[-2]
        out_f = V.shape[1] if heads == 1 else heads * V.shape[2]
        m = cls(U.shape[0], out_f, rank, heads=heads, bias=bias is not None, dtype=dtype, device=U.device)
        m.U.data = U.detach().to(dtype).contiguous()
        m.V.data = V.detach().to(dtype).contiguous()
        if bias is not None:
            m.bias.data = bias.detach().to(dtype).clone()  # type: ignore[union-attr]
        return m

    @property
    def head_dim(self) -> int:
        return self.out_features // self.heads

    def coefficients(self, x: Tensor) -> Tensor:
        """Rank-space coefficients ``x U``: ``[..., in] -> [..., heads·r]``."""
        return x @ self.U.to(x.dtype)

    def stacked_v(self) -> Tensor:
        """``V`` as one ``[heads·r, out]`` matrix (block-diagonal for the per-head layout)."""
        if self.heads == 1:
            return self.V
        return torch.block_diag(*self.V.unbind(0))  # [H, r, hd] -> [H·r, H·hd]

    def dense_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The ``[out, in]`` weight these factors stand for."""
        dt = dtype or self.U.dtype
        return (self.U.to(dt) @ self.stacked_v().to(dt)).T

    def forward(self, x: Tensor) -> Tensor:
        if self.heads == 1:
            return lowrank_matmul(x, self.U, self.V, self.bias)
        t = self.coefficients(x)  # [..., H·r]
        t = t.view(*x.shape[:-1], self.heads, self.rank)  # [..., H, r]
        y = torch.einsum("...hr,hrd->...hd", t, self.V.to(x.dtype))  # [..., H, hd]
        y = y.reshape(*x.shape[:-1], self.out_features)  # [..., H·hd]
        return y if self.bias is None else y + self.bias.to(x.dtype)

    @torch.no_grad()
    def reference_forward(self, x: Tensor) -> Tensor:
        """Float64 reference of :meth:`forward`: ``x · (U V) + b`` through the dense product
        (no kernel or twin), as the ``compress validate`` protocol asks."""
        y = x.to(torch.float64) @ self.dense_weight(torch.float64).T
        return y if self.bias is None else y + self.bias.to(torch.float64)

    def kernel_path(self, x: Tensor) -> str:
        """The code path ``forward(x)`` takes (the ``compress validate`` protocol)."""
        if self.heads > 1:
            return "per-head torch einsum"
        return "triton lowrank" if use_triton(x) else "torch twin · lowrank"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, heads={self.heads}, bias={self.bias is not None}")

    def manifest_entry(self) -> dict:
        return {"kind": "lowrank", "layout": "whole" if self.heads == 1 else "per_head",
                "in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "heads": self.heads, "bias": self.bias is not None}


class LowRankEntry(KindEntry):
    kind: Literal["lowrank"] = "lowrank"
    layout: Literal["whole", "per_head"] = "whole"
    rank: int = Field(ge=1)
    heads: int = Field(default=1, ge=1)


@register_kind("lowrank", LowRankEntry)
class LowRankKind(ModuleKind[LowRankEntry]):
    def build(self, original: nn.Module, entry: LowRankEntry, shared: SharedTensors | None) -> nn.Module:
        return LowRankLinear(entry.in_features, entry.out_features, entry.rank, heads=entry.heads,
                             bias=entry.bias, dtype=original_dtype(original), device="meta")

    def stored_bytes(self, entry: LowRankEntry, dtype: torch.dtype) -> int:
        n = entry.heads * entry.rank * (entry.in_features + entry.out_features // entry.heads)
        return (n + (entry.out_features if entry.bias else 0)) * dtype_bytes(dtype)


class SharedBasisLinear(nn.Module):
    """``y = (x U) V + b`` with ``U [in, r]`` read from shared group ``basis`` (tensor ``U``)."""

    def __init__(self, in_features: int, out_features: int, rank: int, basis: str, shared: SharedTensors, *,
                 bias: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank, self.basis = in_features, out_features, rank, basis
        object.__setattr__(self, "_shared", shared)  # not a child: its tensors are stored once
        kw = {"dtype": dtype, "device": device}
        self.V = nn.Parameter(torch.zeros(rank, out_features, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, **kw), requires_grad=False) if bias else None

    @property
    def U(self) -> Tensor:  # noqa: N802  (the factor's name in the equations)
        return self._shared.get(self.basis, "U")

    def forward(self, x: Tensor) -> Tensor:
        return lowrank_matmul(x, self.U.to(x.device), self.V, self.bias)

    @torch.no_grad()
    def reference_forward(self, x: Tensor) -> Tensor:
        y = x.to(torch.float64) @ self.U.to(torch.float64) @ self.V.to(torch.float64)
        return y if self.bias is None else y + self.bias.to(torch.float64)

    def kernel_path(self, x: Tensor) -> str:
        return ("triton lowrank" if use_triton(x) else "torch twin · lowrank") + " · shared basis"

    def manifest_entry(self) -> dict:
        return SharedBasisEntry(in_features=self.in_features, out_features=self.out_features, rank=self.rank,
                                basis=self.basis, bias=self.bias is not None).dump()


class SharedBasisEntry(KindEntry):
    kind: Literal["lowrank-shared"] = "lowrank-shared"
    rank: int = Field(ge=1)
    #: the ``shared`` group holding ``U [in, rank]``
    basis: str

    def shared_refs(self) -> list[str]:
        return [self.basis]


@register_kind("lowrank-shared", SharedBasisEntry)
class SharedBasisKind(ModuleKind[SharedBasisEntry]):
    def build(self, original: nn.Module, entry: SharedBasisEntry, shared: SharedTensors | None) -> nn.Module:
        assert shared is not None, "the loader attaches the shared tensors before building modules"
        return SharedBasisLinear(entry.in_features, entry.out_features, entry.rank, entry.basis, shared,
                                 bias=entry.bias, dtype=original_dtype(original), device="meta")

    def stored_bytes(self, entry: SharedBasisEntry, dtype: torch.dtype) -> int:
        return (entry.rank * entry.out_features + (entry.out_features if entry.bias else 0)) * dtype_bytes(dtype)
