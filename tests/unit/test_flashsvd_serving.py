"""FlashSVD serving: fused blocks equal the unfused low-rank blocks (fp32, 1e-4) on tiny LLaMA
(causal, RoPE, GQA, left/right padding, per-head q/k/v) and tiny BERT (padding), the fused
kernels really run, the fallbacks are exact, and masks decompose only when they may."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import compress
from compress.errors import CompressError
from compress.modules import flashsvd
from compress.modules.flashsvd import disable_flashsvd, enable_flashsvd, is_fused, key_padding_from_mask
from compress.recipe import parse_recipe
from compress.runner import run_recipe

TOL = 1e-4


def _lowrank(src: Path, out: Path, **cfg: object) -> Path:
    recipe = parse_recipe({"stages": [{"pass": "lowrank", "config": {"whiten": False, **cfg}}]})
    return run_recipe(recipe, src, out)


@pytest.fixture(scope="module")
def llama_lr(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _lowrank(tiny_llama, tmp_path_factory.mktemp("fs") / "llama", ratio=0.5)


@pytest.fixture(scope="module")
def llama_per_head(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _lowrank(tiny_llama, tmp_path_factory.mktemp("fs") / "llama-ph", ratio=0.6, per_head=True)


@pytest.fixture(scope="module")
def bert_lr(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _lowrank(tiny_bert, tmp_path_factory.mktemp("fs") / "bert", ratio=0.5)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the fused kernel calls the serving blocks make."""
    counts = {"attention": 0, "swiglu": 0, "gelu": 0}

    def wrap(name: str, fn):  # noqa: ANN001, ANN202
        def inner(*a, **k):  # noqa: ANN002, ANN003, ANN202
            counts[name] += 1
            return fn(*a, **k)
        return inner

    monkeypatch.setattr(flashsvd, "flash_svd_attention", wrap("attention", flashsvd.flash_svd_attention))
    monkeypatch.setattr(flashsvd, "flash_swiglu_ffn", wrap("swiglu", flashsvd.flash_swiglu_ffn))
    monkeypatch.setattr(flashsvd, "flash_gelu_ffn", wrap("gelu", flashsvd.flash_gelu_ffn))
    return counts


def _ids(B: int = 3, L: int = 37) -> torch.Tensor:  # L not a multiple of any chunk
    return torch.randint(0, 400, (B, L), generator=torch.Generator().manual_seed(0))


def _masked_err(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    keep = mask.bool()[..., None]
    return float(((a - b).abs() * keep).max() / (b.abs() * keep).max())


def _pads(ids: torch.Tensor) -> torch.Tensor:
    am = torch.ones_like(ids)
    am[1, :9] = 0  # left padding
    am[2, -11:] = 0  # right padding
    return am


@pytest.mark.parametrize("which", ["llama_lr", "llama_per_head"])
def test_fused_decoder_equals_unfused(which: str, request: pytest.FixtureRequest, calls: dict[str, int]) -> None:
    model = compress.load(request.getfixturevalue(which))
    ids = _ids()
    am = _pads(ids)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        ref_pad = model(input_ids=ids, attention_mask=am, use_cache=False).logits
        rep = enable_flashsvd(model)
        assert rep.fused == {"mlp": 3, "attention": 3} and not rep.skipped
        got = model(input_ids=ids, use_cache=False).logits
        assert calls["attention"] == 3 and calls["swiglu"] == 3
        got_pad = model(input_ids=ids, attention_mask=am, use_cache=False).logits
        assert calls["attention"] == 6  # padding is a key mask: still fused
    assert float((got - ref).abs().max() / ref.abs().max()) < TOL
    assert _masked_err(got_pad, ref_pad, am) < TOL


def test_fused_encoder_equals_unfused(bert_lr: Path, calls: dict[str, int]) -> None:
    model = compress.load(bert_lr)
    ids = _ids()
    am = torch.ones_like(ids)
    am[1, 20:] = 0
    am[2, 5:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am).last_hidden_state
        rep = enable_flashsvd(model)
        assert rep.fused == {"mlp": 2, "attention": 2}
        got = model(input_ids=ids, attention_mask=am).last_hidden_state
    assert calls["attention"] == 2 and calls["gelu"] == 2
    assert _masked_err(got, ref, am) < TOL


def test_load_flag_state_dict_and_disable(llama_lr: Path) -> None:
    plain = compress.load(llama_lr)
    fused = compress.load(llama_lr, flashsvd=True)
    assert is_fused(fused.model.layers[0].mlp) and is_fused(fused.model.layers[0].self_attn)
    assert isinstance(fused.model.layers[0].mlp, type(plain.model.layers[0].mlp))  # a subclass
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert disable_flashsvd(fused) == 6 and not is_fused(fused.model.layers[0].mlp)
    assert type(fused.model.layers[0].mlp) is type(plain.model.layers[0].mlp)


def test_generation_with_a_kv_cache_falls_back_exactly(llama_lr: Path, calls: dict[str, int]) -> None:
    plain = compress.load(llama_lr)
    fused = compress.load(llama_lr, flashsvd=True)
    ids = _ids(1, 12)
    with torch.no_grad():
        a = plain.generate(ids, max_new_tokens=5, do_sample=False)
        b = fused.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)
    assert calls["attention"] == 0 and calls["swiglu"] > 0  # cached attention: unfused path


def test_blocks_with_a_dense_linear_stay_unfused(tiny_llama: Path, tmp_path: Path) -> None:
    out = _lowrank(tiny_llama, tmp_path / "part", ratio=0.5, ignore=["k_proj", "down_proj"])
    model = compress.load(out)
    rep = enable_flashsvd(model, require=False)
    assert rep.total == 0 and len(rep.skipped) == 6
    with pytest.raises(CompressError, match="no block"):
        enable_flashsvd(model)
    with pytest.raises(CompressError):
        compress.load(tiny_llama, flashsvd=True)


def _causal(L: int) -> torch.Tensor:
    return torch.ones(L, L, dtype=torch.bool).tril()


def test_mask_decomposition() -> None:
    L = 6
    kpm = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    causal = (_causal(L)[None] & kpm[:, None, :])[:, None]  # [B, 1, L, L]
    assert key_padding_from_mask(None, L, causal=True) == (True, None)
    ok, got = key_padding_from_mask(causal, L, causal=True)
    assert ok and torch.equal(got, kpm)
    ok, got = key_padding_from_mask(torch.where(causal, 0.0, -1e30), L, causal=True)  # additive form
    assert ok and torch.equal(got, kpm)
    ok, got = key_padding_from_mask(_causal(L).expand(2, 1, L, L), L, causal=True)
    assert ok and got is None  # plain causal: no key mask needed
    window = (_causal(L) & ~_causal(L).tril(-3))[None, None]  # sliding window of 3
    assert key_padding_from_mask(window, L, causal=True)[0] is False
    bidir = kpm[:, None, None, :].expand(2, 1, L, L)
    ok, got = key_padding_from_mask(bidir, L, causal=False)
    assert ok and torch.equal(got, kpm)
    assert key_padding_from_mask(causal, L, causal=False)[0] is False
    assert key_padding_from_mask(bidir[..., :4], L, causal=False)[0] is False  # cached keys
