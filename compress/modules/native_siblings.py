"""Fused siblings on the native CPU path: the linears of a block that read one input (the
adapter's groups: q/k/v, gate/up) are served by one native call on their row-stacked weight.

At M = 1 every native call pays a fixed cost (dispatch, the bf16 cast of the input, the output
allocation) of the order of the multiply itself on SmolLM2-sized matrices, so one call on the
stacked q/k/v rows costs less than three. The first member called with an input computes every
member's output; the others, called next with the same tensor (the same object and, outside
inference mode, the same version counter), take theirs from the group. A member called with any
other input computes the group again, so the result never depends on the call order; it is only
slower where the siblings do not in fact share the input. From :data:`native_cpu.DENSE_MIN_M`
rows on, an int4 member decodes its own rows for a bf16 GEMM (the stacked layout is not read).

The stacked layout replaces the members' own (one copy of the codes, built at load, not stored).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from compress.kernels import native_cpu
from compress.kernels.packing import unpack_int32


class NativeSiblings:
    """One group of sibling :class:`~compress.modules.QuantLinear` members served together."""

    def __init__(self, members: list[nn.Module], names: list[str]) -> None:
        self.names = names
        self.sizes = [m.out_features for m in members]
        self.weight = _stacked(members)
        self.bias = None
        if any(m.bias is not None for m in members):  # e.g. Qwen2's q/k/v; zeros for a member without
            self.bias = torch.cat([torch.zeros(m.out_features) if m.bias is None else m.bias.float() for m in members])
        self._rows = [native_cpu.stored(m.weight_packed, m.weight_scale, m.weight_zero_point,
                                        group_size=m.group_size, in_features=m.in_features)
                      if self.weight.kind == "int4" else None for m in members]
        # (input, its version, every member's output, members yet to take theirs): one tuple,
        # replaced whole, so a reader never pairs one call's input with another's outputs
        self._held: tuple[Tensor, int | None, list[Tensor], frozenset[int]] | None = None

    def forward(self, i: int, x: Tensor, bias: Tensor | None) -> Tensor:
        """Member ``i``'s output for ``x`` (its own ``bias``, for the per-member rows path)."""
        rows = native_cpu.rows_of(x, self.weight.in_features)
        if rows >= native_cpu.DENSE_MIN_M and self._rows[i] is not None:
            return native_cpu.native_linear(x, self._rows[i], bias)
        version = None if x.is_inference() else x._version
        held = self._held
        if held is not None and held[0] is x and held[1] == version and i in held[3]:
            left = held[3] - {i}
            self._held = (x, version, held[2], left) if left else None
            return held[2][i]
        y = native_cpu.native_linear(x, self.weight, self.bias)  # [..., Σ out]
        outs = [part.contiguous() for part in y.split(self.sizes, dim=-1)]
        self._held = (x, version, outs, frozenset(range(len(outs))) - {i})
        return outs[i]

    def label(self, rows: int) -> str:
        base = native_cpu.label(self.weight, rows)
        if rows >= native_cpu.DENSE_MIN_M and self.weight.kind == "int4":
            return base
        return f"{base[:-1]}, {'/'.join(self.names)} fused)"


def _stacked(members: list[nn.Module]) -> native_cpu.NativeWeight:
    """The native layout of the members' rows stacked in order (zero points 0 where symmetric)."""
    m0 = members[0]
    codes = torch.cat([unpack_int32(m.weight_packed, m.bits, m.in_features) for m in members])  # [Σ N, K]
    scale = torch.cat([m.weight_scale for m in members])  # [Σ N, G]
    zeros = None
    if any(m.weight_zero_point is not None for m in members):
        zeros = torch.cat([torch.zeros(m.weight_scale.shape, dtype=torch.int8) if m.weight_zero_point is None
                           else unpack_int32(m.weight_zero_point, m.bits, m.out_features, dim=0)
                           for m in members])  # [Σ N, G] signed
    return native_cpu.from_codes(codes, scale, zeros, bits=m0.bits, group_size=m0.group_size)


def fusable(members: list[nn.Module]) -> bool:
    """Whether these linears can share one native call: every one a CPU QuantLinear with a native
    path, one width, group size and input width."""
    from compress.modules.quant_linear import QuantLinear

    if len(members) < 2 or not all(type(m) is QuantLinear for m in members):
        return False
    m0 = members[0]
    for m in members:
        if (m.bits, m.group_size, m.in_features) != (m0.bits, m0.group_size, m0.in_features):
            return False
        if m.weight_packed.is_meta or m.legacy_packing or m.weight_packed.device.type != "cpu":
            return False
        if native_cpu.unsupported(m.bits, m.group_size, m.in_features, m.out_features, m.symmetric) is not None:
            return False
    return True


def fuse_siblings(model: nn.Module, adapter: object) -> int:
    """Group every block's sibling linears (``adapter.groups`` with more than one member) that
    :func:`fusable` accepts; returns how many groups were formed."""
    layers = model.get_submodule(adapter.layers)  # type: ignore[attr-defined]
    formed = 0
    for layer in layers:
        for group in adapter.groups:  # type: ignore[attr-defined]
            members = [_child(layer, n) for n in group]
            if any(m is None for m in members) or not fusable(members):  # type: ignore[arg-type]
                continue
            sib = NativeSiblings(members, [n.rsplit(".", 1)[-1] for n in group])  # type: ignore[arg-type]
            for i, m in enumerate(members):
                object.__setattr__(m, "_siblings", (sib, i))  # a slot, not an id: survives deepcopy
                m.__dict__.pop("_native_weight", None)
            formed += 1
    return formed


def _child(layer: nn.Module, name: str) -> nn.Module | None:
    try:
        return layer.get_submodule(name)
    except AttributeError:
        return None
