"""Fused siblings on the native CPU path (compress/modules/native_siblings.py): q/k/v and gate/up
of every block share one native call on their stacked rows; each member's output is what its own
native call gives, whatever order the members are called in and whatever the input."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import compress
from compress.kernels import native_cpu
from compress.modules import QuantLinear
from tests.conftest import make_llama

pytestmark = pytest.mark.native_kernels


@pytest.fixture(scope="module")
def w4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2 (q/k/v carry biases) RTN W4 g32 asymmetric."""
    src = make_llama(tmp_path_factory.mktemp("sib") / "qwen2", model_type="qwen2", layers=2)
    cfg = {"bits": 4, "group_size": 32, "symmetric": False}
    return compress.run({"stages": [{"pass": "rtn", "config": cfg}]}, src, src.parent / "w4")


@pytest.fixture()
def model(w4: Path, monkeypatch: pytest.MonkeyPatch) -> torch.nn.Module:
    monkeypatch.delenv("COMPRESS_KERNELS", raising=False)
    return compress.load(w4)


def _own(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The member's own native call (its layout, not the stacked one)."""
    nw = native_cpu.prepare(m.weight_packed, m.weight_scale, m.weight_zero_point, bits=m.bits,
                            group_size=m.group_size, in_features=m.in_features)
    return native_cpu.native_linear(x, nw, m.bias)


def _unfused(model: torch.nn.Module) -> torch.nn.Module:
    other = copy.deepcopy(model)
    for m in other.modules():
        m.__dict__.pop("_siblings", None)
    return other


def test_siblings_are_grouped_at_load_and_say_so(model: torch.nn.Module) -> None:
    layer = model.model.layers[0]
    x = torch.randn(1, 3, 64)
    for name in ("q_proj", "k_proj", "v_proj"):
        m = getattr(layer.self_attn, name)
        assert "_siblings" in m.__dict__ and "_native_weight" not in m.__dict__
        assert m.kernel_path(x).endswith("q_proj/k_proj/v_proj fused)"), m.kernel_path(x)
    assert layer.mlp.up_proj.kernel_path(x).endswith("gate_proj/up_proj fused)")
    for m in (layer.self_attn.o_proj, layer.mlp.down_proj):
        assert "_siblings" not in m.__dict__ and "fused" not in m.kernel_path(x)
    rows = torch.randn(native_cpu.DENSE_MIN_M + 5, 64)
    assert "fused" not in layer.self_attn.q_proj.kernel_path(rows)  # each member decodes its own rows there


@pytest.mark.parametrize("order", [("q_proj", "k_proj", "v_proj"), ("v_proj", "q_proj", "k_proj")])
def test_each_member_gets_its_own_native_output_in_any_order(model: torch.nn.Module, order) -> None:
    attn = model.model.layers[1].self_attn
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        got = {n: getattr(attn, n)(x) for n in order}
        for n in order:
            want = _own(getattr(attn, n), x)
            assert got[n].shape == want.shape and got[n].is_contiguous()
            torch.testing.assert_close(got[n], want, rtol=1e-3, atol=1e-3)  # the same op on stacked rows


def test_a_new_or_modified_input_is_computed_again(model: torch.nn.Module) -> None:
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 4, 64)
    with torch.no_grad():
        attn.q_proj(x)
        x2 = torch.randn(1, 4, 64)
        torch.testing.assert_close(attn.k_proj(x2), _own(attn.k_proj, x2), rtol=1e-3, atol=1e-3)
        attn.q_proj(x)
        x.mul_(2)  # in place: the version counter moves
        torch.testing.assert_close(attn.k_proj(x), _own(attn.k_proj, x), rtol=1e-3, atol=1e-3)
        attn.k_proj(x)  # asked twice: the second is computed, not a stale copy
        torch.testing.assert_close(attn.k_proj(x), _own(attn.k_proj, x), rtol=1e-3, atol=1e-3)
    with torch.inference_mode():  # inference tensors have no version counter
        y = torch.randn(1, 4, 64)
        torch.testing.assert_close(attn.v_proj(y), _own(attn.v_proj, y), rtol=1e-3, atol=1e-3)


def test_rows_path_is_each_members_decoded_weight(model: torch.nn.Module) -> None:
    mlp = model.model.layers[0].mlp
    x = torch.randn(native_cpu.DENSE_MIN_M + 3, 64)
    with torch.no_grad():
        for m in (mlp.gate_proj, mlp.up_proj):
            want = torch.nn.functional.linear(x.bfloat16(), m.dequantized_weight(torch.float32).bfloat16()).float()
            torch.testing.assert_close(m(x), want, rtol=0, atol=0)


def test_the_model_computes_what_it_does_unfused(model: torch.nn.Module) -> None:
    ids = torch.randint(0, 400, (1, 24), generator=torch.Generator().manual_seed(0))
    plain = _unfused(model)
    assert not any("_siblings" in m.__dict__ for m in plain.modules())
    with torch.no_grad():
        a, b = model(ids).logits, plain(ids).logits
        assert float((a - b).norm() / b.norm()) < 1e-3
        ga = model.generate(ids[:, :8], max_new_tokens=12, do_sample=False, pad_token_id=0)
        gb = plain.generate(ids[:, :8], max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ga, gb)


def test_no_fusion_on_the_exact_twin(w4: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPRESS_KERNELS", "torch")
    m = compress.load(w4)
    assert not any("_siblings" in x.__dict__ for x in m.modules())
