"""`evaluate(progress=...)` reports every evaluation window (every sentence batch for an
encoder) with the right totals and the protocol's name; without it nothing changes."""

from __future__ import annotations

from pathlib import Path

from compress.eval import evaluate


def _recorder() -> tuple[list[tuple[int, int, str]], object]:
    calls: list[tuple[int, int, str]] = []
    return calls, lambda done, total, msg: calls.append((done, total, msg))


def test_decoder_reports_each_window(tiny_llama: Path) -> None:
    calls, cb = _recorder()
    res = evaluate(tiny_llama, tiny_llama, protocol="brown-128-smoke", progress=cb)
    n = res.eval_windows
    assert n == 4  # brown-128-smoke: 4 evaluation windows
    assert [(d, t) for d, t, _ in calls] == [(i, n) for i in range(1, n + 1)]
    assert calls[2][2] == "eval brown-128-smoke (window 3/4)"
    quiet = evaluate(tiny_llama, tiny_llama, protocol="brown-128-smoke")
    assert quiet.ppl == res.ppl and quiet.kl_mean == res.kl_mean


def test_encoder_reports_each_batch_of_both_models(tiny_bert: Path) -> None:
    calls, cb = _recorder()
    res = evaluate(tiny_bert, tiny_bert, protocol="brown-sentences-64-smoke", progress=cb)
    assert res.sentences == 64
    total = 2 * 2  # 64 sentences in batches of 32, for the model and for the dense reference
    assert [(d, t) for d, t, _ in calls] == [(i, total) for i in range(1, total + 1)]
    assert calls[-1][2] == "eval brown-sentences-64-smoke (batch 4/4)"
