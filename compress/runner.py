"""Run recipes: each stage streams the model block by block from its input checkpoint to an
output checkpoint (intermediate stages go to a temporary directory beside the output).

Memory stays at one block + the calibration activations + the embeddings, whatever the depth:
block i is loaded from the input shards, compressed by the pass, run forward to produce block
i+1's inputs, written to the output shard and freed.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from compress._memory import bound_allocator, trim
from compress.arch import Adapter, get_adapter
from compress.calib.corpus import load_corpus
from compress.calib.pipeline import LayerContext, capture_block_inputs
from compress.calib.protocol import (
    Protocol, calibration_windows, corpus_protocol_name, fingerprint, get_protocol, split_lines,
    tokenize_joined)
from compress.checkpoint import CheckpointReader, CheckpointWriter, prepare_output
from compress.errors import CompressError
from compress.model import (
    build_skeleton, get_module, materialize, reader_manifest, release, state_dict_of, tie_head)
from compress.pipeline.contexts import Calibration, RunContext
from compress.pipeline.pass_api import Pass
from compress.provenance import export_quantization_config, provenance, side_files
from compress.recipe import CalibrationConfig, Recipe
from compress.registry import get_pass
from compress.report import write_all

Progress = Callable[[int, int, str], None]


def make_protocol(cal: CalibrationConfig) -> Protocol:
    """The named protocol; a reduced or changed calibration gets its own name: an ``n_samples``
    override appends ``-c<N>`` (``brown-512-c32``), a ``seq_len`` override ``-s<L>``."""
    proto = get_protocol(cal.protocol)
    name, upd = proto.name, {}
    if cal.n_samples is not None and cal.n_samples != proto.n_calib:
        name, upd["n_calib"] = f"{name}-c{cal.n_samples}", cal.n_samples
    if cal.seq_len is not None and cal.seq_len != proto.seq_len:
        name, upd["seq_len"] = f"{name}-s{cal.seq_len}", cal.seq_len
    if upd:
        proto = proto.model_copy(update={**upd, "name": name})
    return proto


def load_calibration(src: Path, cal: CalibrationConfig, config: dict) -> Calibration:
    """Calibration windows of ``cal`` tokenised with the checkpoint's own tokenizer."""
    from transformers import AutoTokenizer

    proto = make_protocol(cal)
    named = corpus_protocol_name(proto.name, cal.data)  # other text: not a brown name
    if named != proto.name:
        proto = proto.model_copy(update={"name": named})
    ctx = config.get("max_position_embeddings")
    if ctx is not None and proto.seq_len > int(ctx):
        raise CompressError(f"seq_len {proto.seq_len} exceeds the model's context of {ctx} tokens",
                            f"use --seq-len ≤ {ctx}")
    lines, source = load_corpus(cal.data)
    calib_lines, _ = split_lines(lines, proto)
    if not calib_lines:
        raise CompressError("the corpus has no calibration lines", "use a longer corpus")
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise CompressError(f"{src} has no usable tokenizer ({type(e).__name__})",
                            "copy the tokenizer files into the checkpoint directory") from None
    windows = calibration_windows(tokenize_joined(tok, calib_lines), proto)
    return Calibration(windows, proto, fingerprint(windows, proto, source), source)


def run_recipe(recipe: Recipe, model: Path, out: Path, *, overwrite: bool = False, force: bool = False,
               progress: Progress | None = None) -> Path:
    """Apply every stage of ``recipe`` to ``model``; the last stage writes ``out`` atomically.

    Everything the user can get wrong is checked before any work: the input checkpoint, the
    output path (``force`` replaces a directory that is not a compress output) and, when a stage
    calibrates, the corpus (a missing or non-text file is refused here, not after stage 1)."""
    bound_allocator()
    model = Path(model)
    CheckpointReader(model)  # validate the input before any work
    out = prepare_output(out, [model], overwrite, force)
    if recipe.calibrates:
        load_corpus(recipe.calibration.data)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.stages-", dir=out.parent)) \
        if len(recipe.stages) > 1 else None
    try:
        src = model
        for i, stage in enumerate(recipe.stages):
            last = i == len(recipe.stages) - 1
            dst = out if last else tmp / f"stage-{i}"  # type: ignore[operator]
            run_stage(recipe, i, src, dst, overwrite=(overwrite or force) if last else False, progress=progress)
            src = dst
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def run_stage(recipe: Recipe, index: int, src: Path, out: Path, *, overwrite: bool = False,
              progress: Progress | None = None) -> Path:
    """One stage: stream ``src`` through the pass into ``out``."""
    stage = recipe.stages[index]
    spec = get_pass(stage.pass_name)
    the_pass = spec.pass_cls(stage.config)
    torch.manual_seed(recipe.seed)
    reader = CheckpointReader(src)
    adapter = get_adapter(reader.config)
    in_manifest = reader_manifest(reader)
    model = build_skeleton(reader, adapter, in_manifest)
    the_pass.resolve(block_linears(model, adapter))
    calib = load_calibration(src, recipe.calibration, reader.config) if spec.calibrates(stage.config) else None
    trim()  # the corpus text and tokenizer buffers are garbage now
    t0 = time.perf_counter()
    with CheckpointWriter(out, overwrite=overwrite) as writer:
        run = RunContext(reader, adapter, model, dict(reader.config), None,
                         dict(in_manifest.get("modules", {})), list(in_manifest.get("transforms", [])))
        _embeddings(run, the_pass, writer, calib, recipe.calibration.batch_size)
        _blocks(run, the_pass, writer, progress)
        _tail(run, the_pass, writer)
        meta = provenance(reader, recipe, index, calib, in_manifest, time.perf_counter() - t0)
        config, export = export_quantization_config(run.config, run.modules, run.transforms, adapter)
        meta.update({"modules": run.modules, "transforms": run.transforms, "notes": run.notes,
                     "export": export})
        writer.write_json("config.json", config)
        writer.write_json("compression.json", meta)
        writer.write_text("recipe.yaml", recipe.to_yaml())
        side_files(reader.path, writer)
        if run.records:
            write_all(run.records, writer.directory / "reports", f"{the_pass.scheme()} on {src.name}")
        writer.commit()
    return out


