"""The ``pruned`` and ``lut`` kinds through the real pipeline (``tests/pipeline/prune_lut_pass.py``):
the reloaded checkpoint computes what the entries say (a physically shrunk block equals the
block with those channels and heads zeroed; a LUT linear equals its decoded weight), every
module validates, sizes are the kinds' accounting, and bad entries are refused in one line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import compress
from compress.checkpoint import CheckpointReader
from compress.errors import CompressError
from compress.modules.kinds import entry_bytes, parse_entry
from compress.recipe import parse_recipe
from compress.runner import run_recipe
from tests.pipeline import prune_lut_pass


@pytest.fixture(scope="module")
def out(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from compress.registry import PASSES

    prune_lut_pass.register()
    recipe = parse_recipe({"stages": [{"pass": "test-prune-lut", "config": {}}]})
    yield run_recipe(recipe, tiny_llama, tmp_path_factory.mktemp("prune") / "out")
    PASSES.pop("test-prune-lut", None)


def test_the_reloaded_model_equals_the_masked_and_decoded_reference(out: Path, tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    prune_lut_pass.apply_reference(ref)
    model = compress.load(out)
    ids = torch.randint(0, 400, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (a - b).abs().max()
    q = model.model.layers[prune_lut_pass.PRUNED_BLOCK].self_attn.q_proj
    assert type(q).__name__ == "PrunedLinear" and tuple(q.weight.shape) == (32, 64)


def test_entries_and_sizes_are_the_kinds_accounting(out: Path) -> None:
    modules = json.loads((out / "compression.json").read_text())["modules"]
    kinds = {n: e["kind"] for n, e in modules.items()}
    assert sorted(set(kinds.values())) == ["lut", "pruned"]
    assert sum(k == "pruned" for k in kinds.values()) == 7 and sum(k == "lut" for k in kinds.values()) == 2
    reader = CheckpointReader(out)
    for name, raw in modules.items():
        stored = sum(reader.nbytes(k) for k in reader.keys() if k.startswith(name + "."))
        assert entry_bytes(parse_entry(name, raw)) == stored, name
    down = modules["model.layers.1.mlp.down_proj"]
    assert (down["in_features"], down["kept_in"], down["out_features"], down["kept_out"]) == (96, 64, 64, 64)


def test_validate_checks_the_pruned_and_lut_modules(out: Path) -> None:
    from compress.validate import validate

    rep = validate(out, ms=[1, 7], dtypes=["fp32"])
    assert rep.ok and not rep.unvalidated and len(rep.checks) == 9 * 2
    assert {c.path for c in rep.checks} >= {"dense (pruned)", "torch twin · planes · lut"}


@pytest.mark.parametrize(("entry", "message"), [
    ({"kind": "pruned", "in_features": 8, "out_features": 8, "kept_in": 9, "kept_out": 8}, "exceeds the dense"),
    ({"kind": "lut", "in_features": 8, "out_features": 8, "bits": 5, "group_size": 8}, "bits 5"),
    ({"kind": "lut", "in_features": 8, "out_features": 8, "bits": 4, "group_size": 8, "levels": 3}, "levels"),
])
def test_bad_entries_are_refused_in_one_line(entry: dict, message: str) -> None:
    with pytest.raises(CompressError, match=message) as e:
        parse_entry("model.layers.0.mlp.down_proj", entry)
    assert "\n" not in str(e.value)
