"""The public library API: ``load`` and ``run``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.arch import get_adapter
from compress.assets import resolve_model
from compress.checkpoint import CheckpointReader
from compress.errors import CompressError
from compress.model import build_skeleton, materialize, reader_manifest, tie_head
from compress.recipe import Recipe, load_recipe, parse_recipe


def load(path: str | Path, *, device: str | torch.device = "cpu", flashsvd: bool = False) -> nn.Module:
    """Rebuild any compress output (any chain of passes) or plain checkpoint as a model.

    Compressed modules are swapped for their runtime modules (QuantLinear, ...), which serve
    through the shared kernels. The manifest is attached as ``model.compress_manifest``.
    ``flashsvd=True`` switches every block whose linears are all low-rank to the fused FlashSVD
    forward (:func:`compress.modules.flashsvd.enable_flashsvd`).

    Example:
        >>> model = compress.load("out/smollm2-w4")
        >>> model(input_ids).logits
    """
    reader = CheckpointReader(resolve_model(str(path)))
    adapter = get_adapter(reader.config)
    manifest = reader_manifest(reader)
    model = build_skeleton(reader, adapter, manifest)
    tie_head(model, adapter, reader)  # the head's absent key is then skipped as a duplicate
    materialize(model, "", reader)
    tie_head(model, adapter, reader)  # re-point the head at the now-real embedding
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise CompressError(f"{reader.path} lacks tensors for {left[:3]}",
                            "the checkpoint is incomplete or does not match config.json")
    model.compress_manifest = manifest  # type: ignore[assignment]
    model.compress_adapter = adapter  # type: ignore[assignment]
    if flashsvd:
        from compress.modules.flashsvd import enable_flashsvd

        enable_flashsvd(model)
    return model.to(device).eval()


def run(recipe: str | Path | dict[str, Any] | Recipe, model: str | Path, out: str | Path, *,
        overwrite: bool = False, force: bool = False, gates: bool = True, cache: bool = True,
        resume: bool = False) -> Path:
    """Apply a recipe (path to YAML, dict or :class:`Recipe`) to ``model``; returns ``out``.

    ``overwrite`` replaces an existing compress output; ``force`` replaces any directory. When
    the recipe has quality gates (and ``gates``), the output is evaluated against ``model`` and
    :class:`compress.gates.GateFailure` is raised if it misses one (the output is kept).
    ``cache=False`` neither reads nor writes the work store of scan statistics; ``resume``
    continues a killed run of the same recipe, model and output from its last finished block."""
    from compress.gates import GateFailure, check_gates
    from compress.runner import run_recipe

    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe)
    elif isinstance(recipe, dict):
        recipe = parse_recipe(recipe)
    src = resolve_model(str(model))
    path = run_recipe(recipe, src, Path(out), overwrite=overwrite, force=force, cache=cache, resume=resume)
    if gates and recipe.gates is not None:
        report = check_gates(recipe.gates, path, src)
        if not report.passed:
            raise GateFailure(report, path)
    return path
