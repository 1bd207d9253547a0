"""The validate protocol on QuantLinear, the error metrics, tolerances, the dense reference model,
path labels, and the bench child's in-process measurement on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from compress.algos.quant import QuantSpec, rtn_quantize
from compress.errors import CompressError
from compress.modules.protocol import Validatable, validatable_modules
from compress.modules.quant_linear import QuantLinear
from compress.validate import (DEFAULT_TOLERANCE, check_module, dense_reference, errors, parse_tolerance,
                               validate)
from compress.kernels import quant_matmul_torch
from compress.kernels.quant_matmul import path_label


def make_qlinear(bits: int, symmetric: bool, group: int | None, k: int = 70, n: int = 23, bias: bool = True,
                 seed: int = 0) -> tuple[QuantLinear, torch.Tensor]:
    """A QuantLinear from RTN codes of a random weight, and the obvious float64 dense weight."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    qw = rtn_quantize(w, QuantSpec(bits=bits, group_size=group, symmetric=symmetric))
    b = torch.randn(n, generator=gen) if bias else None
    return QuantLinear.from_quantized(qw, b), qw.dequantize(torch.float64)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, None])
def test_reference_forward_is_the_dequantized_matmul(bits: int, symmetric: bool, group: int | None) -> None:
    mod, dense64 = make_qlinear(bits, symmetric, group)
    x = torch.randn(5, mod.in_features, dtype=torch.float64)
    expected = x @ dense64.T + mod.bias.to(torch.float64)
    torch.testing.assert_close(mod.reference_forward(x), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mod.reference_weight(), dense64, rtol=1e-6, atol=1e-7)
    assert isinstance(mod, Validatable)
    checks = check_module("m", "quant", mod, ms=[1, 5, 300], dtypes=["fp32", "bf16"],
                          tolerance=DEFAULT_TOLERANCE, generator=torch.Generator().manual_seed(0))
    assert len(checks) == 6 and all(c.ok for c in checks), checks
    assert {c.path for c in checks} == {"torch twin · planes", "torch twin · dequant+matmul"}
    assert max(c.rel_err for c in checks if c.dtype == "fp32") < 1e-6
    assert 1e-5 < max(c.rel_err for c in checks if c.dtype == "bf16") < 1e-2  # bf16 output rounding


def test_check_module_catches_a_wrong_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    mod, _ = make_qlinear(4, True, 32)
    real = quant_matmul_torch.matmul_dequantized

    def off_by_a_permille(x, w, bias):  # noqa: ANN001, ANN202
        return real(x, quant_matmul_torch.PackedWeight(w.packed, w.scale * 1.001, w.zero_point, w.codebook,
                                                       w.bits, w.group_size, w.in_features), bias)

    monkeypatch.setattr(quant_matmul_torch, "matmul_dequantized", off_by_a_permille)
    checks = check_module("m", "quant", mod, ms=[1, 300], dtypes=["fp32"], tolerance=DEFAULT_TOLERANCE,
                          generator=torch.Generator().manual_seed(0))
    assert not any(c.ok for c in checks) and all(5e-4 < c.rel_err < 2e-3 for c in checks)


def test_errors_metric() -> None:
    ref = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    assert errors(ref.float(), ref) == (0.0, 0.0)
    rel, mx = errors(torch.tensor([[3.0, 5.0]]), ref)
    assert rel == pytest.approx(1 / 5) and mx == pytest.approx(1.0)
    rel, mx = errors(torch.tensor([[float("nan"), 4.0]]), ref)
    assert rel != rel and mx != mx  # NaN: never within any tolerance


def test_parse_tolerance() -> None:
    assert parse_tolerance(None) == DEFAULT_TOLERANCE
    assert set(parse_tolerance(["1e-3"]).values()) == {1e-3}
    tol = parse_tolerance(["bf16=2e-2"])
    assert tol["bf16"] == 2e-2 and tol["fp32"] == DEFAULT_TOLERANCE["fp32"]
    for bad in ["abc", "-1", "0", "int8=1e-3", "inf"]:
        with pytest.raises(CompressError):
            parse_tolerance([bad])


def test_validatable_modules_takes_outermost_only() -> None:
    inner, _ = make_qlinear(4, True, 32)

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.in_features = inner, inner.in_features

        def forward(self, x):  # noqa: ANN001, ANN201
            return self.q(x)

        def reference_forward(self, x):  # noqa: ANN001, ANN201
            return self.q.reference_forward(x)

        def kernel_path(self, x):  # noqa: ANN001, ANN201
            return "wrapper"

    plain = nn.Sequential(nn.Linear(3, 3), inner)
    assert [n for n, _ in validatable_modules(plain)] == ["1"]
    assert [n for n, _ in validatable_modules(nn.Sequential(Wrapper()))] == ["0"]


def test_path_label_on_cpu() -> None:
    x1, x300 = torch.zeros(1, 8), torch.zeros(3, 100, 8)
    assert path_label(x1, 4, 8) == "torch twin · planes"
    assert path_label(x300, 4, 8) == "torch twin · dequant+matmul"  # 300 rows > PLANES_MAX_M


def _tiny_w4(tiny_llama: Path, out: Path) -> Path:
    import compress

    return compress.run({"stages": [{"pass": "rtn", "config": {"bits": 4, "group_size": 32, "symmetric": False}}]},
                        tiny_llama, out)


def test_validate_and_dense_reference_on_a_tiny_model(tiny_llama: Path, tmp_path: Path) -> None:
    from compress import load

    out = _tiny_w4(tiny_llama, tmp_path / "w4")
    rep = validate(out, ms=[1, 7], dtypes=["fp32"])
    n_mods = 3 * 7
    assert rep.ok and len(rep.checks) == 2 * n_mods and not rep.unvalidated
    served, ref = load(out), load(out)
    assert dense_reference(ref) == n_mods
    assert not any(isinstance(m, QuantLinear) for m in ref.modules())
    ids = torch.randint(0, 400, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_validate_refuses_a_dense_model(tiny_llama: Path) -> None:
    with pytest.raises(CompressError, match="no compressed modules"):
        validate(tiny_llama)


def test_bench_measure_in_process(tiny_llama: Path, tmp_path: Path) -> None:
    from compress.bench import measure

    out = _tiny_w4(tiny_llama, tmp_path / "w4")
    pre = measure(str(out), "prefill", 9, repeats=2)
    assert len(pre.latencies_s) == 2 and pre.latency_s > 0 and pre.tokens_per_s == pytest.approx(9 / pre.latency_s)
    assert sorted(pre.blocks_s) == [f"model.layers.{i}" for i in range(3)]
    assert all(0 < t < pre.latency_s for t in pre.blocks_s.values())
    assert pre.peak_bytes >= pre.loaded_bytes > 0 and pre.weight_bytes > 0
    dec = measure(str(out), "decode", 3, repeats=1, prompt=4)
    assert len(dec.latencies_s) == 3 and dec.tokens_per_s == pytest.approx(1 / dec.latency_s)
    dense = measure(str(tiny_llama), "prefill", 9, repeats=1)
    assert sum(pre.block_weight_bytes.values()) < sum(dense.block_weight_bytes.values())
