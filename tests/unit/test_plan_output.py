"""`compress plan` and `compress inspect`: effective options (resolved ``auto`` values, recipe-set
ones marked), calibration protocol per stage, sizes in human units, all within 80 columns."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from compress.recipe import parse_recipe
from compress.summary import describe, plan_recipe


def _render(renderable: object) -> str:
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(renderable)
    text = console.export_text()
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert "…" not in text, text
    return text


def test_plan_shows_effective_options_and_calibration(tiny_llama: Path) -> None:
    recipe = parse_recipe({
        "name": "two-stage",
        "calibration": {"data": "/somewhere/other.txt", "n_samples": 32},
        "stages": [{"pass": "rtn", "config": {"bits": 8}},
                   {"pass": "gptq", "config": {"bits": 4, "damp": 0.02}}]})
    text = _render(plan_recipe(recipe, str(tiny_llama)))
    assert "{}" not in text
    assert "group_size: auto → 32" in text  # tiny llama widths 64 and 96: 32 divides both
    assert "* bits: 8" in text and "* damp: 0.02" in text
    assert "  symmetric: true" in text and "  hessian_dtype: float64" in text  # defaults, unmarked
    assert "no (data-free)" in text
    assert "yes: other-512-c32" in text and "32 × 512 tokens" in text
    assert "output on disk" in text and "peak memory" in text
    assert "KiB" in text and "MiB" in text and "," not in text.split("estimates")[1]


def test_inspect_shows_bytes_in_human_units(tiny_llama: Path) -> None:
    text = _render(describe(str(tiny_llama)))
    row = next(line for line in text.splitlines() if "bytes on disk" in line)
    assert "KiB (" in row and " B)" in row
