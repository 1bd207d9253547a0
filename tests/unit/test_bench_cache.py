"""The decode timing of ``compress bench`` really uses the KV cache, whatever transformers calls it."""

from __future__ import annotations

from pathlib import Path

import torch

import compress
from compress.bench import _cache_kwargs


def test_decode_step_with_the_cache_equals_the_full_forward(tiny_llama: Path) -> None:
    model = compress.load(tiny_llama)
    ids = torch.randint(0, 400, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids[:, :-1], use_cache=True)
        kw = _cache_kwargs(model, out)
        assert next(iter(kw.values())) is not None
        step = model(input_ids=ids[:, -1:], use_cache=True, **kw).logits[:, -1]
        full = model(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)
