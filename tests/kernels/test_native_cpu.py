"""torch's native CPU int4/int8 weight kernels behind QuantLinear: the same function as the torch
twin (to bf16 precision), built once and cached, and the twin wherever the op does not apply."""

from __future__ import annotations

import pytest
import torch

from compress.algos.gptq import gptq_quantize
from compress.algos.quant import QuantSpec, rtn_quantize
from compress.kernels import native_cpu
from compress.modules import QuantLinear

pytestmark = pytest.mark.native_kernels  # the default CPU path, checked against the twin

# (out, in, bits, group size, symmetric): SmolLM2-like widths, odd row counts, both zero conventions
CASES = [(48, 576, 4, 64, True), (32, 256, 4, 128, False), (16, 128, 4, 32, True), (48, 512, 4, 256, False),
         (24, 96, 8, None, True)]


def _module(out_f: int, in_f: int, bits: int, gs: int | None, sym: bool) -> QuantLinear:
    g = torch.Generator().manual_seed(out_f * in_f)
    w = torch.randn(out_f, in_f, generator=g)
    x = torch.randn(200, in_f, generator=g, dtype=torch.float64)
    spec = QuantSpec(bits, gs, sym)
    qw = gptq_quantize(w, x.T @ x / 200, spec)[0] if bits == 4 else rtn_quantize(w, spec)
    return QuantLinear.from_quantized(qw, torch.randn(out_f, generator=g))


@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}w{c[2]}g{c[3]}{'s' if c[4] else 'a'}")
def test_native_path_equals_the_twin_to_bf16_precision(case, rows, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPRESS_KERNELS", "native")  # fp32 activations through the native ops too
    m = _module(*case)
    x = torch.randn(rows, case[1])
    assert "native" in m.kernel_path(x) and m.compute_dtype(x) == torch.bfloat16
    got = m(x)
    ref = m.reference_forward(x)
    assert got.dtype == x.dtype
    assert float((got.double() - ref).norm() / ref.norm()) < 1e-2
    # the twin on the bf16-rounded input: only the op's bf16 accumulation and output rounding differ
    monkeypatch.setenv("COMPRESS_KERNELS", "torch")
    assert "twin" in m.kernel_path(x)
    twin = m(x.bfloat16().float())
    assert float((got - twin).norm() / twin.norm()) < 1e-2


def test_every_float_activation_takes_the_native_path_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COMPRESS_KERNELS", raising=False)
    m = _module(48, 576, 4, 64, True)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(3, 576).to(dt)
        assert "native" in m.kernel_path(x) and m.compute_dtype(x) == torch.bfloat16
        got, ref = m(x), m.reference_forward(x)
        assert got.dtype == dt and float((got.double() - ref).norm() / ref.norm()) < 1e-2
    monkeypatch.setenv("COMPRESS_KERNELS", "torch")  # the exact twin on request
    x = torch.randn(3, 576)
    assert "twin" in m.kernel_path(x) and m.compute_dtype(x) == torch.float32


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}w{c[2]}g{c[3]}{'s' if c[4] else 'a'}")
def test_dense_rows_path_decodes_exactly_the_twins_weight(case) -> None:
    """From DENSE_MIN_M rows the weight is decoded per call: bit for bit the twin's fp32
    dequantisation rounded to bf16, and the product is the bf16 GEMM of it."""
    m = _module(*case)
    x = torch.randn(native_cpu.DENSE_MIN_M + 3, case[1])
    nw = m._native(x)
    assert nw is not None and "bf16 GEMM" in m.kernel_path(x) and "aten" in m.kernel_path(x[:1])
    decoded = native_cpu.dense_bf16(nw)
    assert torch.equal(decoded, m.dequantized_weight(torch.float32).to(torch.bfloat16))
    want = (torch.nn.functional.linear(x.bfloat16(), decoded).float() + m.bias).float()
    torch.testing.assert_close(m(x), want, rtol=0, atol=0)


def test_the_native_layout_is_built_once_and_follows_the_device() -> None:
    m = _module(48, 576, 4, 64, True)
    x = torch.randn(3, 576).bfloat16()
    m(x)
    first = m._native_weight
    m(x)
    assert m._native_weight is first
    assert "_native_weight" not in m.state_dict()


@pytest.mark.parametrize(("out_f", "bits", "gs", "sym", "why"), [
    (16, 4, None, True, "per channel"), (16, 4, 48, True, "group size 48"), (24, 4, 64, True, "multiples of 16"),
    (16, 8, 32, True, "groups"), (16, 3, 64, True, "3-bit"), (16, 2, 64, False, "2-bit"),
    (16, 8, None, True, "multiples of 16")])  # a 70-column int8 row
def test_layouts_without_a_native_op_stay_on_the_twin(out_f, bits, gs, sym, why,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPRESS_KERNELS", "native")
    in_f = (70 if bits == 8 else 96) if gs is None else 192
    assert why in native_cpu.unsupported(bits, gs or in_f, in_f, out_f, sym)
    m = _module(out_f, in_f, bits, gs, sym)
    x = torch.randn(2, m.in_features)
    assert "twin" in m.kernel_path(x) and m.compute_dtype(x) == x.dtype
    torch.testing.assert_close(m(x).double(), m.reference_forward(x), rtol=1e-5, atol=1e-5)
