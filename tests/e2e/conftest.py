"""End-to-end tests on the real SmolLM2-135M (converted once into the asset cache)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CI_GPTQ = ROOT / "recipes" / "ci" / "gptq-w4g64-smoke.yaml"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    from compress.assets import materialize

    return materialize("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_w4_gated(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """The CI recipe (GPTQ W4 g64 act-order, brown-512-smoke) run once, and its gate check (the
    evaluation ``compress.run`` makes), shared by every e2e test of the int4 model."""
    from compress.gates import check_gates
    from compress.recipe import load_recipe
    from compress.runner import run_recipe

    recipe = load_recipe(CI_GPTQ)
    out = run_recipe(recipe, smollm2, tmp_path_factory.mktemp("e2e") / "w4")
    assert recipe.gates is not None
    return out, check_gates(recipe.gates, out, smollm2)


@pytest.fixture(scope="session")
def smollm2_w4(smollm2_w4_gated: tuple[Path, object]) -> Path:
    return smollm2_w4_gated[0]
