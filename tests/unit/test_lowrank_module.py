"""LowRankLinear: kernel forward vs its float64 reference, both layouts, manifest and builder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.modules import build_module
from compress.modules.lowrank import LowRankLinear


def _module(heads: int, bias: bool, in_f: int = 23, out_f: int = 30, rank: int = 7) -> LowRankLinear:
    g = torch.Generator().manual_seed(heads + 2 * bias)
    U = torch.randn(in_f, heads * rank, generator=g)
    V = torch.randn(rank, out_f, generator=g) if heads == 1 else torch.randn(heads, rank, out_f // heads, generator=g)
    b = torch.randn(out_f, generator=g) if bias else None
    return LowRankLinear.from_factors(U, V, b, torch.float32)


@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 17])
def test_forward_matches_the_float64_reference(heads: int, bias: bool, rows: int) -> None:
    m = _module(heads, bias)
    x = torch.randn(2, rows, 23)
    ref = m.reference_forward(x)
    assert ref.dtype == torch.float64 and ref.shape == (2, rows, 30)
    got = m(x)
    assert got.dtype == torch.float32
    assert float((got.double() - ref).abs().max() / ref.abs().max()) < 1e-5
    if heads > 1:  # the per-head reference is the block-diagonal product: check it independently
        H, r, hd = m.V.shape
        manual = torch.cat([x.double() @ m.U[:, h * r:(h + 1) * r].double() @ m.V[h].double()
                            for h in range(H)], dim=-1)
        if bias:
            manual = manual + m.bias.double()
        assert torch.allclose(ref, manual, atol=1e-10)


def test_validation_protocol_and_manifest() -> None:
    m = _module(3, True)
    assert m.in_features == 23 and callable(m.reference_forward)  # the `compress validate` protocol
    assert m.kernel_path(torch.zeros(1, 23)) == "per-head torch einsum"
    assert "lowrank" in _module(1, False).kernel_path(torch.zeros(1, 23))
    e = m.manifest_entry()
    assert e == {"kind": "lowrank", "layout": "per_head", "in_features": 23, "out_features": 30,
                 "rank": 7, "heads": 3, "bias": True}


@pytest.mark.parametrize("heads", [1, 3])
def test_builder_recreates_the_stored_tensor_names_and_shapes(heads: int) -> None:
    m = _module(heads, True)
    with torch.device("meta"):
        dense = nn.Linear(23, 30)
    built = build_module(dense, m.manifest_entry())
    assert isinstance(built, LowRankLinear)
    assert {k: tuple(v.shape) for k, v in built.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert all(v.is_meta for v in built.state_dict().values())


def test_stacked_v_is_block_diagonal() -> None:
    m = _module(3, False)
    S = m.stacked_v()
    assert S.shape == (21, 30)
    assert torch.equal(S[7:14, 10:20], m.V[1]) and not S[:7, 10:].any()
