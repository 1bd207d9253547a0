"""What every pass has: a typed config and three hooks the layer-streaming runner calls.

``begin`` runs once after the embeddings are loaded (and the calibration activations of
block 0 captured); ``process_layer`` once per block; ``finish`` once after the last block with
the final norm and head loaded. A pass changes modules in place; the runner writes them.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from compress.calib.pipeline import LayerContext
    from compress.pipeline.contexts import RunContext
    from compress.report import LayerRecord


class PassConfig(BaseModel):
    """Base of every pass config: unknown keys are errors; values are validated ranges.

    Args:
        targets: regexes over block-relative linear names (``self_attn.q_proj``) to compress;
            empty means every linear of the block.
        ignore: regexes of linears to leave dense (wins over ``targets``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    version: int = Field(1, ge=1, le=1, description="config schema version")
    targets: list[str] = Field(default_factory=list, description=(
        "regex over block-relative linear names (self_attn.q_proj) to compress"))
    ignore: list[str] = Field(default_factory=list, description="regex of linears to leave dense (wins over --target)")

    def selects(self, rel_name: str) -> bool:
        if any(re.search(p, rel_name) for p in self.ignore):
            return False
        return not self.targets or any(re.search(p, rel_name) for p in self.targets)


class Pass(ABC):
    """Base class; subclasses are registered with :func:`compress.registry.register_pass`."""

    name: ClassVar[str] = ""
    #: the embeddings stay loaded until ``finish`` (e.g. a pass that rewrites a tied head)
    needs_embeddings_at_finish: ClassVar[bool] = True
    #: the last block's outputs are used after the loop (otherwise its propagation is skipped)
    uses_final_hidden: ClassVar[bool] = True

    def __init__(self, config: PassConfig) -> None:
        self.config = config

    def resolve(self, linears: list[tuple[str, int, int]]) -> None:
        """Called once, before any work (by the runner and by ``plan``), with every block linear
        as (block-relative name, out_features, in_features): a pass fixes options that depend on
        the model's shapes here (e.g. ``group_size: auto``)."""

    def begin(self, run: RunContext) -> None:
        """Called once, before block 0 (embeddings materialised)."""

    @abstractmethod
    def process_layer(self, ctx: LayerContext, run: RunContext) -> list[LayerRecord]:
        """Compress one block in place and return its per-module records."""

    def estimate_bytes(self, out_features: int, in_features: int, rel_name: str) -> int | None:
        """Stored bytes of one block linear after this pass (None: unchanged). For `plan`."""
        return None

    def finish(self, run: RunContext) -> None:
        """Called once, after the last block (final norm and head materialised)."""

    def describe(self) -> str:
        """One line for `compress plan`."""
        return f"{self.name}: {self.config.model_dump(exclude_defaults=True)}"

    def scheme(self) -> str:
        """What this pass does, in a few words, for report titles (``rtn W4 g64 sym``): here the
        pass name and its non-default options; passes override it with their own notation.
        Call it after :meth:`resolve` so shape-dependent options show their resolved value."""
        options = self.config.model_dump(exclude_defaults=True)
        return " ".join([self.name, *(f"{k}={v}" for k, v in options.items())])


def read_data_file(path: str | Path, what: str) -> object:
    """The parsed contents of a JSON (``.json``) or YAML file that a pass option points to.

    Raises ValueError (which the config validators turn into a one-line error) when the file is
    missing or does not parse; the caller checks the structure.
    """
    import json

    import yaml

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what} file {p} does not exist")
    try:
        return json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{what} file {p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'} "
                         f"({type(e).__name__})") from None
