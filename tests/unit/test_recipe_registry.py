"""Recipe schema (extra='forbid', ranges named in one line) and the pass registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from compress.errors import CompressError
from compress.recipe import load_recipe, parse_recipe
from compress.registry import all_passes, get_pass


def _r(**stage_cfg: object) -> dict:
    return {"stages": [{"pass": "gptq", "config": stage_cfg}]}


def test_valid_recipe_round_trips_through_yaml(tmp_path: Path) -> None:
    rec = parse_recipe(_r(bits=3, group_size=64, act_order=True))
    p = tmp_path / "r.yaml"
    p.write_text(rec.to_yaml())
    again = load_recipe(p)
    assert again == rec
    assert yaml.safe_load(rec.to_yaml())["stages"][0]["config"]["bits"] == 3


@pytest.mark.parametrize("data,needle", [
    (_r(bitz=4), "bitz"),
    (_r(bits="four"), "bits"),
    (_r(bits=5), "bits"),
    (_r(group_size=3), "group_size"),
    (_r(damp=-1), "damp"),
    ({"stages": [{"pass": "nope", "config": {}}]}, "unknown pass"),
    ({"stages": []}, "stages"),
    ({"stages": [{"pass": "rtn"}], "extra": 1}, "extra"),
    ({"calibration": {"protocol": "wiki"}, "stages": [{"pass": "rtn"}]}, "protocol"),
])
def test_invalid_recipes_name_the_key(data: dict, needle: str) -> None:
    with pytest.raises(CompressError) as e:
        parse_recipe(data)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_group_size_null_means_per_channel() -> None:
    for v in (None, 0, -1):
        assert parse_recipe(_r(group_size=v)).stages[0].config.group_size is None


def test_bad_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(CompressError, match="does not exist"):
        load_recipe(tmp_path / "none.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("stages: [unclosed")
    with pytest.raises(CompressError, match="YAML"):
        load_recipe(p)
    p.write_text("- 1\n- 2\n")
    with pytest.raises(CompressError, match="mapping"):
        load_recipe(p)


def test_registry_lists_builtin_passes() -> None:
    passes = all_passes()
    assert {"rtn", "gptq"} <= set(passes)
    gptq, rtn = get_pass("gptq"), get_pass("rtn")
    assert gptq.calibrates(gptq.config_cls()) and not rtn.calibrates(rtn.config_cls())
    with pytest.raises(CompressError, match="unknown pass"):
        get_pass("zzz")


def test_every_shipped_recipe_validates() -> None:
    root = Path(__file__).resolve().parents[2] / "recipes"
    files = sorted(root.rglob("*.yaml"))
    assert files, "recipes/ holds worked examples"
    for f in files:
        load_recipe(f)
