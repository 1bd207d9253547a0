"""The public library API: ``load`` and ``run``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.arch import get_adapter, trusting_remote_code
from compress.assets import resolve_model
from compress.checkpoint import CheckpointReader
from compress.errors import CompressError
from compress.model import build_skeleton, materialize, reader_manifest, tie_head
from compress.recipe import Recipe, load_recipe, parse_recipe


def load(path: str | Path, *, device: str | torch.device | None = None,
         device_map: str | Mapping[str, int | str | torch.device] | None = None,
         max_memory: Mapping[int | str, int | str] | None = None, offload_folder: str | Path | None = None,
         flashsvd: bool = False, trust_remote_code: bool = False) -> nn.Module:
    """Rebuild any compress output (any chain of passes) or plain checkpoint as a model.

    Compressed modules are swapped for their runtime modules (QuantLinear, ...), which serve
    through the shared kernels. The manifest is attached as ``model.compress_manifest``.
    ``flashsvd=True`` switches every block whose linears are all low-rank to the fused FlashSVD
    forward (:func:`compress.modules.flashsvd.enable_flashsvd`).

    ``device`` (default CPU) puts the whole model on one device. ``device_map`` instead places it
    across GPUs, host memory and disk with ``accelerate`` (:mod:`compress.placement`): a strategy
    (``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``; bounded per device by
    ``max_memory``, e.g. ``{0: "20GiB", "cpu": "64GiB"}``) or a dict module name → ``0`` /
    ``"cuda:N"`` / ``"cpu"`` / ``"disk"``. Disk entries are written into a fresh folder inside
    ``offload_folder`` (default: the system temporary directory) that lives as long as the model.
    The map is ``model.hf_device_map``; give inputs to :func:`compress.placement.input_device`.
    ``trust_remote_code`` lets a checkpoint whose model only its own code defines (``auto_map``) run
    that code; off by default (such a checkpoint is refused in one line).

    Example:
        >>> model = compress.load("out/smollm2-w4")
        >>> model(input_ids).logits
        >>> big = compress.load("out/big-w4", device_map="auto", max_memory={0: "20GiB", "cpu": "64GiB"})
    """
    if device is not None and device_map is not None:
        raise CompressError(f"both device={str(device)!r} and device_map={device_map!r} were given",
                            "pass one: device for a single device, device_map to spread the model")
    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise CompressError("max_memory and offload_folder apply with a device_map only",
                            "pass device_map='auto' as well, or drop them")
    with trusting_remote_code(trust_remote_code):  # a checkpoint's own code runs only if asked
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
    if device_map is not None:
        from compress.placement import place

        return place(model, device_map, max_memory=max_memory, offload_folder=offload_folder)
    model = model.to(device or "cpu").eval()
    prepare_native(model)
    return model


def prepare_native(model: nn.Module) -> int:
    """Convert every quantised linear that torch's native CPU ops serve to their layout now, at
    load, so no forward pays for it (cached on the module, never stored); sibling linears that
    read one input share one stacked layout and one call. Returns how many linears."""
    from compress._memory import trim
    from compress.kernels.native_cpu import enabled
    from compress.modules.native_siblings import fuse_siblings
    from compress.modules.quant_linear import QuantLinear

    adapter = getattr(model, "compress_adapter", None)
    if adapter is not None and enabled(torch.zeros(1)):
        fuse_siblings(model, adapter)  # q/k/v and gate/up: one native call each (before the per-module layouts)
    done = 0
    for m in model.modules():
        if isinstance(m, QuantLinear) and not m.weight_packed.is_meta:
            probe = torch.zeros(1, 1, device=m.weight_packed.device)  # the layout depends on the mode only
            done += m._native(probe) is not None
    trim()  # the conversions' temporaries (~0.5 GB on SmolLM2 W4) go back to the OS, not to the heap
    return done


def run(recipe: str | Path | dict[str, Any] | Recipe, model: str | Path, out: str | Path, *,
        overwrite: bool = False, force: bool = False, gates: bool = True, cache: bool = True,
        resume: bool = False, device: str | torch.device = "auto", activations: str = "auto",
        trust_remote_code: bool = False) -> Path:
    """Apply a recipe (path to YAML, dict or :class:`Recipe`) to ``model``; returns ``out``.

    ``overwrite`` replaces an existing compress output; ``force`` replaces any directory. When
    the recipe has quality gates (and ``gates``), the output is evaluated against ``model`` and
    :class:`compress.gates.GateFailure` is raised if it misses one (the output is kept).
    ``cache=False`` neither reads nor writes the work store of scan statistics; ``resume``
    continues a killed run of the same recipe, model and output from its last finished block.
    ``device`` (``auto``: CUDA when present, ``cpu``, ``cuda:N``) is where the blocks compute;
    ``activations`` (``auto``, ``device``, ``host``) where the calibration activations live
    (``auto``: on the device when they fit); ``trust_remote_code`` as in :func:`load`."""
    from compress.distributed import world
    from compress.gates import GateFailure, check_gates
    from compress.runner import run_recipe

    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe)
    elif isinstance(recipe, dict):
        recipe = parse_recipe(recipe)
    src = resolve_model(str(model))
    with trusting_remote_code(trust_remote_code):
        path = run_recipe(recipe, src, Path(out), overwrite=overwrite, force=force, cache=cache, resume=resume,
                          device=device, activations=activations)  # type: ignore[arg-type]
    if gates and recipe.gates is not None and world().main:  # data parallel: process 0 checks
        report = check_gates(recipe.gates, path, src)
        if not report.passed:
            raise GateFailure(report, path)
    return path
