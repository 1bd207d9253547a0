"""A mixed-width linear (BAQ's output: one packed column range per width, read through a column
permutation) served by the Triton kernels under the interpreter and by the torch twin, against
the float64 product with its dequantised weight, on odd shapes and ragged groups."""

from __future__ import annotations

import pytest
import torch

from compress.algos.gptq import gptq_quantize_mixed
from compress.algos.quant import QuantSpec
from compress.modules import MixedQuantLinear

# (out, in, group size, widths per group, symmetric): ragged last groups, all four widths
CASES = [(37, 133, 32, [2, 8, 3, 4, 3], False), (19, 100, 64, [4, 2], True), (40, 75, 16, [3, 3, 8, 2, 4], True)]


def _module(out_f: int, in_f: int, gs: int, widths: list[int], sym: bool) -> tuple[MixedQuantLinear, torch.Tensor]:
    g = torch.Generator().manual_seed(out_f + in_f)
    W = torch.randn(out_f, in_f, generator=g)
    X = torch.randn(300, in_f, generator=g, dtype=torch.float64)
    mixed, _ = gptq_quantize_mixed(W, X.T @ X / 300, QuantSpec(4, gs, sym), widths, act_order=True)
    bias = torch.randn(out_f, generator=g)
    return MixedQuantLinear.from_quantized(mixed.parts, bias, mixed.perm), mixed.dequantize().double()


def _reference(x: torch.Tensor, deq: torch.Tensor, m: MixedQuantLinear) -> torch.Tensor:
    return x.double() @ deq.T + m.bias.double()


@pytest.mark.parametrize("rows", [1, 5, 70])  # gemv, fused, dequant paths
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}g{c[2]}")
def test_mixed_twin_and_triton_equal_the_dequantized_product(case, rows, force_triton, monkeypatch) -> None:
    m, deq = _module(*case)
    x = torch.randn(rows, case[1])
    want = _reference(x, deq, m)
    got = m(x)
    assert "triton-interpreter" in m.kernel_path(x)
    assert float((got.double() - want).norm() / want.norm()) < 1e-5
    monkeypatch.setenv("COMPRESS_KERNELS", "torch")
    twin = m(x)
    assert "twin" in m.kernel_path(x)
    assert float((twin.double() - want).norm() / want.norm()) < 1e-5
    assert torch.allclose(m.reference_forward(x), want, atol=1e-6 * float(want.abs().max()))
