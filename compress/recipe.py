"""Recipes: a versioned list of stages, each a registered pass with its typed config.

YAML in, the same YAML out (saved into every output as ``recipe.yaml``). Validation errors
name the key and the allowed values in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compress.calib.protocol import PROTOCOLS
from compress.errors import CompressError
from compress.passes.base import PassConfig


class CalibrationConfig(BaseModel):
    """Which data calibrates data-driven passes.

    Args:
        protocol: a named protocol (``brown-512`` by default).
        data: ``brown`` or a path to a text / JSONL file.
        batch_size: windows per forward through a block.
        n_samples / seq_len: override the protocol's window count / length (renames it).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    protocol: str = "brown-512"
    data: str | None = None
    batch_size: int = Field(8, ge=1, le=4096)
    n_samples: int | None = Field(None, ge=1, le=100000)
    seq_len: int | None = Field(None, ge=8, le=131072)

    @field_validator("protocol")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in PROTOCOLS:
            raise ValueError(f"unknown protocol {v!r}; known: {', '.join(PROTOCOLS)}")
        return v


class Stage(BaseModel):
    """One pass application: ``{pass: gptq, config: {bits: 4}}``."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    pass_name: str = Field(alias="pass")
    config: PassConfig

    @model_validator(mode="before")
    @classmethod
    def _typed_config(cls, data: Any) -> Any:
        from compress.registry import all_passes

        if not isinstance(data, dict):
            return data
        name = data.get("pass", data.get("pass_name"))
        passes = all_passes()
        if name not in passes:
            raise ValueError(f"unknown pass {name!r}; registered: {', '.join(sorted(passes))}")
        raw = data.get("config") or {}
        if isinstance(raw, PassConfig):
            return data
        return {**data, "config": passes[name].config_cls.model_validate(raw)}


class Gates(BaseModel):
    """Quality gates CI checks after running a recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    protocol: str = "brown-512-smoke"
    max_ppl_ratio: float | None = Field(None, gt=1.0)
    min_top1: float | None = Field(None, ge=0.0, le=1.0)
    max_kl: float | None = Field(None, gt=0.0)


class Recipe(BaseModel):
    """A whole compression job."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    version: Literal[1] = 1
    name: str | None = None
    seed: int = 0
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    stages: list[Stage] = Field(min_length=1)
    gates: Gates | None = None

    def to_dict(self) -> dict:
        """Plain data (``pass`` keys, full configs) for YAML/JSON."""
        d = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        for st, stage in zip(d["stages"], self.stages, strict=True):
            st["config"] = stage.config.model_dump(mode="json")
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate recipe data; the first error becomes a one-line :class:`CompressError`."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        raise CompressError(f"{source}: {loc}: {msg}", "fix the recipe (see `compress list`)") from None


def load_recipe(path: str | Path) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise CompressError(f"recipe {p} does not exist", "pass a YAML recipe file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise CompressError(f"recipe {p} is not valid YAML ({e.__class__.__name__})",
                            "fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise CompressError(f"recipe {p} must be a mapping with 'stages'", "see recipes/ for examples")
    return parse_recipe(data, source=str(p))
