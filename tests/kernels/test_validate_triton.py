"""``compress validate``'s per-module check with QuantLinear served by the Triton kernels (under the
interpreter): every dispatcher path is taken, labelled, and within tolerance of the reference."""

from __future__ import annotations

import pytest
import torch

from compress.algos.quant import QuantSpec, rtn_quantize
from compress.modules.quant_linear import QuantLinear
from compress.validate import DEFAULT_TOLERANCE, check_module


@pytest.mark.parametrize("bits,symmetric", [(4, False), (3, True)])
def test_triton_paths_match_the_reference(bits: int, symmetric: bool, force_triton: None) -> None:
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(29, 75, generator=gen)  # odd N, K; group 32 leaves a ragged last group of 11
    mod = QuantLinear.from_quantized(rtn_quantize(w, QuantSpec(bits=bits, group_size=32, symmetric=symmetric)),
                                     torch.randn(29, generator=gen))
    checks = check_module("m", "quant", mod, ms=[1, 17, 70], dtypes=["fp32", "bf16"], tolerance=DEFAULT_TOLERANCE,
                          generator=gen)
    assert [c.path for c in checks[:3]] == ["triton-interpreter gemv", "triton-interpreter fused",
                                           "triton-interpreter dequant"]
    assert all(c.ok for c in checks), [(c.path, c.dtype, c.rel_err) for c in checks]
    assert max(c.rel_err for c in checks if c.dtype == "fp32") < 1e-6
