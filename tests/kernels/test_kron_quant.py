"""The fused Kronecker-transform + activation-quantisation kernel (Triton, under the interpreter)
against its torch twin, on odd and non-power-of-two factor sizes, and the exact int matmul."""

from __future__ import annotations

import pytest
import torch

from compress.algos.flatquant import factor_pair, kron_apply
from compress.kernels import kron_quant as dispatch
from compress.kernels import kron_quant_torch as twin

# (tokens, width, factors used): odd widths, primes (dense left factor), a left-only transform
CASES = [(5, 15, "both"), (3, 35, "both"), (7, 24, "both"), (2, 13, "left"), (4, 96, "left"), (1, 40, "right")]


def _factors(n: int, which: str, g: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    n1, n2 = factor_pair(n)
    if which == "left" and n1 == 1:
        n1, n2 = n, 1
    left = torch.randn(n1, n1, generator=g) if which in ("both", "left") else None
    right = torch.randn(n2, n2, generator=g) if which in ("both", "right") else None
    if which == "left" and n2 > 1:
        left = torch.randn(n1, n1, generator=g)
    return left, right


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}")
def test_fused_kernel_equals_twin(case, bits, force_triton) -> None:
    m, n, which = case
    g = torch.Generator().manual_seed(m * 100 + n)
    x = torch.randn(m, n, generator=g) * 3
    left, right = _factors(n, which, g)
    clip = (0.9, 0.8)
    q_t, s_t = twin.kron_quant(x, left, right, bits, clip)
    q_k, s_k = dispatch.kron_quant(x, left, right, bits, clip)
    assert "triton-interpreter" in dispatch.path_label(x)
    assert q_k.dtype == torch.int8 and s_k.shape == (m, 1)
    torch.testing.assert_close(s_k, s_t, rtol=1e-5, atol=0)
    # the transform's float sums may differ in the last bit: a code can move by one at a tie
    diff = (q_k.int() - q_t.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.02


def test_twin_codes_dequantise_to_the_transformed_input() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 24, generator=g)
    left, right = torch.randn(4, 4, generator=g), torch.randn(6, 6, generator=g)
    q, s = twin.kron_quant(x, left, right, 8)
    xt = x @ torch.kron(left, right)
    assert float(((q.float() * s - xt).abs() / s).max()) <= 0.5 + 1e-4  # within half a step
    assert float((kron_apply(x, left, right) - xt).abs().max()) < 1e-4


def test_int_linear_is_exact_integer_arithmetic() -> None:
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(-8, 8, (5, 37), generator=g, dtype=torch.int8)
    wq = torch.randint(-8, 8, (37, 11), generator=g, dtype=torch.int8)
    s, ws, b = torch.rand(5, 1, generator=g), torch.rand(11, generator=g), torch.randn(11, generator=g)
    got = dispatch.int_linear(codes, s, wq, ws, b, torch.float64)
    want = (codes.double() @ wq.double()) * s.double() * ws.double() + b.double()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
