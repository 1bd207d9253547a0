"""Benchmark JSON is merged, never overwritten (issue 8, item 5): a full run keeps the keys a
``--timing-only`` / ``--depth-only`` / separate ``--sections`` run wrote, and the other way round;
and the recorded benchmark rows carry truthful protocol names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import benchmarks.common as common

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    return tmp_path


def test_merge_save_keeps_every_earlier_key(results: Path) -> None:
    common.merge_save("quant", {"gptq_w4g64_timing": {"ratio": 0.9}})
    common.merge_save("quant", {"depth_memory": {"rss_ratio": 1.0}})
    common.merge_save("quant", {"machine": {"cpu": "x"}, "quality": {"rtn_w4g64": {"ppl": 2.0}}},
                      nested={"quality": None})
    common.merge_save("quant", {"quality": {"gptq_w3g64": {"ppl": 3.0}}}, nested={"quality": None})
    data = json.loads((results / "quant.json").read_text())
    assert data["gptq_w4g64_timing"] == {"ratio": 0.9} and data["depth_memory"] == {"rss_ratio": 1.0}
    assert data["quality"] == {"rtn_w4g64": {"ppl": 2.0}, "gptq_w3g64": {"ppl": 3.0}}
    # a section this run computed replaces the one on disk
    common.merge_save("quant", {"depth_memory": {"rss_ratio": 1.1}})
    assert json.loads((results / "quant.json").read_text())["depth_memory"] == {"rss_ratio": 1.1}


def test_merge_save_merges_rows_by_their_key(results: Path) -> None:
    key = ("model", "ratio")
    common.merge_save("lowrank", {"quality": [{"model": "a", "ratio": 0.5, "ppl": 1},
                                              {"model": "b", "ratio": 0.5, "ppl": 2}]}, nested={"quality": key})
    common.merge_save("lowrank", {"quality": [{"model": "a", "ratio": 0.5, "ppl": 9}]}, nested={"quality": key})
    rows = json.loads((results / "lowrank.json").read_text())["quality"]
    assert rows == [{"model": "a", "ratio": 0.5, "ppl": 9}, {"model": "b", "ratio": 0.5, "ppl": 2}]


def test_every_benchmark_script_saves_through_merge_save() -> None:
    for script in ("quant", "lowrank", "slicegpt", "kernels"):
        src = (ROOT / "benchmarks" / f"{script}.py").read_text()
        assert "merge_save(" in src, script
        assert not re.search(r"(?<![\w.])save\(", src), f"{script}.py still overwrites with save()"
        assert "Instruct (fp32)" not in src, f"{script}.py labels the dequantized GGUF model plain fp32"


def test_recorded_lowrank_rows_name_their_calibration() -> None:
    """Rows calibrated on 32 windows say brown-512-c32; uncalibrated (plain) rows name none."""
    rows = json.loads((ROOT / "benchmarks" / "results" / "lowrank.json").read_text())["quality"]
    for r in rows:
        m = re.search(r"--n-samples (\d+)", r["command"])
        if not r["whiten"]:
            assert r["calibration_protocol"] is None
        elif m and int(m.group(1)) != 128:
            assert r["calibration_protocol"] == f"brown-512-c{m.group(1)}", r["command"]
        else:
            assert r["calibration_protocol"] == "brown-512", r["command"]


def test_docs_claim_only_what_is_tested_or_measured() -> None:
    """No vLLM claim (never tested); the depth figure is owed while BENCHMARKS.md says so; the
    SmolLM2 'dense' model is named as dequantized from its Q4_1 GGUF."""
    def text(path: Path) -> str:  # reflowed: a phrase may wrap
        return re.sub(r"\s+", " ", path.read_text())

    readme = text(ROOT / "README.md")
    arch = text(ROOT / "docs" / "ARCHITECTURE.md")
    bench = (ROOT / "BENCHMARKS.md").read_text()
    assert "vLLM load" not in readme and "and vLLM" not in readme
    if re.search(r"Memory bounded by one layer\*\*[^.]*\*\*not measured\*\*", bench):
        for doc in (readme, arch):
            assert "does not grow with depth" not in doc or "not measured yet" in doc
        assert "measured in BENCHMARKS.md" not in arch
    assert "dequantized from the Q4_1 GGUF" in arch and "Q4_1 GGUF" in readme


def test_benchmarks_md_tables_are_the_rendered_json() -> None:
    """Every table render.py prints from the committed JSON stands in BENCHMARKS.md as printed
    (so a figure there cannot drift from its results file)."""
    import benchmarks.render as render

    text = (ROOT / "BENCHMARKS.md").read_text()
    for fn in (render.quant_quality, render.quant_cost, render.kernels_e2e, render.depth,
               render.cache_reuse, render.resume, render.port_regression, render.plan_truth, render.device_map,
               render.structprune, render.baq, render.nupes, render.svd_cluster, render.rco, render.flatquant,
               render.serving):
        table = fn()
        assert table in text, f"BENCHMARKS.md does not hold the table of render.{fn.__name__}:\n{table}"
