"""What every pass has: a typed config, declared needs, and the hooks the runner calls.

A stage runs in up to three phases, scheduled from :meth:`Pass.needs`:

* **scan** (``needs.scan``): streamed and read-only, one *dense* block at a time with its
  calibration inputs; :meth:`Pass.scan_layer` returns the block's statistics (Gram matrices,
  spectra, per-column losses), which go into the work store under a key of (input checkpoint,
  calibration, :meth:`Pass.statistic`) and are reused by later runs. Activations propagate
  through the dense block.
* **plan** (``needs.plan``): once, after every block was scanned; :meth:`Pass.plan` sees all
  statistics and returns a typed plan (ranks, bits, ...) saved as ``plan.json`` in the output.
  Without a plan step the scan of block i runs just before block i is applied (one stream).
* **apply**: ``begin`` once after the embeddings are loaded, :meth:`Pass.process_layer` once per
  block (given its statistics in ``ctx.stats`` and the plan in ``run.plan``), ``finish`` once
  after the last block with the final norm and head loaded. A pass changes modules in place;
  the runner writes them. With ``needs.activations`` false the apply phase runs no calibration
  forward at all: when every block's statistics are already stored, no activation is computed.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

if TYPE_CHECKING:
    from compress.arch import Adapter
    from compress.calib.pipeline import LayerContext
    from compress.pipeline.contexts import RunContext
    from compress.pipeline.memory import MemoryShape
    from compress.pipeline.shapes import ShapePlan
    from compress.pipeline.stats import BlockStats
    from compress.report import LayerRecord


@dataclass(frozen=True)
class Needs:
    """What a pass needs from the runner (whether it calibrates is declared at registration).

    Args:
        scan: per-block statistics of the dense model (:meth:`Pass.statistic`, :meth:`Pass.scan_layer`).
        plan: a global step over every block's statistics before any block is applied.
        activations: the apply phase runs calibration data through the blocks (False: the
            scan statistics are all it reads, so cached statistics make a run data-free).
        gradients: the apply phase trains inside a block (autograd stays on); otherwise
            ``process_layer`` runs under ``torch.no_grad``.
    """

    scan: bool = False
    plan: bool = False
    activations: bool = True
    gradients: bool = False

    def __post_init__(self) -> None:
        if self.plan and not self.scan:
            raise ValueError("a plan step needs a scan (the plan reads the scan's statistics)")


@dataclass(frozen=True)
class Statistic:
    """Names a per-block statistic for the work store: ``name`` and ``version`` (bump it when
    the code computing the values changes) plus every option that changes the values."""

    name: str
    version: int
    options: dict = field(default_factory=dict)


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

    def rewrites_embeddings(self, run: RunContext) -> bool:
        """Whether ``finish`` replaces the token embedding (e.g. with one that reads a quantised
        tied head's codes): the embeddings then stay loaded and are written after ``finish``,
        not at the start."""
        return False

    def resolve(self, linears: list[tuple[str, int, int]]) -> None:
        """Called once, before any work (by the runner and by ``plan``), with every block linear
        as (block-relative name, out_features, in_features): a pass fixes options that depend on
        the model's shapes here (e.g. ``group_size: auto``)."""

    def check_input(self, adapter: Adapter, manifest: dict) -> None:
        """Refuse an input this pass cannot compress (its architecture, the representations and
        transforms its ``compression.json`` records) with a :class:`CompressError`, before any
        calibration work. Default: every input."""

    def needs(self) -> Needs:
        """What the runner must schedule for this pass with its config (default: apply only)."""
        return Needs()

    def statistic(self) -> Statistic | None:
        """The statistic :meth:`scan_layer` computes (required when ``needs().scan``)."""
        return None

    def scan_layer(self, ctx: LayerContext) -> dict[str, Tensor]:
        """Statistics of one dense block (read-only: the block must not be changed). The runner
        propagates the dense block's outputs afterwards unless this already did
        (``ctx.collect(..., propagate=True)`` feeds the statistics and the next block at once)."""
        raise NotImplementedError(f"{type(self).__name__} declares a scan but has no scan_layer")

    def plan(self, stats: BlockStats, run: RunContext) -> BaseModel:
        """The global plan from every block's statistics (``stats.block(i)``), when ``needs().plan``."""
        raise NotImplementedError(f"{type(self).__name__} declares a plan step but has no plan()")

    def carry_state(self) -> dict[str, object]:
        """What this pass carries from one block to the next (e.g. SliceGPT's rotation), saved
        after every block so that ``--resume`` restarts exactly: tensors (saved as safetensors)
        and JSON values."""
        return {}

    def restore_carry(self, state: dict[str, object]) -> None:
        """Restore :meth:`carry_state` (called on resume, after :meth:`begin`)."""

    def begin(self, run: RunContext) -> None:
        """Called once, before block 0 (embeddings materialised)."""

    @abstractmethod
    def process_layer(self, ctx: LayerContext, run: RunContext) -> list[LayerRecord]:
        """Compress one block in place and return its per-module records."""

    def estimate_bytes(self, out_features: int, in_features: int, rel_name: str) -> int | None:
        """Stored bytes of one block linear after this pass (None: unchanged). For `plan`."""
        return None

    def plan_shapes(self, plan: ShapePlan, adapter: Adapter) -> None:
        """Rewrite ``plan`` (what the previous stage leaves) into what this pass writes, for
        ``compress plan``: by default each selected, still dense block linear takes
        :meth:`estimate_bytes`. A pass that changes shapes overrides this."""
        from compress.pipeline.shapes import block_relative

        for name, (o, k) in plan.linears.items():
            if name in plan.compressed:
                continue
            est = self.estimate_bytes(o, k, block_relative(name, adapter))
            if est is not None:
                plan.linear_bytes[name] = est
                plan.compressed.add(name)

    def plan_memory(self, shape: MemoryShape) -> dict[str, int]:
        """Bytes this pass holds while it processes the largest block, beyond the block, one
        activation buffer and one batch's forward (which ``plan`` always counts): its statistics,
        solver or SVD workspace, extra activation buffers. Named terms, shown by ``compress plan``."""
        return {}

    def finish(self, run: RunContext) -> None:
        """Called once, after the last block (final norm and head materialised)."""

    def write_reports(self, run: RunContext, directory: Path) -> None:
        """Write this pass's own report files (figures of its plan) into ``directory`` (the
        output's ``reports/``; create it when writing), beside the per-layer report every pass gets."""

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
