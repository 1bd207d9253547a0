"""Typed module kinds: entries are validated (unknown fields and kinds refused), each kind's
byte accounting equals the bytes its module stores, and the mixed-width quant linear computes
its segments' sum in the original column order."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.algos.quant import QuantSpec, fake_quant, group_grids, rtn_quantize
from compress.errors import CompressError
from compress.modules import MODULE_KINDS, LowRankLinear, MixedQuantLinear, QuantLinear, SharedBasisLinear
from compress.modules.kinds import SharedTensors, entry_bytes, parse_entry
from compress.modules.transformed import TransformedInput


def _stored(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _mixed(out_f: int = 24, in_f: int = 80, permuted: bool = True, sym: bool = True) -> MixedQuantLinear:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g)
    perm = torch.randperm(in_f, generator=g) if permuted else None
    wp = w if perm is None else w[:, perm]
    parts = [rtn_quantize(wp[:, a:b], QuantSpec(bits, 16, sym)) for a, b, bits in ((0, 32, 4), (32, 48, 2), (48, in_f, 8))]
    return MixedQuantLinear.from_quantized(parts, torch.randn(out_f, generator=g), perm)


def test_every_builtin_kind_is_registered_with_a_strict_entry() -> None:
    assert {"quant", "lowrank", "lowrank-shared", "dense", "transformed-input"} <= MODULE_KINDS.keys()
    for kind in MODULE_KINDS.values():
        assert kind.entry_model.model_config.get("extra") == "forbid", kind.name


@pytest.mark.parametrize("entry, needle", [
    ({"kind": "quant", "in_features": 8, "out_features": 4, "bits": 5, "group_size": 8, "symmetric": True},
     "bits 5 is not one of"),
    ({"kind": "quant", "in_features": 8, "out_features": 4, "group_size": 8, "symmetric": True},
     "exactly one of bits, segments and row_segments"),
    ({"kind": "quant", "in_features": 8, "out_features": 6, "group_size": 8, "symmetric": True,
      "row_segments": [{"start": 0, "stop": 2, "bits": 4}, {"start": 3, "stop": 6, "bits": 2}]},
     "[3, 6) does not start at 2"),
    ({"kind": "quant", "in_features": 64, "out_features": 4, "group_size": 16, "symmetric": True,
      "segments": [{"start": 0, "stop": 24, "bits": 4}, {"start": 24, "stop": 64, "bits": 3}]},
     "segment start 24 is not a multiple of group_size 16"),
    ({"kind": "quant", "in_features": 64, "out_features": 4, "group_size": 16, "symmetric": True,
      "segments": [{"start": 0, "stop": 32, "bits": 4}]}, "segments end at 32"),
    ({"kind": "lowrank", "in_features": 8, "out_features": 4, "rank": 2, "colour": "red"},
     "colour: Extra inputs are not permitted"),
    ({"kind": "transformed-input", "in_features": 8, "out_features": 4, "transform": "t",
      "inner": {"kind": "dense", "in_features": 8, "out_features": 5}}, "inner entry's shape differs"),
    ({"kind": "sparse24", "in_features": 8, "out_features": 4}, "unknown module kind 'sparse24'"),
])
def test_a_bad_entry_is_one_line_naming_the_module(entry: dict, needle: str) -> None:
    with pytest.raises(CompressError) as e:
        parse_entry("model.layers.0.x", entry)
    assert needle in str(e.value) and "\n" not in str(e.value)


def _quant(bits: int, gs: int | None, sym: bool, in_f: int = 72, bias: bool = False) -> QuantLinear:
    w = torch.randn(20, in_f, generator=torch.Generator().manual_seed(1))
    return QuantLinear.from_quantized(rtn_quantize(w, QuantSpec(bits, gs, sym)), torch.ones(20) if bias else None)


def _shared_basis() -> tuple[SharedBasisLinear, SharedTensors]:
    holder = SharedTensors()
    holder.add_group("b", {"U": torch.randn(40, 6)})
    m = SharedBasisLinear(40, 12, 6, "b", holder, bias=True)
    return m, holder


@pytest.mark.parametrize("make", [
    lambda: _quant(4, 16, True), lambda: _quant(3, 32, False), lambda: _quant(8, None, True, bias=True),
    lambda: _quant(2, 16, False, in_f=70), _mixed, lambda: _mixed(permuted=False, sym=False),
    lambda: LowRankLinear(40, 24, 5, bias=True), lambda: LowRankLinear(40, 24, 3, heads=4),
    lambda: _shared_basis()[0], lambda: nn.Linear(16, 8),
], ids=["q4g16", "q3g32-asym", "q8-channel-bias", "q2-ragged-asym", "mixed-perm", "mixed", "lowrank",
        "lowrank-heads", "lowrank-shared", "dense"])
def test_byte_accounting_equals_the_stored_tensors(make) -> None:  # noqa: ANN001
    module = make()
    entry = module.manifest_entry() if hasattr(module, "manifest_entry") else {
        "kind": "dense", "in_features": 16, "out_features": 8, "bias": True}
    assert entry_bytes(parse_entry("m", entry)) == _stored(module)


def test_transformed_input_counts_its_inner_module_and_computes_inner_of_x_t() -> None:
    holder = SharedTensors()
    t = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0]
    holder.add_group("t", {"T": t.float()})
    inner = _quant(4, 8, True, in_f=16)
    m = TransformedInput(inner, "t", holder)
    entry = parse_entry("m", m.manifest_entry())
    assert entry_bytes(entry) == _stored(inner) and entry.shared_refs() == ["t"]
    x = torch.randn(3, 16)
    assert torch.allclose(m(x), inner(x @ t.float()), atol=1e-5)
    assert torch.allclose(m.reference_forward(x), inner.reference_forward(x.double() @ t), atol=1e-10)


def test_mixed_widths_sum_their_segments_in_the_original_column_order() -> None:
    m = _mixed()
    perm = m.input_perm.long()
    x = torch.randn(5, 80, dtype=torch.float64)
    # the slow reading: quantise each permuted column range at its width, undo the permutation
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 80, generator=g)
    wp = w[:, perm]
    pieces = []
    for (a, b), spec in zip(m.bounds, (QuantSpec(4, 16), QuantSpec(2, 16), QuantSpec(8, 16)), strict=True):
        block = wp[:, a:b]
        grids = group_grids(block, spec)
        pieces.append(torch.cat([fake_quant(block[:, j * 16:(j + 1) * 16], gr, spec.maxq)
                                 for j, gr in enumerate(grids)], dim=1))
    dense = torch.empty_like(w)
    dense[:, perm] = torch.cat(pieces, dim=1)
    assert torch.allclose(m.dequantized_weight(torch.float32), dense, atol=1e-6)
    want = x @ dense.double().T + m.bias.double()
    assert torch.allclose(m.reference_forward(x), want, atol=1e-5)
    assert torch.allclose(m(x.float()).double(), want, atol=1e-4)
    assert m.kernel_path(x.float()).endswith("× 3 widths")
    entry = parse_entry("m", m.manifest_entry())
    assert entry.average_bits() == pytest.approx((32 * 4 + 16 * 2 + 32 * 8) / 80)


def test_row_widths_unstack_to_the_original_rows_and_rebuild_from_their_entry() -> None:
    from compress.algos.gptq import gptq_quantize_rows
    from compress.modules import RowMixedQuantLinear
    from compress.modules.kinds import build_module, entry_bytes

    g = torch.Generator().manual_seed(4)
    W = torch.randn(37, 75, generator=g)  # odd rows, ragged groups of 32
    X = torch.randn(200, 75, generator=g, dtype=torch.float64)
    H = X.T @ X / 200
    row_bits = [(2, 8, 3, 4)[i % 4] for i in range(37)]
    parts, stats = gptq_quantize_rows(W, H, QuantSpec(4, 32, symmetric=False), row_bits, act_order=True)
    assert [qw.spec.bits for _, qw in parts] == [2, 3, 4, 8] and stats.row_loss.shape == (37,)
    m = RowMixedQuantLinear.from_quantized(parts, torch.randn(37, generator=g))
    deq = m.dequantized_weight(torch.float32)
    for rows, qw in parts:  # every row is the GPTQ solve of its width, in its original place
        assert torch.equal(deq[rows], qw.dequantize())
    x = torch.randn(5, 75, dtype=torch.float64)
    want = x @ deq.double().T + m.bias.double()
    assert torch.allclose(m.reference_forward(x), want, atol=1e-5)
    assert torch.allclose(m(x.float()).double(), want, atol=1e-4)
    entry = parse_entry("m", m.manifest_entry())
    assert entry.average_bits() == pytest.approx(sum(row_bits) / 37)
    assert entry_bytes(entry) == _stored(m)
    built = build_module(torch.nn.Linear(75, 37, bias=True), m.manifest_entry())
    assert type(built).__name__ == "RowMixedQuantLinear" and built.bits == m.bits


def test_mixed_segments_share_symmetry_and_group_size() -> None:
    w = torch.randn(8, 32)
    with pytest.raises(ValueError, match="same symmetry and group size"):
        MixedQuantLinear.from_quantized([rtn_quantize(w[:, :16], QuantSpec(4, 16)),
                                         rtn_quantize(w[:, 16:], QuantSpec(3, 16, symmetric=False))], None)


def test_a_mixed_entry_rebuilds_the_module_it_came_from() -> None:
    from compress.modules.kinds import build_module

    m = _mixed(sym=False)
    built = build_module(nn.Linear(80, 24, device="meta"), m.manifest_entry())
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    built.load_state_dict(m.state_dict(), assign=True)
    x = torch.randn(3, 80)
    assert torch.equal(built(x), m(x))
