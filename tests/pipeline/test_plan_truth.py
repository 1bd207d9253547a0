"""``compress plan`` estimates each stage on the shapes the stage before leaves; its estimates
are checked against real runs: the bytes on disk within 5 % (slice → GPTQ included, tied and
untied heads), the peak RSS of a fresh ``compress run`` process within 25 %."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from benchmarks.common import compress_cmd, measured
from compress.arch import get_adapter
from compress.checkpoint import CheckpointReader
from compress.recipe import parse_recipe
from compress.runner import run_recipe
from compress.summary import stage_bytes, stage_estimates
from tests.conftest import make_llama

CAL = {"protocol": "brown-128-smoke", "batch_size": 4}
CASES = {
    "gptq W4": [{"pass": "gptq", "config": {"bits": 4, "group_size": 32}}],
    "lowrank 0.8": [{"pass": "lowrank", "config": {"ratio": 0.8, "whiten": False}}],
    "slice 25 %": [{"pass": "slicegpt", "config": {"sparsity": 0.25}}],
    "slice 25 % → gptq W4": [{"pass": "slicegpt", "config": {"sparsity": 0.25}},
                             {"pass": "gptq", "config": {"bits": 4, "group_size": 16}}],
}


@pytest.fixture(scope="module")
def untied_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama(tmp_path_factory.mktemp("untied") / "llama", tie=False)


def _planned(raw: dict, model: Path) -> tuple[list[int], int]:
    reader = CheckpointReader(model)
    est = stage_estimates(parse_recipe(raw), reader, get_adapter(reader.config))
    return [e.bytes for e in est], max(e.peak.peak for e in est)


@pytest.mark.parametrize("case", CASES)
def test_planned_bytes_and_peak_rss_match_a_real_run(case: str, tiny_llama: Path, tmp_path: Path) -> None:
    """One fresh ``compress run`` process per case: its output's bytes and its VmHWM."""
    raw = {"calibration": CAL, "stages": CASES[case]}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    planned, peak = _planned(raw, tiny_llama)
    out = tmp_path / "o"
    real = measured(compress_cmd("run", str(recipe), str(tiny_llama), "-o", str(out)),
                    env={"COMPRESS_CACHE": str(tmp_path / "cache")})
    real_bytes = CheckpointReader(out).total_bytes()
    assert abs(planned[-1] - real_bytes) <= 0.05 * real_bytes, (planned, real_bytes)
    assert abs(peak - real["peak_rss_bytes"]) <= 0.25 * real["peak_rss_bytes"], (peak, real)
    if len(planned) > 1:  # the intermediate stage: the estimate the one-stage slice case checks
        assert planned[0] == _planned({"calibration": CAL, "stages": CASES[case][:1]}, tiny_llama)[0][0]


@pytest.mark.parametrize("case", [c for c in CASES if "slice" in c])
def test_planned_bytes_of_an_untied_head(case: str, untied_llama: Path, tmp_path: Path) -> None:
    """The head only changes shape under slicing: the untied cases check its bytes."""
    recipe = parse_recipe({"calibration": CAL, "stages": CASES[case]})
    reader = CheckpointReader(untied_llama)
    planned = stage_bytes(recipe, reader, get_adapter(reader.config))
    real = CheckpointReader(run_recipe(recipe, untied_llama, tmp_path / "o")).total_bytes()
    assert abs(planned[-1] - real) <= 0.05 * real, (planned, real)


def test_peak_terms_scale_with_the_calibration(tiny_llama: Path) -> None:
    """More windows mean more resident activations; a data-free stage has no calibration terms."""
    reader = CheckpointReader(tiny_llama)
    adapter = get_adapter(reader.config)

    def peak(cal: dict, stages: list) -> dict[str, int]:
        est = stage_estimates(parse_recipe({"calibration": cal, "stages": stages}), reader, adapter)
        return est[0].peak.phases["blocks"]

    small = peak({"protocol": "brown-512-smoke"}, CASES["gptq W4"])
    large = peak({"protocol": "brown-512"}, CASES["gptq W4"])
    assert large.get("calibration activations", 0) == 8 * small.get("calibration activations", 0) > 0
    rtn = peak({"protocol": "brown-512"}, [{"pass": "rtn", "config": {"bits": 4, "group_size": 32}}])
    assert not any("calibration" in k for k in rtn)
