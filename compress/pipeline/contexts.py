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
from compress.device import ActivationMode
from compress.modules.kinds import SharedTensors, attach_shared, model_shared, parse_entry
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
    #: the manifest's ``shared`` groups (the input's, then those this stage adds)
    shared: dict[str, dict] = field(default_factory=dict)
    #: groups added by this stage (saved by a resume commit)
    new_shared: list[str] = field(default_factory=list)
    #: where blocks are computed (``--device``); activations: where the calibration activations
    #: live (``auto``: on the device when they fit, see :func:`compress.device.offload_activations`)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    activations: ActivationMode = "auto"
    #: the stage's calibration windows (a plan step that scores the whole model reads them)
    calibration: Calibration | None = None

    def add_shared(self, group: str, tensors: dict[str, torch.Tensor]) -> SharedTensors:
        """Store ``tensors`` once as shared group ``group`` (``compress_shared.group.*`` in the
        output); modules built with the returned holder read them (e.g. ``SharedBasisLinear``)."""
        if group in self.shared:
            raise ValueError(f"shared group {group!r} exists already")
        holder = model_shared(self.model)
        if holder is None:
            holder = SharedTensors()
            attach_shared(self.model, holder)
        holder.add_group(group, {k: v.detach().contiguous() for k, v in tensors.items()})
        self.shared[group] = holder.spec(group).model_dump()
        self.new_shared.append(group)
        return holder

    def shared_section(self) -> dict[str, dict]:
        """The ``shared`` section of the output's manifest: each group with the modules reading it."""
        users: dict[str, list[str]] = {g: [] for g in self.shared}
        for name, entry in self.modules.items():
            for g in parse_entry(name, entry).shared_refs():
                users.setdefault(g, []).append(name)
        return {g: dict(spec, users=sorted(users.get(g, []))) for g, spec in self.shared.items()}


@dataclass
class Calibration:
    """Token windows for one stage plus their provenance."""

    windows: torch.Tensor
    protocol: Protocol
    fingerprint: str
    source: str
