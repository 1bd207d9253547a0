"""What a pass sees while a stage runs: the whole-model run state and one stage's calibration.

These live beside the pass API (:mod:`compress.pipeline.pass_api`), not in the runner, so that
passes, the runner and provenance all import them from here and none imports another.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from pydantic import BaseModel
from torch import nn

from compress.arch import Adapter
from compress.calib.pipeline import CalibState
from compress.calib.protocol import Protocol
from compress.checkpoint import CheckpointReader
from compress.report import LayerRecord


@dataclass
class RunContext:
    """Whole-model state a pass can read and change during one stage."""

    reader: CheckpointReader
    adapter: Adapter
    model: nn.Module
    config: dict
    state: CalibState | None
    modules: dict[str, dict]
    transforms: list[dict]
    records: list[LayerRecord] = field(default_factory=list)
    notes: dict = field(default_factory=dict)
    tied_head: bool = False
    #: the pass's global plan, when it declares a plan step
    plan: BaseModel | None = None


@dataclass
class Calibration:
    """Token windows for one stage plus their provenance."""

    windows: torch.Tensor
    protocol: Protocol
    fingerprint: str
    source: str
