"""Protocol windows, corpus loading, exact chunked tokenisation, Gram accumulation, reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compress.calib.corpus import read_lines
from compress.calib.hessian import GramAccumulator, symmetric_gram
from compress.calib.protocol import (
    calibration_windows, eval_windows, get_protocol, split_lines, tokenize_joined)
from compress.errors import CompressError, NumericsError
from compress.report import LayerRecord, read_csv, read_json, write_csv, write_json


def test_split_and_windows_follow_brown_512() -> None:
    p = get_protocol("brown-512")
    lines = [f"line {i}" for i in range(50)]
    calib, test = split_lines(lines, p)
    assert test == [f"line {i}" for i in range(0, 50, 10)] and len(calib) == 45
    ids = torch.arange(5000)
    w = calibration_windows(ids, p)
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 5000 - 512 + 1, (128,), generator=g)
    assert w.shape == (128, 512) and torch.equal(w[:, 0], starts)
    assert torch.equal(w, calibration_windows(ids, p))  # deterministic
    ev = eval_windows(ids, p)
    assert ev.shape == (9, 512) and torch.equal(ev.flatten(), ids[: 9 * 512])


def test_too_short_corpus() -> None:
    p = get_protocol("brown-512")
    with pytest.raises(CompressError, match="fewer than one"):
        calibration_windows(torch.arange(100), p)
    with pytest.raises(CompressError, match="fewer than one"):
        eval_windows(torch.arange(100), p)


def test_corpus_files(tmp_path: Path) -> None:
    t = tmp_path / "a.txt"
    t.write_text("one\n\n two \n")
    assert read_lines(t) == ["one", "two"]
    j = tmp_path / "a.jsonl"
    j.write_text(json.dumps({"text": "x"}) + "\n" + json.dumps({"text": "y"}) + "\n")
    assert read_lines(j) == ["x", "y"]
    j.write_text('{"nope": 1}\n')
    with pytest.raises(CompressError, match="text"):
        read_lines(j)
    e = tmp_path / "e.txt"
    e.write_text("\n\n")
    with pytest.raises(CompressError, match="empty"):
        read_lines(e)
    with pytest.raises(CompressError, match="does not exist"):
        read_lines(tmp_path / "missing.txt")


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_bert"])
def test_chunked_tokenisation_is_exact(model: str, request: pytest.FixtureRequest) -> None:
    from transformers import AutoTokenizer

    from tests.conftest import brown_lines

    tok = AutoTokenizer.from_pretrained(request.getfixturevalue(model))
    lines = brown_lines(1500)
    whole = torch.tensor(tok("\n".join(lines))["input_ids"])
    assert torch.equal(tokenize_joined(tok, lines, chunk_lines=97), whole)


def test_gram_accumulator() -> None:
    xs = [torch.randn(3, 50, 20) for _ in range(4)]
    acc = GramAccumulator(20)
    for x in xs:
        acc.add(x)
    X = torch.cat([x.reshape(-1, 20) for x in xs]).double()
    assert torch.allclose(acc.mean(), X.T @ X / X.shape[0], atol=1e-5)
    x = torch.randn(300, 1100)
    assert torch.allclose(symmetric_gram(x, block=256), x.T @ x, rtol=1e-4, atol=1e-2)
    bad = GramAccumulator(4)
    bad.add(torch.full((2, 4), float("inf")))
    with pytest.raises(NumericsError):
        bad.mean()
    with pytest.raises(NumericsError):
        GramAccumulator(4).mean()


def test_report_json_csv_round_trip(tmp_path: Path) -> None:
    recs = [LayerRecord(stage="gptq", layer=i, module=f"m.{i}", kind="quant", bits=4.5, error=1e-3 * i,
                        time_s=0.5, bytes=100, params=200, extra={"damp": 0.01, "note": "x"}) for i in range(3)]
    recs.append(LayerRecord(stage="rtn", layer=-1, module="head", kind="dense"))
    write_json(recs, tmp_path / "r.json")
    write_csv(recs, tmp_path / "r.csv")
    assert read_json(tmp_path / "r.json") == recs
    assert read_csv(tmp_path / "r.csv") == recs


def test_our_kernels_do_not_shadow_the_hf_kernels_package() -> None:
    """transformers imports the PyPI package ``kernels`` when it is installed (5.25 requires it);
    ours live at ``compress.kernels`` so a checkout on ``sys.path`` never hides that one."""
    import importlib.util

    import compress.kernels

    spec = importlib.util.find_spec("kernels")
    if spec is not None and spec.origin is not None:
        assert Path(spec.origin).resolve().parent != Path(compress.kernels.__file__).resolve().parent
    from transformers import LlamaConfig  # imports transformers' hub-kernel integration

    assert LlamaConfig().hidden_size > 0
