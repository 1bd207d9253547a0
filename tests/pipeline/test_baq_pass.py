"""BAQ (``gptq`` with ``allocate: baq``) end to end on a tiny random LLaMA: equal sensitivities
give exactly GPTQ's tensors, a fractional budget is met over every quantised weight with real
mixed-width layers that load, validate and match their reference, the scan's losses are reused
from the work store by a run at another budget, and bad input is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import compress
from compress.checkpoint import CheckpointReader
from compress.modules import MixedQuantLinear
from compress.pipeline import stream
from compress.recipe import parse_recipe
from compress.runner import run_recipe
from compress.validate import validate
from tests.conftest import SMOKE, assert_refused, dir_hash, run_cli

CAL = {"protocol": "brown-128-smoke", "batch_size": 3}
IDS = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(1))


def _run(src: Path, out: Path, cache: bool = False, **cfg: object) -> Path:
    recipe = parse_recipe({"calibration": CAL, "stages": [{"pass": "gptq", "config": {"group_size": 16, **cfg}}]})
    return run_recipe(recipe, src, out, cache=cache, device="cpu")


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    r = CheckpointReader(d)
    return {k: r.get(k) for k in r.keys()}


def _average_bits(out: Path) -> float:
    """Code bits per quantised weight over every quant entry of the manifest."""
    from compress.modules.kinds import parse_entry

    mods = json.loads((out / "compression.json").read_text())["modules"]
    num = den = 0.0
    for name, e in mods.items():
        if e["kind"] == "quant":
            entry = parse_entry(name, e)
            num += entry.average_bits() * entry.in_features * entry.out_features
            den += entry.in_features * entry.out_features
    return num / den


def test_equal_sensitivities_give_gptq_bit_for_bit(tiny_llama: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from compress.algos import baq

    _run(tiny_llama, tmp_path / "gptq", bits=3)
    monkeypatch.setattr(baq, "group_sensitivity",
                        lambda loss, rows, gw, ref, theta=1.95: torch.ones(-(-loss.numel() // gw), dtype=torch.float64))
    out = _run(tiny_llama, tmp_path / "baq", bits=3, allocate="baq")
    plan = json.loads((out / "plan.json").read_text())
    assert plan["realized"] == 3.0 and all(set(u["group_bits"]) == {3} for u in plan["units"])
    a, b = _tensors(tmp_path / "gptq"), _tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fractional_budget_is_met_with_mixed_layers_that_serve(tiny_llama: Path, tmp_path: Path) -> None:
    out = _run(tiny_llama, tmp_path / "b25", bits=3, allocate="baq", average_bits=2.5, scope="model-relative")
    plan = json.loads((out / "plan.json").read_text())
    assert abs(plan["realized"] - 2.5) <= 0.01 and abs(_average_bits(out) - plan["realized"]) < 1e-9
    model = compress.load(out)
    mixed = [m for m in model.modules() if isinstance(m, MixedQuantLinear)]
    assert mixed, "a fractional budget must mix widths inside some linear"
    x = torch.randn(4, mixed[0].in_features)
    with torch.no_grad():
        assert torch.allclose(mixed[0](x).double(), mixed[0].reference_forward(x), atol=1e-4)
        logits = model(input_ids=IDS).logits
    assert torch.isfinite(logits).all()
    report = validate(out)
    assert report.ok and any("Mixed" in c.kind or "quant" in c.kind for c in report.checks) and not report.unvalidated
    assert (out / "reports" / "bits.png").is_file()
    rows = json.loads((out / "reports" / "report.json").read_text())
    rows = rows["layers"] if isinstance(rows, dict) else rows
    assert all("b:" in r["extra"]["widths"] and r["extra"]["predicted_loss"] > 0 for r in rows
               if r["kind"] == "quant")
    export = json.loads((out / "compression.json").read_text())["export"]
    assert "mixed bit widths" in json.dumps(export)


def test_ragged_groups_and_an_opt_model(tmp_path: Path) -> None:
    """Group size 40 leaves ragged last groups (64 = 40 + 24, 96 = 2·40 + 16); OPT has biases; a
    small theta spreads the widths inside every layer."""
    from tests.conftest import make_opt

    src = make_opt(tmp_path / "opt", seed=2)
    out = _run(src, tmp_path / "b", bits=3, allocate="baq", average_bits=3.4, group_size=40, theta=0.6)
    plan = json.loads((out / "plan.json").read_text())
    assert abs(plan["realized"] - 3.4) <= 0.01 and abs(_average_bits(out) - plan["realized"]) < 1e-9
    model = compress.load(out)
    mixed = [m for m in model.modules() if isinstance(m, MixedQuantLinear)]
    assert mixed and all(m.bias is not None for m in mixed)
    for m in mixed:
        x = torch.randn(3, m.in_features)
        with torch.no_grad():
            assert torch.allclose(m(x).double(), m.reference_forward(x), atol=1e-4)
    assert validate(out).ok


def test_row_blocks_get_their_own_widths(tiny_llama: Path, tmp_path: Path) -> None:
    """``granularity: rows``: blocks of 16 output rows (cut per sibling) at their widths."""
    from compress.modules import RowMixedQuantLinear

    out = _run(tiny_llama, tmp_path / "rows", bits=3, allocate="baq", average_bits=2.75, granularity="rows",
               row_block=16, theta=0.6)
    plan = json.loads((out / "plan.json").read_text())
    assert abs(plan["realized"] - 2.75) <= 0.01 and abs(_average_bits(out) - plan["realized"]) < 1e-9
    assert all(u["row_bits"] and not u["group_bits"] for u in plan["units"])
    model = compress.load(out)
    rowmixed = [m for m in model.modules() if isinstance(m, RowMixedQuantLinear)]
    assert rowmixed
    for m in rowmixed:
        x = torch.randn(3, m.in_features)
        with torch.no_grad():
            assert torch.allclose(m(x).double(), m.reference_forward(x), atol=1e-4)
    assert validate(out).ok
    rows = json.loads((out / "reports" / "report.json").read_text())
    rows = rows["layers"] if isinstance(rows, dict) else rows
    assert any(r["extra"].get("widths", "").endswith("r") for r in rows)


def test_budget_eight_is_within_int8_error_of_dense(tiny_llama: Path, tmp_path: Path) -> None:
    out = _run(tiny_llama, tmp_path / "b8", bits=8, allocate="baq")
    assert {b for u in json.loads((out / "plan.json").read_text())["units"] for b in u["group_bits"]} == {8}
    import transformers

    dense = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        want, got = dense(input_ids=IDS).logits, compress.load(out)(input_ids=IDS).logits
    assert float((got - want).abs().max() / want.abs().max()) < 2e-2


def test_per_layer_widths_export_to_compressed_tensors(tiny_llama: Path, tmp_path: Path) -> None:
    out = _run(tiny_llama, tmp_path / "layer", bits=3, allocate="baq", average_bits=3.0, granularity="layer",
               scope="model", bit_choices=[2, 3, 4])
    plan = json.loads((out / "plan.json").read_text())
    assert all(len(set(u["group_bits"])) == 1 for u in plan["units"])
    assert len({u["group_bits"][0] for u in plan["units"]}) > 1
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" in cfg  # every linear has one width: compressed-tensors holds it


def test_a_second_budget_reuses_the_scanned_losses(tiny_llama: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    _run(tiny_llama, tmp_path / "a", cache=True, bits=3, allocate="baq", average_bits=3.0)
    recipe = tmp_path / "r.yaml"
    recipe.write_text((tmp_path / "a" / "recipe.yaml").read_text())
    code, shown, err = run_cli(["plan", str(recipe), str(tiny_llama)], monkeypatch, capsys)
    assert code == 0 and "BAQ: budget 3 bits, realised" in shown and "average bits per layer" in shown, err
    from compress.passes import baq as baq_pass

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("the scan ran again although its losses are stored")
    monkeypatch.setattr(baq_pass, "scan_losses", refuse)
    out = _run(tiny_llama, tmp_path / "b", cache=True, bits=3, allocate="baq", average_bits=2.7)
    assert abs(json.loads((out / "plan.json").read_text())["realized"] - 2.7) <= 0.01


def test_cli_quantize_allocate_baq(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    code, _, err = run_cli(["quantize", str(tiny_llama), "--bits", "3", "--group-size", "16", "--allocate", "baq",
                            "--bit-choices", "2,3,4", "--average-bits", "2.8", *SMOKE, "--no-cache", "-o", str(out)],
                           monkeypatch, capsys)
    assert code == 0, err
    plan = json.loads((out / "plan.json").read_text())
    assert plan["choices"] == [2, 3, 4] and abs(plan["realized"] - 2.8) <= 0.01
    recipe = (out / "recipe.yaml").read_text()
    assert "allocate: baq" in recipe
    code, shown, err = run_cli(["inspect", str(out)], monkeypatch, capsys)
    assert code == 0, err
    assert "weights by width" in shown and "mixed bit widths" in shown


@pytest.mark.parametrize("args,needle", [
    (["--allocate", "baq", "--bit-choices", "2,5"], "5 bits has no kernel; choose from 2, 3, 4, 8"),
    (["--allocate", "baq", "--average-bits", "1.5", "--bit-choices", "2,3"], "--average-bits"),
    (["--allocate", "baq", "--average-bits", "4.5", "--bit-choices", "2,3,4"], "4.5 is outside the bit choices 2..4"),
    (["--average-bits", "2.5"], "average_bits (--average-bits) is a BAQ option: add allocate: baq"),
    (["--granularity", "rows"], "granularity (--granularity) is a BAQ option"),
    (["--method", "rtn", "--allocate", "baq"], "--allocate is not an option of --method rtn"),
])
def test_bad_allocation_input_is_refused_in_one_line(args: list[str], needle: str, tiny_llama: Path,
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    before = dir_hash(tiny_llama)
    out = tmp_path / "bad"
    code, _, err = run_cli(["quantize", str(tiny_llama), "--bits", "3", *args, "-o", str(out)], monkeypatch, capsys)
    assert_refused(code, err, needle, tiny_llama, before, out)


def test_scan_is_read_only_and_propagates_dense(tiny_llama: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``propagate: dense`` BAQ reads the Hessians the scan stored: no activation in the apply."""
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    _run(tiny_llama, tmp_path / "a", cache=True, bits=3, allocate="baq", propagate="dense", sequential="layer")

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("a cached statistics-only run computed calibration activations")
    monkeypatch.setattr(stream, "capture_block_inputs", refuse)
    out = _run(tiny_llama, tmp_path / "b", cache=True, bits=3, allocate="baq", average_bits=2.6,
               propagate="dense", sequential="layer")
    assert abs(json.loads((out / "plan.json").read_text())["realized"] - 2.6) <= 0.01


@pytest.mark.parametrize("config", [{"bits": 3}, {"bits": 3, "allocate": "baq", "average_bits": 2.5,
                                                  "granularity": "rows", "scope": "model"}])
def test_saved_recipes_parse_again(config: dict) -> None:
    """``recipe.yaml`` spells every default out; the BAQ options must not be refused on re-reading."""
    import yaml

    recipe = parse_recipe({"calibration": CAL, "stages": [{"pass": "gptq", "config": config}]})
    again = parse_recipe(yaml.safe_load(recipe.to_yaml()))
    assert again.stages[0].config == recipe.stages[0].config
