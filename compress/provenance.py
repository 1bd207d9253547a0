"""What every output carries about itself: provenance in ``compression.json``, a
``quantization_config`` in ``config.json`` that ``transformers`` + ``compressed-tensors`` read,
and the tokenizer / generation files copied from the input."""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from compress.arch import Adapter
from compress.modules.kinds import get_kind, parse_entry

if TYPE_CHECKING:
    from compress.checkpoint import CheckpointReader, CheckpointWriter
    from compress.pipeline.contexts import Calibration
    from compress.recipe import Recipe

FORMAT_VERSION = 3
"""2: 3-bit codes packed as one dense bit stream (compressed-tensors ≥ 0.19); 1: ten to a word."""
_NOT_COPIED = {"config.json", "compression.json", "recipe.yaml", "model.safetensors.index.json"}


def tool_version() -> str:
    from compress import __version__

    return __version__


def git_sha() -> str | None:
    """Commit of the compress checkout this code runs from, if it is a git checkout."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        res = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() or None


def provenance(reader: CheckpointReader, recipe: Recipe, stage: int, calib: Calibration | None,
               in_manifest: dict, seconds: float) -> dict:
    """The manifest header: tool, input, recipe, calibration and the chain of stages so far."""
    history = list(in_manifest.get("history", []))
    history.append({"stage": stage, "pass": recipe.stages[stage].pass_name,
                    "config": recipe.stages[stage].config.model_dump(mode="json"),
                    "seconds": round(seconds, 2)})
    return {
        "format_version": FORMAT_VERSION,
        "tool": {"name": "compress", "version": tool_version(), "git_sha": git_sha()},
        "input": {"path": str(reader.path.resolve()), "sha256": reader.content_hash(),
                  "bytes": reader.total_bytes()},
        "origin": in_manifest.get("origin") or str(reader.path.resolve()),
        "recipe": recipe.to_dict(),
        "calibration": None if calib is None else {
            "protocol": calib.protocol.name, "source": calib.source,
            "windows": list(calib.windows.shape), "fingerprint": calib.fingerprint},
        "history": history,
    }


def _scheme(entry: dict) -> tuple:
    """What a compressed-tensors config group holds: bits, group (None = channel), symmetry,
    act-order and observer (entries written before these were recorded read as off/minmax)."""
    per_channel = entry["group_size"] >= entry["in_features"]
    return (entry["bits"], None if per_channel else entry["group_size"], entry["symmetric"],
            bool(entry.get("act_order", False)), entry.get("observer", "minmax"))


def ecosystem_refusal(modules: dict[str, dict], transforms: list[dict]) -> str | None:
    """Why plain ``transformers`` + ``compressed-tensors`` could not load this output (None: it can)."""
    if transforms:
        kinds = sorted({t.get("kind", "?") for t in transforms})
        if kinds == ["flatquant-attention"]:
            return ("the attention quantises its keys and values behind a learned key transform "
                    "(flatquant-attention), which config.json cannot describe")
        return (f"the model's shapes were changed ({', '.join(kinds)}); transformers cannot rebuild them "
                "from config.json")
    reasons = sorted({r for n, e in modules.items()
                      if (r := get_kind(e.get("kind")).export_refusal(parse_entry(n, e))) is not None})
    if reasons:
        return "; ".join(reasons)
    modules = {n: e for n, e in modules.items() if e.get("kind") == "quant"}
    if not modules:
        return "nothing was quantised"
    asym = sorted(n for n, e in modules.items() if not e.get("symmetric", True))
    if asym:
        return (f"asymmetric zero points ({len(asym)} linear(s)): transformers 5 with compressed-tensors "
                "0.20 allocates them unpacked and refuses the packed tensors the format defines; "
                "quantise symmetrically for an output transformers loads")
    ragged = sorted(n for n, e in modules.items()
                    if e["in_features"] > e["group_size"] and e["in_features"] % e["group_size"])
    if ragged:
        e = modules[ragged[0]]
        return (f"group size {e['group_size']} leaves a ragged last group in {len(ragged)} linear(s) "
                f"(e.g. {ragged[0]}, {e['in_features']} inputs), which compressed-tensors cannot "
                "dequantize; choose a group size that divides every input width")
    return None


def export_quantization_config(config: dict, modules: dict[str, dict], transforms: list[dict],
                               adapter: Adapter) -> tuple[dict, dict]:
    """``config.json`` (with a compressed-tensors ``quantization_config`` when, and only when,
    plain ``transformers`` + ``compressed-tensors`` can load the output) and the ``export``
    record of ``compression.json`` saying which it is and why.

    The most common scheme targets ``Linear``; other schemes list their modules by name; every
    linear that stays dense (the head, anything ignored) goes into ``ignore``.
    """
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    refusal = ecosystem_refusal(modules, transforms)
    export = {"compressed_tensors": refusal is None, "reason": refusal}
    if refusal is not None:
        return config, export
    quant = {n: e for n, e in modules.items() if e.get("kind") == "quant"}
    counts = Counter(_scheme(e) for e in quant.values())
    default = counts.most_common(1)[0][0]
    groups: dict[str, dict] = {}
    for i, scheme in enumerate(sorted(counts, key=lambda s: (s != default, str(s)))):
        names = sorted(n for n, e in quant.items() if _scheme(e) == scheme)
        groups[f"group_{i}"] = {"targets": ["Linear"] if scheme == default else names,
                                "weights": _weights_args(*scheme),
                                "input_activations": None, "output_activations": None}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "quantization_status": "compressed", "config_groups": groups,
        "ignore": _dense_linears(config, quant, adapter), "kv_cache_scheme": None,
    }
    return config, export


def _weights_args(bits: int, group_size: int | None, symmetric: bool, act_order: bool,
                  observer: str) -> dict:
    """compressed-tensors ``QuantizationArgs`` of what was done: act-order with static groups is
    its ``weight`` ordering (no ``g_idx``); the observer names how grids were chosen."""
    return {"num_bits": bits, "type": "int", "symmetric": symmetric,
            "strategy": "channel" if group_size is None else "group",
            "group_size": group_size, "block_structure": None, "dynamic": False,
            "actorder": "weight" if act_order else None, "observer": observer, "observer_kwargs": {}}


def _dense_linears(config: dict, quant: dict[str, dict], adapter: Adapter) -> list[str]:
    """Linears of the architecture that were not quantised (so the loader leaves them dense)."""
    n_layers = int(config.get("num_hidden_layers", 0))
    names = [f"{adapter.layer_prefix(i)}{rel}" for i in range(n_layers) for rel in adapter.linears]
    dense = [n for n in names if n not in quant]
    if adapter.head is not None and adapter.head not in quant:
        dense.append(adapter.head)
    return dense


def side_files(src: Path, writer: CheckpointWriter) -> None:
    """Copy tokenizer, generation config and other small files (never weights or pickles)."""
    for p in sorted(src.iterdir()):
        if p.name in _NOT_COPIED or p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf"):
            continue
        if p.name in ("reports",) or p.name.startswith("."):
            continue
        if p.is_file():
            writer.copy_file(p)
        elif p.is_dir():
            shutil.copytree(p, writer.directory / p.name)
