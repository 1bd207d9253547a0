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
from compress.pipeline.pass_api import PassConfig


class CalibrationConfig(BaseModel):
    """Which data calibrates data-driven passes.

    Args:
        protocol: a named protocol (``brown-512`` by default).
        data: ``brown`` or a path to a text / JSONL file.
        batch_size: windows per forward through a block.
        n_samples / seq_len: override the protocol's window count / length (renames it).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    protocol: str = Field("brown-512", description="named calibration protocol (`compress list --protocols`)")
    data: str | None = Field(None, description="calibration text or JSONL file; the protocol is renamed after it "
                                               "(other.txt → other-512)")
    batch_size: int = Field(8, ge=1, le=4096, description="calibration windows per forward through a block")
    n_samples: int | None = Field(None, ge=1, le=100000, description="calibration windows, overriding the "
                                                                     "protocol's (brown-512 → brown-512-c32)")
    seq_len: int | None = Field(None, ge=8, le=131072, description="tokens per calibration window, overriding "
                                                                   "the protocol's (→ brown-512-s256)")

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

    @property
    def calibrates(self) -> bool:
        """Whether any stage reads calibration data (a data-free recipe records none)."""
        from compress.registry import get_pass

        return any(get_pass(s.pass_name).calibrates(s.config) for s in self.stages)

    def to_dict(self) -> dict:
        """Plain data (``pass`` keys, full configs) for YAML/JSON; a data-free recipe has no
        ``calibration`` section (it would name a protocol that nothing used)."""
        d = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        if not self.calibrates:
            d.pop("calibration", None)
        for st, stage in zip(d["stages"], self.stages, strict=True):
            st["config"] = stage.config.model_dump(mode="json")
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def parse_recipe(data: Any, source: str = "recipe", node: yaml.Node | None = None) -> Recipe:
    """Validate recipe data; the first error becomes a one-line :class:`CompressError` that names
    the key (``stages[0].config.bits``) and, when ``node`` (the composed YAML) is given, its line."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = _config_loc(tuple(err["loc"]))
        msg = str(err["msg"]).removeprefix("Value error, ")
        line = _line_of(node, loc) if node is not None else None
        where = f"{source}:{line}" if line is not None else source
        value = err.get("input")
        got = f" (got {value!r})" if isinstance(value, (int, float, str)) and not isinstance(value, bool) else ""
        raise CompressError(f"{where}: {_key_name(loc) or '(top level)'}: {msg}{got}",
                            "fix the recipe (passes and their options: `compress list`, `compress PASS -h`)") from None


def _config_loc(loc: tuple) -> tuple:
    """A stage config's errors arrive as ``stages.0.bits`` (the config is validated inside the
    stage validator): put the ``config`` key back so the location matches the YAML."""
    if len(loc) > 2 and loc[0] == "stages" and loc[2] not in ("pass", "config"):
        return (*loc[:2], "config", *loc[2:])
    return loc


def _key_name(loc: tuple) -> str:
    """``("stages", 0, "config", "bits")`` → ``stages[0].config.bits``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line_of(node: yaml.Node, loc: tuple) -> int | None:
    """1-based line of the deepest YAML node on the path ``loc`` (the key itself when present)."""
    line = node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            hit = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if hit is None:
                break
            line, node = hit[0].start_mark.line + 1, hit[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe; every error names the file, the line and the key."""
    p = Path(path)
    if not p.is_file():
        raise CompressError(f"recipe {p} does not exist", "pass a YAML recipe file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CompressError(f"recipe {p} cannot be read ({type(e).__name__})", "pass a UTF-8 YAML file") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        problem = getattr(e, "problem", None) or type(e).__name__
        raise CompressError(f"recipe {where}: not valid YAML ({problem})", "fix the YAML syntax on that line") from None
    if not isinstance(data, dict) or node is None:
        raise CompressError(f"recipe {p} must be a mapping with 'stages'", "see recipes/ for examples")
    return parse_recipe(data, source=f"recipe {p}", node=node)
