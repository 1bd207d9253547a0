"""Representation kinds: manifest entry → runtime module (built on the meta device).

Every compressed module in ``compression.json`` has ``{"kind": ..., ...}``. Each kind registers
a builder that takes the original (dense, meta) module and the entry and returns the module
whose ``state_dict`` names match the tensors stored in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from compress.errors import CompressError

Builder = Callable[[nn.Module, dict], nn.Module]
MODULE_KINDS: dict[str, Builder] = {}


def register_kind(kind: str) -> Callable[[Builder], Builder]:
    """Decorator: register the builder of representation ``kind``."""

    def deco(fn: Builder) -> Builder:
        if kind in MODULE_KINDS:
            raise ValueError(f"module kind {kind!r} registered twice")
        MODULE_KINDS[kind] = fn
        return fn

    return deco


Transform = Callable[[nn.Module, dict, object], None]
MODEL_TRANSFORMS: dict[str, Transform] = {}


def register_transform(kind: str) -> Callable[[Transform], Transform]:
    """Decorator: register a model-level structural transform (e.g. sliced widths)."""

    def deco(fn: Transform) -> Transform:
        if kind in MODEL_TRANSFORMS:
            raise ValueError(f"model transform {kind!r} registered twice")
        MODEL_TRANSFORMS[kind] = fn
        return fn

    return deco


def build_module(original: nn.Module, entry: dict) -> nn.Module:
    kind = entry.get("kind")
    if kind not in MODULE_KINDS:
        raise CompressError(f"unknown module kind {kind!r} in compression.json",
                            "upgrade compress to a version that knows this representation")
    return MODULE_KINDS[kind](original, entry)


def original_dtype(original: nn.Module) -> torch.dtype:
    """The floating dtype a replacement module should take: the replaced module's weight dtype,
    float32 when it has no floating weight (e.g. a meta placeholder without one)."""
    w = getattr(original, "weight", None)
    return w.dtype if w is not None and w.is_floating_point() else torch.float32
