"""`compress quantize --grid power` (NUPES): refusals, the data-free and learned runs end to end
(load, validate, inspect, report), zero learning steps reproduce the start, a NaN while learning
stops the run, and the stage composes after slicing and pruning in a recipe."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import compress
from compress.checkpoint import CheckpointReader
from tests.conftest import SMOKE, assert_refused, dir_hash, error_lines, run_cli


def test_help_shows_the_nupes_flags(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(["nupes", "--help"], monkeypatch, capsys)
    assert code == 0
    for flag in ("--grid", "--exponent", "--init", "--learn", "--steps", "--a-min", "--lr-exponent"):
        assert flag in out, flag


CASES = [
    (["--bits", "5", "--grid", "power"], "bits"),
    (["--bits", "3", "--grid", "power", "--asym"], "sign-symmetric"),
    (["--bits", "3", "--grid", "power", "--a-min", "1.2"], "a-min"),
    (["--bits", "3", "--grid", "power", "--a-max", "0.9"], "a-max"),
    (["--bits", "3", "--grid", "power", "--a-min", "0"], "a-min"),
    (["--bits", "3", "--grid", "power", "--steps", "10"], "add --learn"),
    (["--bits", "3", "--grid", "power", "--exponent", "row"], "exponent"),
    (["--bits", "3", "--grid", "power", "--method", "gptq"], "--grid is not an option of --method gptq"),
    (["--bits", "3", "--grid", "power", "--learn", "--data", "{tmp}/empty.txt"], "empty"),
]


@pytest.mark.parametrize("args,needle", CASES)
def test_bad_nupes_inputs(args: list[str], needle: str, tiny_llama: Path, tmp_path: Path,
                          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty.txt").write_text("")
    before = dir_hash(tiny_llama)
    out = tmp_path / "out"
    code, _, err = run_cli(["quantize", str(tiny_llama), "-o", str(out),
                            *[a.replace("{tmp}", str(tmp_path)) for a in args]], monkeypatch, capsys)
    assert_refused(code, err, needle, tiny_llama, before, out)


def _quantize(src: Path, out: Path, args: list[str], monkeypatch: pytest.MonkeyPatch,
              capsys: pytest.CaptureFixture) -> Path:
    code, _, err = run_cli(["quantize", str(src), "--group-size", "32", "-o", str(out), *args], monkeypatch, capsys)
    assert code == 0, err
    return out


def _report(out: Path) -> list[dict]:
    rows = list(csv.DictReader((out / "reports" / "report.csv").open()))
    return [dict(r, extra=json.loads(r["extra"])) for r in rows]


def test_data_free_run_loads_validates_and_inspects(tiny_llama: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    out = _quantize(tiny_llama, tmp_path / "p3", ["--bits", "3", "--grid", "power"], monkeypatch, capsys)
    model = compress.load(out)
    kinds = {e["kind"] for e in model.compress_manifest["modules"].values()}
    assert kinds == {"lut"}
    entry = next(iter(model.compress_manifest["modules"].values()))
    assert entry["grid"] == "power" and 0.2 <= entry["exponent"] <= 1.5 and entry["tables"] == "layer"
    rows = _report(out)
    # the search includes a = 1 (RTN), so no linear's weight error is above uniform RTN's
    assert rows and all(float(r["weight_error"]) <= r["extra"]["uniform_weight_error"] * (1 + 1e-6) for r in rows)
    assert (out / "reports" / "exponents.png").is_file()
    code, text, err = run_cli(["validate", str(out)], monkeypatch, capsys)
    assert code == 0 and "validation passed" in text + err, err
    code, text, _ = run_cli(["inspect", str(out)], monkeypatch, capsys)
    assert code == 0 and "power exponents" in text and "no compressed-tensors format" in " ".join(text.split())


def test_learned_run_per_channel(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture) -> None:
    out = _quantize(tiny_llama, tmp_path / "n3", ["--bits", "3", "--grid", "power", "--init", "gptq", "--learn",
                                                  "--steps", "6", "--exponent", "channel", *SMOKE],
                    monkeypatch, capsys)
    model = compress.load(out)
    entries = model.compress_manifest["modules"].values()
    assert {e["tables"] for e in entries} == {"channel"}
    lut = next(m for m in model.modules() if type(m).__name__ == "LutLinear")
    assert lut.codebook.shape == (lut.out_features, 8)
    rows = _report(out)
    assert all({"loss_first", "loss_last", "uniform_output_error", "exponent_min"} <= r["extra"].keys() for r in rows)
    assert sum(float(r["error"]) for r in rows) < sum(r["extra"]["uniform_output_error"] for r in rows)
    code, text, err = run_cli(["validate", str(out)], monkeypatch, capsys)
    assert code == 0 and "validation passed" in text + err, err
    code, text, err = run_cli(["eval", str(out), "--protocol", "brown-128-smoke"], monkeypatch, capsys)
    assert code == 0, err


def test_zero_learning_steps_reproduce_the_start(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    for init in ("search", "gptq"):
        base = ["--bits", "4", "--grid", "power", "--init", init, *(SMOKE if init == "gptq" else [])]
        a = _quantize(tiny_llama, tmp_path / f"a-{init}", base, monkeypatch, capsys)
        b = _quantize(tiny_llama, tmp_path / f"b-{init}",
                      ["--bits", "4", "--grid", "power", "--init", init, "--learn", "--steps", "0", *SMOKE],
                      monkeypatch, capsys)
        ra, rb = CheckpointReader(a), CheckpointReader(b)
        keys = [k for k in ra.keys() if k.endswith(("weight_packed", "weight_scale", "codebook"))]
        assert keys and set(keys) <= set(rb.keys())
        for k in keys:
            assert torch.equal(ra.get(k), rb.get(k)), (init, k)


def test_nan_while_learning_stops_with_one_line(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    from compress.passes import nupes

    real = nupes.algo.fake_power_quant
    monkeypatch.setattr(nupes.algo, "fake_power_quant", lambda *a, **k: real(*a, **k) * float("nan"))
    before = dir_hash(tiny_llama)
    out = tmp_path / "nan"
    code, _, err = run_cli(["quantize", str(tiny_llama), "--bits", "3", "--grid", "power", "--learn",
                            "--steps", "3", "-o", str(out), *SMOKE], monkeypatch, capsys)
    assert_refused(code, err, "diverged in block 0", tiny_llama, before, out)
    assert "lower --lr" in error_lines(err)[0]


@pytest.mark.parametrize("first", [{"pass": "slicegpt", "config": {"sparsity": 0.25}},
                                   {"pass": "structprune", "config": {"sparsity": 0.2, "structures": ["ffn"]}}])
def test_nupes_composes_after_slicing_and_pruning(first: dict, tiny_llama: Path, tmp_path: Path) -> None:
    from compress.recipe import parse_recipe
    from compress.runner import run_recipe

    recipe = parse_recipe({"calibration": {"protocol": "brown-128-smoke", "batch_size": 4}, "stages": [
        first, {"pass": "nupes", "config": {"bits": 4, "group_size": 16, "init": "gptq", "learn": True, "steps": 3}}]})
    out = run_recipe(recipe, tiny_llama, tmp_path / "o")
    model = compress.load(out)
    assert "lut" in {e["kind"] for e in model.compress_manifest["modules"].values()}
    ids = torch.randint(0, 400, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
