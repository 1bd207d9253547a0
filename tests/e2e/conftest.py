"""End-to-end tests on the real SmolLM2-135M (converted once into the asset cache)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2() -> Path:
    from compress.assets import materialize

    return materialize("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_w4(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GPTQ W4 g64 (act-order) on the smoke protocol, shared by several e2e tests."""
    from compress.recipe import parse_recipe
    from compress.runner import run_recipe

    rec = parse_recipe({"calibration": {"protocol": "brown-512-smoke"},
                        "stages": [{"pass": "gptq", "config": {"bits": 4, "group_size": 64, "act_order": True}}]})
    return run_recipe(rec, smollm2, tmp_path_factory.mktemp("e2e") / "w4")
