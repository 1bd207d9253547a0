"""``compress inspect`` and ``compress plan``: what a checkpoint holds and what a recipe will do."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rich.console import Group
from rich.table import Table

from compress.arch import Adapter, get_adapter
from compress.assets import resolve_model
from compress.checkpoint import CheckpointReader
from compress.model import reader_manifest
from compress.recipe import Recipe
from compress.registry import get_pass
from compress.runner import make_protocol

RUNTIME_BYTES = 450 * 1024**2  # torch + transformers imported, measured on CPU (order of magnitude)


def _tensor_bytes(reader: CheckpointReader, key: str) -> int:
    return reader.nbytes(key)


def describe(model: str) -> Table:
    """A table of architecture, size and manifest facts."""
    reader = CheckpointReader(resolve_model(model))
    cfg = reader.config
    adapter = get_adapter(cfg)
    manifest = reader_manifest(reader)
    t = Table(title=f"{reader.path}")
    t.add_column("field")
    t.add_column("value")
    params = sum(reader.numel(k) for k in reader.keys())
    kinds = Counter(e.get("kind") for e in manifest.get("modules", {}).values())
    rows = [("model_type", str(cfg.get("model_type"))), ("adapter", adapter.name),
            ("blocks", str(cfg.get("num_hidden_layers"))), ("hidden size", str(cfg.get("hidden_size"))),
            ("stored tensors", str(len(reader.keys()))), ("stored elements", f"{params:,}"),
            ("bytes on disk", f"{reader.total_bytes():,}"),
            ("shards", str(len(reader.files()))),
            ("compressed modules", ", ".join(f"{k}: {v}" for k, v in kinds.items()) or "none"),
            ("transforms", ", ".join(x["kind"] for x in manifest.get("transforms", [])) or "none")]
    if "tool" in manifest:
        rows += [("made by", f"compress {manifest['tool']['version']} ({manifest['tool'].get('git_sha')})"),
                 ("stages", " → ".join(h["pass"] for h in manifest.get("history", []))),
                 ("calibration", str((manifest.get("calibration") or {}).get("protocol")))]
    export = manifest.get("export")
    if export is not None:
        rows.append(("loads in", "compress.load and transformers + compressed-tensors"
                     if export.get("compressed_tensors") else f"compress.load only ({export.get('reason')})"))
    for r in rows:
        t.add_row(*r)
    return t


def _linear_shapes(reader: CheckpointReader, adapter: Adapter) -> dict[str, tuple[int, int]]:
    out = {}
    for key in reader.keys():
        if key.endswith(".weight") and key.startswith(adapter.layers + "."):
            rel = key.split(".", len(adapter.layers.split(".")) + 1)[-1].removesuffix(".weight")
            if rel in adapter.linears and len(reader.shape(key)) == 2:
                out[key.removesuffix(".weight")] = reader.shape(key)
    return out


def plan_recipe(recipe: Recipe, model: str) -> Group:
    """Validate ``recipe`` against ``model`` and estimate output size and peak memory."""
    reader = CheckpointReader(resolve_model(model))
    adapter = get_adapter(reader.config)
    stages = Table(title=f"plan: {recipe.name or 'recipe'} on {Path(reader.path).name}")
    for col in ("#", "pass", "calibration", "config (non-default)"):
        stages.add_column(col)
    shapes = _linear_shapes(reader, adapter)
    sizes = {n: _tensor_bytes(reader, n + ".weight") for n in shapes}
    for i, st in enumerate(recipe.stages):
        spec = get_pass(st.pass_name)
        the_pass = spec.pass_cls(st.config)
        the_pass.resolve([(n[len(adapter.layers) + 1:].split(".", 1)[1], o, k) for n, (o, k) in shapes.items()])
        stages.add_row(str(i), spec.name, "yes" if spec.calibrates(st.config) else "no",
                       str(st.config.model_dump(exclude_defaults=True)))
        for name, (o, k) in shapes.items():
            rel = name[len(adapter.layers) + 1:].split(".", 1)[1]
            est = the_pass.estimate_bytes(o, k, rel)
            if est is not None:
                sizes[name] = est
    total_in = reader.total_bytes()
    linear_in = sum(_tensor_bytes(reader, n + ".weight") for n in shapes)
    total_out = total_in - linear_in + sum(sizes.values())
    mem = _peak_memory(reader, adapter, recipe)
    est = Table(title="estimates")
    est.add_column("quantity")
    est.add_column("bytes", justify="right")
    for k, v in [("input on disk", total_in), ("output on disk (estimate)", total_out), *mem.items()]:
        est.add_row(k, f"{v:,}")
    return Group(stages, est)


def _peak_memory(reader: CheckpointReader, adapter: Adapter, recipe: Recipe) -> dict[str, int]:
    cfg = reader.config
    block = max((sum(_tensor_bytes(reader, k) for k in reader.keys()
                     if k.startswith(adapter.layer_prefix(i)))
                 for i in range(int(cfg.get("num_hidden_layers", 0)))), default=0)
    emb = sum(_tensor_bytes(reader, k) for k in reader.keys()
              if k.startswith(tuple(e + "." for e in adapter.embeddings)))
    calib = any(get_pass(s.pass_name).calibrates(s.config) for s in recipe.stages)
    proto = make_protocol(recipe.calibration)
    hidden = int(cfg.get("hidden_size", 0))
    inter = int(cfg.get("intermediate_size", hidden))
    acts = proto.n_calib * proto.seq_len * hidden * 4 if calib else 0
    hess = (3 * hidden * hidden + inter * inter) * 8 if calib else 0
    out = {"largest block": block, "embeddings": emb, "calibration activations": acts,
           "Gram matrices (float64)": hess, "runtime (torch + transformers)": RUNTIME_BYTES}
    out["peak memory (estimate)"] = sum(out.values())
    return out
