"""FlatQuant's math and trainable block against slow, obvious references and the invariants of
methods/quantization.md §5(e): identity transforms reproduce RTN W4A4 bit for bit, 16-bit
quantisers with random invertible transforms reproduce the dense block, the Kronecker product,
and folding at export leaves the fake-quantised outputs unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn

from compress.algos.flatquant import (act_codes, asym_codes, clip_rows, factor_pair, fake_quant_act, fake_quant_kv,
                                      fake_quant_weight, inverse_transpose, kron_apply, random_hadamard,
                                      random_orthogonal, smooth_scale, weight_codes)
from compress.passes.flatquant_block import SITE_OF, BlockSpec, Factor, FlatBlock, Site


@pytest.mark.parametrize(("n", "pair"), [(576, (24, 24)), (1536, (32, 48)), (11008, (86, 128)), (4096, (64, 64)),
                                         (13, (1, 13)), (6, (2, 3)), (1, (1, 1)), (90, (9, 10))])
def test_factor_pair_is_the_divisor_pair_closest_to_sqrt(n, pair) -> None:
    assert factor_pair(n) == pair
    a, b = factor_pair(n)
    assert a * b == n and all(not (n % d == 0 and a < d <= n // d) for d in range(1, n + 1))


@pytest.mark.parametrize(("n1", "n2"), [(3, 5), (4, 4), (1, 7), (6, 1), (5, 9)])
def test_kron_apply_equals_the_dense_kronecker_product(n1, n2) -> None:
    g = torch.Generator().manual_seed(n1 * n2)
    x = torch.randn(2, 3, n1 * n2, generator=g, dtype=torch.float64)
    a, b = torch.randn(n1, n1, generator=g, dtype=torch.float64), torch.randn(n2, n2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(kron_apply(x, a, b), x @ torch.kron(a, b))
    torch.testing.assert_close(kron_apply(x, a, None), x @ torch.kron(a, torch.eye(n2, dtype=torch.float64)))
    torch.testing.assert_close(kron_apply(x, None, b), x @ torch.kron(torch.eye(n1, dtype=torch.float64), b))
    torch.testing.assert_close(kron_apply(x, None, None), x)


def test_transform_and_inverse_transpose_keep_the_product() -> None:
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(7, 12, generator=g, dtype=torch.float64), torch.randn(5, 12, generator=g, dtype=torch.float64)
    a, b = torch.randn(3, 3, generator=g, dtype=torch.float64), torch.randn(4, 4, generator=g, dtype=torch.float64)
    d = torch.rand(12, generator=g, dtype=torch.float64) + 0.5
    got = kron_apply(x * d, a, b) @ kron_apply(w / d, inverse_transpose(a), inverse_transpose(b)).T
    torch.testing.assert_close(got, x @ w.T)


def _slow_sym(x: torch.Tensor, bits: int, dim_rows: bool) -> torch.Tensor:
    """Per-row symmetric absmax/(2^(b-1)-1) quantisation, one row at a time."""
    qmax = 2 ** (bits - 1) - 1
    out = torch.empty_like(x)
    for i, row in enumerate(x.reshape(-1, x.shape[-1])):
        m = max(float(row.max().clamp(min=0)), float(-row.min().clamp(max=0)))
        s = max(m, 1e-5) / qmax if dim_rows else (m / qmax if m > 0 else 1.0)
        out.view(-1, x.shape[-1])[i] = torch.clamp(torch.round(row / s), -qmax - 1, qmax) * s
    return out


def test_quantisers_match_slow_references() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(9, 20, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fake_quant_weight(w, 4), _slow_sym(w, 4, True))
    x = torch.randn(3, 5, 20, generator=g, dtype=torch.float64)
    x[0, 0] = 0  # an all-zero token keeps scale 1
    torch.testing.assert_close(fake_quant_act(x, 4), _slow_sym(x, 4, False))
    q, s = act_codes(x, 8)
    assert float(q.abs().max()) <= 128 and s.shape == (3, 5, 1)
    assert torch.equal(fake_quant_act(x, 16), x) and torch.equal(fake_quant_weight(w, 16), w)
    codes, scale = weight_codes(w, 4)
    assert float(codes.min()) >= -8 and float(codes.max()) <= 7 and scale.shape == (9, 1)


def test_kv_quantiser_is_asymmetric_per_token_and_head() -> None:
    g = torch.Generator().manual_seed(1)
    k = torch.randn(2, 3, 11, 16, generator=g, dtype=torch.float64) + 2.0  # [b, heads, s, hd], all positive
    q, scale, zero = asym_codes(k, 4)
    assert scale.shape == (2, 3, 11, 1) and float(q.min()) >= 0 and float(q.max()) <= 15
    lo = k.amin(-1, keepdim=True).clamp(max=0)
    hi = k.amax(-1, keepdim=True).clamp(min=0)
    torch.testing.assert_close(scale, (hi - lo) / 15)
    err = (fake_quant_kv(k, 4) - k).abs()
    assert bool((err <= scale / 2 + 1e-12).all())  # within half a step of its own token/head grid
    assert torch.equal(fake_quant_kv(k, 16), k)


def test_clipping_and_smooth_scale_follow_their_formulas() -> None:
    w = torch.tensor([[-2.0, 1.0, 4.0]])
    theta = torch.logit(torch.tensor([[0.5]]))
    torch.testing.assert_close(clip_rows(w, theta, theta), torch.tensor([[-1.0, 1.0, 2.0]]))
    ws, xs = torch.tensor([4.0, 1.0]), torch.tensor([1.0, 16.0])
    torch.testing.assert_close(smooth_scale(ws, xs, 0.5), torch.tensor([2.0, 0.25]))
    q, s = act_codes(torch.tensor([[7.0, -14.0]]), 4, (torch.tensor(1.0), torch.tensor(0.5)))
    torch.testing.assert_close(s, torch.tensor([[1.0]]))  # the min shrinks to -7: scale 7/7
    assert q.tolist() == [[7.0, -8.0]]


def test_rotations_are_orthogonal_for_any_size() -> None:
    g = torch.Generator().manual_seed(2)
    for n in (1, 8, 12, 24, 9, 64):
        for m in (random_hadamard(n, g, torch.float64), random_orthogonal(n, g, torch.float64)):
            torch.testing.assert_close(m @ m.T, torch.eye(n, dtype=torch.float64))
    h = random_hadamard(16, g, torch.float64)
    torch.testing.assert_close(h.abs(), torch.full((16, 16), 0.25, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["orthogonal", "direct"])
def test_factor_starts_at_its_init_and_inverts_exactly(mode) -> None:
    g = torch.Generator().manual_seed(4)
    init = random_orthogonal(6, g)
    f = Factor(6, mode, init)
    torch.testing.assert_close(f.matrix(), init, atol=1e-5, rtol=0)
    with torch.no_grad():
        if mode == "orthogonal":
            f.sigma.copy_(torch.rand(6, generator=g) + 0.5)
        else:
            f.p.add_(0.3 * torch.randn(6, 6, generator=g))
    torch.testing.assert_close(f.matrix() @ f.inverse_t().T, torch.eye(6), atol=1e-5, rtol=0)


# -- the trainable block ----------------------------------------------------------------------------
def _tiny_layer(model_type: str = "llama", hidden: int = 48, inter: int = 80) -> tuple[nn.Module, nn.Module]:
    cls = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config}[model_type]
    kw = dict(vocab_size=50, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
    if model_type == "qwen3":
        kw["head_dim"] = hidden // 4
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cls(**kw), attn_implementation="sdpa").float().eval()
    layer = model.model.layers[0]
    for p in layer.parameters():
        p.requires_grad_(False)
    return model, layer


def _inputs(model: nn.Module, b: int = 2, s: int = 9) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(b, s, model.config.hidden_size, generator=g)
    pe = model.model.rotary_emb(x, torch.arange(s).unsqueeze(0))
    return x, {"position_embeddings": pe, "attention_mask": None}


def _dense(layer: nn.Module, x: torch.Tensor, kw: dict) -> torch.Tensor:
    out = layer(x, **kw)
    return out[0] if isinstance(out, tuple) else out


def _rtn_w4a4_block(layer: nn.Module, x: torch.Tensor, kw: dict) -> torch.Tensor:
    """The layer with every linear's weight and input RTN-quantised (4 bits, per row / token),
    built by swapping the linears for plain fake-quant ones (no FlatQuant code involved)."""

    class FQ(nn.Module):
        def __init__(self, lin: nn.Linear) -> None:
            super().__init__()
            self.w, self.b = _slow_sym(lin.weight.detach(), 4, True), lin.bias

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(_slow_sym(t, 4, False), self.w, self.b)

    q = copy.deepcopy(layer)
    for name in SITE_OF:
        parent, _, leaf = name.rpartition(".")
        setattr(q.get_submodule(parent), leaf, FQ(q.get_submodule(name)))
    return _dense(q, x, kw)


def test_identity_transforms_without_clipping_are_rtn_w4a4_bit_for_bit() -> None:
    model, layer = _tiny_layer()
    x, kw = _inputs(model)
    blk = FlatBlock(layer, BlockSpec("none", 4, 4, 16, 16, False, False, False), torch.Generator(), None)
    with torch.no_grad():
        assert torch.equal(blk(x, **kw), _rtn_w4a4_block(layer, x, kw))


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize("mode", ["flatquant", "flatquant-direct", "hadamard"])
def test_16_bit_quantisers_with_random_transforms_reproduce_the_dense_block(mode, model_type) -> None:
    model, layer = _tiny_layer(model_type)
    model.double()
    x, kw = _inputs(model)
    x = x.double()
    kw["position_embeddings"] = tuple(t.double() for t in kw["position_embeddings"])
    g = torch.Generator().manual_seed(6)
    absmax = {"ln": torch.rand(48, generator=g) + 0.5, "ug": torch.rand(48, generator=g) + 0.5,
              "down": torch.rand(80, generator=g) + 0.5}
    blk = FlatBlock(layer, BlockSpec(mode, 16, 16, 16, 16, True, True, True), g, absmax).double()
    blk.work_dtype = torch.float64
    with torch.no_grad():  # random invertible (not orthogonal) factors
        for f in [f for s in blk.sites.values() for f in s.factors] + list(blk.kv.site.factors if blk.kv.site else []):
            if f.mode == "orthogonal":
                f.sigma.copy_(torch.rand(f.n, generator=g, dtype=torch.float64) + 0.5)
            elif f.mode == "direct":
                f.p.add_(0.3 * torch.randn(f.n, f.n, generator=g, dtype=torch.float64))
        want = _dense(layer, x, kw)
        for w in blk.w_clip.values():
            w.fill_(30.0)  # sigmoid(30) = 1 - 1e-13: clipping off
        got = blk(x, **kw)
    assert float((got - want).norm() / want.norm()) < 1e-5


def test_the_key_transform_leaves_attention_scores_unchanged() -> None:
    model, layer = _tiny_layer()
    x, kw = _inputs(model)
    blk = FlatBlock(layer, BlockSpec("flatquant", 16, 16, 4, 16, False, False, False), torch.Generator().manual_seed(1),
                    None)
    q, k = torch.randn(2, 4, 9, 12), torch.randn(2, 4, 9, 12)
    blk.kv.k_bits = 16
    q2, k2 = blk.kv.keys(q, k)
    torch.testing.assert_close(q2 @ k2.transpose(-1, -2), q @ k.transpose(-1, -2), atol=1e-5, rtol=1e-5)
    assert float((k2 - k).detach().abs().max()) > 1e-2  # it did rotate


def test_site_without_a_factorisation_falls_back_to_one_dense_factor() -> None:
    s = Site(13, "flatquant", torch.Generator().manual_seed(0), None, False)
    assert s.dense_fallback and len(s.factors) == 1 and s.factors[0].n == 13
    s2 = Site(12, "flatquant", torch.Generator().manual_seed(0), None, False)
    assert not s2.dense_fallback and [f.n for f in s2.factors] == [3, 4]
    x = torch.randn(4, 13)
    torch.testing.assert_close(s(x), x @ s.factors[0].matrix())


def _randomised(blk: FlatBlock, g: torch.Generator) -> FlatBlock:
    """As if trained: random skew parts, singular values, scalings and clip factors."""
    with torch.no_grad():
        for name, p in blk.named_parameters():
            if name.endswith(("s_u", "s_v")):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("sigma") or name.endswith(".d"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif "clip" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 3 + 1)
    return blk


@pytest.mark.parametrize(("bits", "kv"), [(8, 8), (4, 4)])
def test_export_folds_without_changing_the_fake_quantised_block(bits, kv) -> None:
    from compress.arch import LLAMA
    from compress.calib.pipeline import LayerContext
    from compress.passes.flatquant import FlatQuantConfig, _export
    from compress.pipeline.contexts import RunContext

    model, layer = _tiny_layer()
    x, kw = _inputs(model)
    g = torch.Generator().manual_seed(7)
    absmax = {"ln": torch.rand(48, generator=g) + 0.5, "ug": torch.rand(48, generator=g) + 0.5,
              "down": torch.rand(80, generator=g) + 0.5}
    blk = _randomised(FlatBlock(layer, BlockSpec("flatquant", bits, bits, kv, kv, True, True, True), g, absmax), g)
    with torch.no_grad():
        fake, dense = blk(x, **kw), _dense(layer, x, kw)
    run = RunContext(None, LLAMA, model, {}, None, {}, [])  # type: ignore[arg-type]
    ctx = LayerContext(0, "model.layers.0.", layer, LLAMA, None)
    cfg = FlatQuantConfig(bits=bits, act_bits=bits, kv_bits=kv)
    records = _export(blk, ctx, run, cfg, torch.float32)
    assert len(records) == 7 and sorted(run.shared) == ["l0_down", "l0_ln", "l0_o", "l0_ug"]
    with torch.no_grad():
        real = _dense(layer, x, kw)
    assert type(layer.self_attn).__name__.startswith("Flat")
    quant_err = float((fake - dense).norm() / dense.norm())
    fold_err = float((real - fake).norm() / fake.norm())
    assert quant_err > 1e-3  # the quantisers are on
    assert fold_err < 1e-5, (fold_err, quant_err)  # folding is exact up to float rounding


@pytest.mark.parametrize(("bits", "d"), [(4, 16), (4, 7), (2, 9), (8, 5)])
def test_kv_code_packing_round_trips(bits, d) -> None:
    from compress.modules.kv_cache import pack_codes, unpack_codes

    q = torch.randint(0, 1 << bits, (2, 3, 5, d), generator=torch.Generator().manual_seed(bits + d))
    p = pack_codes(q, bits)
    assert p.dtype == torch.uint8 and p.shape[-1] == (d if bits > 4 else (d + 1) // 2)
    assert torch.equal(unpack_codes(p, bits, d).long(), q)


def test_the_code_cache_returns_what_the_uncached_attention_attends_to() -> None:
    from compress.modules.flat_attention import KVQuantizer
    from compress.modules.kv_cache import QuantizedKVCache

    g = torch.Generator().manual_seed(3)
    kv = KVQuantizer(16, 4, 4, True)
    with torch.no_grad():
        kv.k_transform.copy_(random_orthogonal(16, g))
        kv.k_transform_inv_t.copy_(kv.k_transform)  # orthogonal: P^(-T) = P
        kv.k_clip.copy_(torch.tensor([0.9, 0.95]))
    cache = QuantizedKVCache()
    q, k, v = (torch.randn(1, 2, 6, 16, generator=g) for _ in range(3))
    want_k, want_v = [], []
    for lo, hi in ((0, 4), (4, 5), (5, 6)):  # a prompt, then one token at a time
        q_s, k_s, v_s = q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi]
        q2, kc, vc = kv.codes(q_s, k_s, v_s)
        got_k, got_v = cache.update_codes(0, kc, vc, (4, 4), torch.float32)
        want_q, wk = kv.keys(q_s, k_s)  # what the uncached path computes on the same tokens
        want_k.append(wk)
        want_v.append(kv.values(v_s))
        assert torch.equal(q2, want_q)
    assert torch.equal(got_k, torch.cat(want_k, -2)) and torch.equal(got_v, torch.cat(want_v, -2))
    assert cache.get_seq_length() == 6 and cache.nbytes() == 2 * 2 * 6 * (8 + 8)  # 8 code bytes + scale + zero
