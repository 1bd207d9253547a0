"""The FlashSVD serving blocks on the Triton kernels (CPU interpreter) equal the unfused
low-rank blocks on the torch path: tiny LLaMA (causal, RoPE, GQA, padding, per-head q/k/v) and
tiny BERT (padding), fp32 within 1e-4."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from pathlib import Path

import pytest
import torch

import compress
from compress.modules.flashsvd import enable_flashsvd
from compress.recipe import parse_recipe
from compress.runner import run_recipe

TOL = 1e-4


def _lowrank(src: Path, out: Path, **cfg: object) -> Path:
    recipe = parse_recipe({"stages": [{"pass": "lowrank", "config": {"whiten": False, **cfg}}]})
    return run_recipe(recipe, src, out)


def _reference(model_dir: Path, kwargs: dict, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    monkeypatch.setenv("COMPRESS_KERNELS", "torch")
    model = compress.load(model_dir)
    with torch.no_grad():
        out = model(**kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("per_head", [False, True])
def test_fused_llama_on_triton_equals_unfused(per_head: bool, tiny_llama: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    out = _lowrank(tiny_llama, tmp_path / "lr", ratio=0.5, per_head=per_head)
    ids = torch.randint(0, 400, (2, 21), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[1, :4] = 0
    kwargs = {"input_ids": ids, "attention_mask": am, "use_cache": False}
    ref = _reference(out, kwargs, monkeypatch)
    monkeypatch.setenv("COMPRESS_KERNELS", "triton")
    model = compress.load(out)
    assert enable_flashsvd(model).total == 6
    with torch.no_grad():
        got = model(**kwargs).logits
    keep = am.bool()[..., None]
    assert float(((got - ref).abs() * keep).max() / (ref.abs() * keep).max()) < TOL


def test_fused_bert_on_triton_equals_unfused(tiny_bert: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    out = _lowrank(tiny_bert, tmp_path / "lr", ratio=0.5)
    ids = torch.randint(0, 400, (2, 19), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    am[0, 13:] = 0
    kwargs = {"input_ids": ids, "attention_mask": am}
    ref = _reference(out, kwargs, monkeypatch)
    monkeypatch.setenv("COMPRESS_KERNELS", "triton")
    model = compress.load(out)
    assert enable_flashsvd(model).total == 4
    with torch.no_grad():
        got = model(**kwargs).last_hidden_state
    keep = am.bool()[..., None]
    assert float(((got - ref).abs() * keep).max() / (ref.abs() * keep).max()) < TOL