def block_linears(model: nn.Module, adapter: Adapter) -> list[tuple[str, int, int]]:
    """(block-relative name, out_features, in_features) of every linear in every block."""
    out = []
    for layer in get_module(model, adapter.layers):
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear):
                out.append((name, mod.out_features, mod.in_features))
    return out


def _embeddings(run: RunContext, the_pass: Pass, writer: CheckpointWriter,
                calib: Calibration | None, batch_size: int) -> None:
    """Load the embeddings, catch block 0's calibration inputs, let the pass begin, write them."""
    for path in run.adapter.embeddings:
        materialize(get_module(run.model, path), f"{path}.", run.reader)
    if calib is not None:
        run.state = capture_block_inputs(run.model, run.adapter, calib.windows, batch_size)
        run.notes["calibration"] = {"protocol": calib.protocol.name, "windows": list(calib.windows.shape)}
    the_pass.begin(run)
    for path in run.adapter.embeddings:
        writer.add_many(state_dict_of(get_module(run.model, path), f"{path}."))
    run.tied_head = run.adapter.head is not None and bool(run.config.get("tie_word_embeddings")) \
        and f"{run.adapter.head}.weight" not in run.reader
    if not run.tied_head or not the_pass.needs_embeddings_at_finish:
        for path in run.adapter.embeddings:
            release(get_module(run.model, path))


def _blocks(run: RunContext, the_pass: Pass, writer: CheckpointWriter, progress: Progress | None) -> None:
    layers = get_module(run.model, run.adapter.layers)
    n = len(layers)
    for i in range(n):
        prefix = run.adapter.layer_prefix(i)
        layer = layers[i]
        materialize(layer, prefix, run.reader)
        ctx = LayerContext(i, prefix, layer, run.adapter, run.state)
        run.records.extend(the_pass.process_layer(ctx, run))
        if i < n - 1 or the_pass.uses_final_hidden:
            ctx.propagate()
        _record_modules(run, layer, prefix)
        writer.add_many(state_dict_of(layer, prefix))
        release(layer)
        trim()
        if progress is not None:
            progress(i + 1, n, f"{the_pass.name} (layer {i + 1}/{n})")


def _record_modules(run: RunContext, root: nn.Module, prefix: str) -> None:
    """Copy every compressed module's manifest entry (``manifest_entry()``) into the run."""
    for name, mod in root.named_modules():
        if hasattr(mod, "manifest_entry"):
            run.modules[prefix + name] = mod.manifest_entry()


def tail_paths(model: nn.Module, adapter: Adapter) -> list[str]:
    """Shallowest modules with tensors outside the embeddings and the blocks (norm, head, pooler)."""
    skip = (adapter.layers, *adapter.embeddings)
    chosen: list[str] = []
    for name, mod in model.named_modules():
        if not name or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if any(name.startswith(c + ".") for c in chosen):
            continue
        if mod._parameters or any(k not in mod._non_persistent_buffers_set for k in mod._buffers):
            chosen.append(name)
    return chosen


def _tail(run: RunContext, the_pass: Pass, writer: CheckpointWriter) -> None:
    paths = tail_paths(run.model, run.adapter)
    if run.tied_head:
        tie_head(run.model, run.adapter, run.reader)
        paths = [p for p in paths if p != run.adapter.head]
    for p in paths:
        materialize(get_module(run.model, p), f"{p}.", run.reader)
    the_pass.finish(run)
    _record_modules(run, run.model, "")
    for p in paths:
        writer.add_many(state_dict_of(get_module(run.model, p), f"{p}."))
    for key in run.reader.keys():  # tensors the model does not own (e.g. legacy buffers)
        if key not in writer.names() and not _owned(run, key, paths):
            writer.add(key, run.reader.get(key))


def _owned(run: RunContext, key: str, tail: list[str]) -> bool:
    prefixes = (run.adapter.layers + ".", *(e + "." for e in (*run.adapter.embeddings, *tail)))
    if run.tied_head and key.startswith(f"{run.adapter.head}."):
        return True
    return key.startswith(prefixes)
