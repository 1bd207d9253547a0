"""Run recipes: each stage streams the model block by block from its input checkpoint to an
output checkpoint (intermediate stages go to ``.OUT.stages/`` beside the output, kept for
``--resume`` when a run is killed). The phases of a stage are in :mod:`compress.pipeline.stream`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel
from torch import nn

from compress._memory import bound_allocator, trim
from compress.arch import Adapter, get_adapter, remote_code_trusted
from compress.calib.corpus import load_corpus
from compress.calib.token_cache import cached_token_ids
from compress.calib.protocol import (
    Protocol, calibration_windows, corpus_protocol_name, fingerprint, get_protocol, split_lines,
    tokenize_joined)
from compress.checkpoint import CheckpointReader, CheckpointWriter, prepare_output
from compress.device import ActivationMode
from compress.distributed import agree, barrier, join
from compress.errors import CompressError
from compress.model import build_skeleton, get_module, reader_manifest
from compress.pipeline import resume as resume_io
from compress.pipeline.contexts import Calibration, RunContext
from compress.pipeline.pass_api import Needs, Pass
from compress.pipeline.resume import Identity
from compress.pipeline.stats import BlockStats, open_stats
from compress.pipeline.stream import Progress, Stream
from compress.provenance import export_quantization_config, provenance, side_files
from compress.recipe import CalibrationConfig, Recipe
from compress.pipeline.shapes import ShapePlan
from compress.registry import PassSpec, get_pass
from compress.report import write_all
from compress.store import checkpoint_hash


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


def load_calibration(src: Path, cal: CalibrationConfig, config: dict, cache: bool = True) -> Calibration:
    """Calibration windows of ``cal`` tokenised with the checkpoint's own tokenizer (the ids of
    the split come from the work store when an earlier run tokenised the same text; ``cache``)."""
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
    ids = cached_token_ids(src, calib_lines, lambda: tokenize_joined(load_tokenizer(src), calib_lines), cache=cache)
    windows = calibration_windows(ids, proto)
    return Calibration(windows, proto, fingerprint(windows, proto, source), source)


def load_tokenizer(src: Path) -> object:
    """The checkpoint's own tokenizer; one-line refusal when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src, trust_remote_code=remote_code_trusted())
    except (OSError, ValueError) as e:
        raise CompressError(f"{src} has no usable tokenizer ({type(e).__name__})",
                            "copy the tokenizer files into the checkpoint directory") from None


def run_recipe(recipe: Recipe, model: Path, out: Path, *, overwrite: bool = False, force: bool = False,
               progress: Progress | None = None, cache: bool = True, resume: bool = False,
               device: str | torch.device = "auto", activations: ActivationMode = "auto") -> Path:
    """Apply every stage of ``recipe`` to ``model``; the last stage writes ``out`` atomically.

    Everything the user can get wrong is checked before any work: the input checkpoint, the
    output path (``force`` replaces a directory that is not a compress output) and, when a stage
    calibrates, the corpus (a missing or non-text file is refused here, not after stage 1).
    ``cache=False`` neither reads nor writes the work store. ``resume`` continues a killed run
    of the same command from its last committed block (``OUT.partial``); without it a partial
    run is discarded. ``device`` (``auto``: CUDA when present) is where the blocks compute;
    ``activations`` where the calibration activations live (:func:`compress.device.offload_activations`)."""
    bound_allocator()
    group, dev = join(device)
    model = Path(model)
    if group.size == 1:
        return _run_stages(recipe, model, _checked_output(recipe, model, out, overwrite, force, resume),
                           progress, cache, resume, dev, activations, overwrite or force)
    # data parallel (compress.distributed): process 0 writes OUT, the others a scratch copy
    if resume:
        raise CompressError("--resume in a run of several processes", "resume with one process")
    scratch = None
    if not group.main:  # beside OUT: the filesystem the user sized for the output
        Path(out).resolve().parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".compress-rank{group.rank}-", dir=Path(out).resolve().parent))
    try:
        error: CompressError | None = None
        try:
            target = out if scratch is None else scratch / Path(out).name
            target = _checked_output(recipe, model, target, overwrite, force, False)
        except CompressError as e:
            error = e
        if not agree(error is None):  # every process stops, none waits for a sum that never comes
            raise error or CompressError("another process of this data-parallel run refused its input",
                                         "see the first process's message")
        _run_stages(recipe, model, target, progress if group.main else None, False, False, dev, activations,
                    (overwrite or force) and group.main)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        barrier()
    return Path(out)


def _checked_output(recipe: Recipe, model: Path, out: Path, overwrite: bool, force: bool, resume: bool) -> Path:
    """The checks before any work: the input, the output path, the corpus, the stage chain and,
    with ``resume``, that there is a matching partial run; returns the output path."""
    CheckpointReader(model)  # validate the input before any work
    out = prepare_output(out, [model], overwrite, force)
    if recipe.calibrates:
        load_corpus(recipe.calibration.data)
    check_chain(recipe, model)
    if resume:
        _check_resumable(out, recipe, model, out.with_name(f".{out.name}.stages"))
    return out


def _run_stages(recipe: Recipe, model: Path, out: Path, progress: Progress | None, cache: bool, resume: bool,
                dev: torch.device, activations: ActivationMode, overwrite: bool) -> Path:
    """Every stage in turn (intermediate ones into ``.OUT.stages``); ``out`` has been checked."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stages_dir = out.with_name(f".{out.name}.stages")
    if not resume:
        shutil.rmtree(stages_dir, ignore_errors=True)
    src = model
    for i in range(len(recipe.stages)):
        last = i == len(recipe.stages) - 1
        dst = out if last else stages_dir / f"stage-{i}"
        if not last and resume and _stage_done(dst, recipe, i, src):
            src = dst
            continue
        if not last:
            stages_dir.mkdir(exist_ok=True)
            shutil.rmtree(dst, ignore_errors=True)
        run_stage(recipe, i, src, dst, overwrite=overwrite if last else False,
                  progress=progress, cache=cache, resume=resume, device=dev, activations=activations)
        if not last:
            _mark_stage_done(dst, recipe, i, src)
        src = dst
    shutil.rmtree(stages_dir, ignore_errors=True)
    return out


def check_chain(recipe: Recipe, model: Path) -> None:
    """Refuse, before any work, a stage whose pass cannot take what the stages before it will
    leave (e.g. SliceGPT after a quantisation stage, or on a family it cannot rotate): each
    stage's :meth:`Pass.check_input` on the input's manifest plus what the earlier stages plan."""
    reader = CheckpointReader(model)
    for _ in planned_stages(recipe, reader, get_adapter(reader.config)):
        pass


def planned_stages(recipe: Recipe, reader: CheckpointReader,
                   adapter: Adapter) -> Iterator[tuple[int, PassSpec, Pass, ShapePlan]]:
    """Walk the stages on shapes alone: each stage's pass, checked (:func:`check_stage_input`)
    and resolved against the :class:`ShapePlan` the stages before it leave, is yielded with that
    plan (its input's shapes); its :meth:`Pass.plan_shapes` then rewrites the plan for the next."""
    base, plan = reader_manifest(reader), ShapePlan.of(reader, adapter)
    for i, stage in enumerate(recipe.stages):
        spec = get_pass(stage.pass_name)
        the_pass = spec.pass_cls(stage.config)
        check_stage_input(the_pass, adapter, plan.manifest(base), recipe, i)
        the_pass.resolve(plan.block_linears(adapter))
        yield i, spec, the_pass, plan
        the_pass.plan_shapes(plan, adapter)


def check_stage_input(the_pass: Pass, adapter: Adapter, manifest: dict, recipe: Recipe, index: int) -> None:
    """:meth:`Pass.check_input`, its refusal naming the stage in a recipe of several."""
    try:
        the_pass.check_input(adapter, manifest)
    except CompressError as e:
        where = f"stage {index} ({recipe.stages[index].pass_name}): " if len(recipe.stages) > 1 else ""
        raise CompressError(where + e.problem, e.fix) from None


def _check_resumable(out: Path, recipe: Recipe, model: Path, stages_dir: Path) -> None:
    """Refuse ``--resume`` before any work when there is nothing to resume, or when what was
    interrupted ran another recipe or input (the calibration is checked when its stage starts)."""
    partial = out.with_name(out.name + ".partial")
    if not (partial.is_dir() or stages_dir.is_dir()):
        raise CompressError(f"--resume: there is no partial run of {out} to resume ({partial.name} not found)",
                            "run the command without --resume")
    marks = [partial / resume_io.STATE_FILE, *stages_dir.glob("*.done.json"),
             *stages_dir.glob(f"*.partial/{resume_io.STATE_FILE}")]
    for mark in marks:
        try:
            data = json.loads(mark.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        ident = data.get("identity", data)
        what = None
        if "identity" in data and ident.get("recipe") != recipe_hash(recipe, calibration=False):
            what = "the recipe differs"
        elif "identity" not in data and ident.get("recipe") != recipe_hash(recipe):  # a finished stage
            what = ("the calibration differs" if ident.get("stages") == recipe_hash(recipe, calibration=False)
                    else "the recipe differs")
        elif ident.get("stage") == 0 and ident.get("input") != checkpoint_hash(model):
            what = "the input checkpoint changed"
        if what:
            raise CompressError(f"--resume: {what} since the partial run of {out}",
                                "run the same command as the interrupted run, or drop --resume to start over")


def _stage_identity(recipe: Recipe, index: int, src: Path) -> dict:
    return {"recipe": recipe_hash(recipe), "stages": recipe_hash(recipe, calibration=False), "stage": index,
            "input": checkpoint_hash(src)}


def _stage_done(dst: Path, recipe: Recipe, index: int, src: Path) -> bool:
    """Whether an intermediate stage output of an interrupted run can be reused as it is."""
    mark = dst.with_name(dst.name + ".done.json")
    try:
        return dst.is_dir() and json.loads(mark.read_text()) == _stage_identity(recipe, index, src)
    except (OSError, json.JSONDecodeError):
        return False


def _mark_stage_done(dst: Path, recipe: Recipe, index: int, src: Path) -> None:
    mark = dst.with_name(dst.name + ".done.json")
    mark.write_text(json.dumps(_stage_identity(recipe, index, src)))


def recipe_hash(recipe: Recipe, *, calibration: bool = True) -> str:
    """sha256 of the recipe's canonical YAML (without its calibration section when
    ``calibration`` is false: a resume compares the calibration by its fingerprint instead)."""
    data = recipe.to_dict()
    if not calibration:
        data.pop("calibration", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def stage_identity(recipe: Recipe, index: int, src: Path, calib: Calibration | None,
                   memo: bool = True, device: torch.device | None = None) -> Identity:
    """What a ``--resume`` of this stage must match (``memo``: remember the input's hash)."""
    from compress.provenance import tool_version

    return Identity(input=checkpoint_hash(src, memo=memo), recipe=recipe_hash(recipe, calibration=False), stage=index,
                    calibration=None if calib is None else calib.fingerprint,
                    version=f"{tool_version()} torch {torch.__version__}",
                    device=(device or torch.device("cpu")).type)


def run_stage(recipe: Recipe, index: int, src: Path, out: Path, *, overwrite: bool = False,
              progress: Progress | None = None, cache: bool = True, resume: bool = False,
              device: torch.device | None = None, activations: ActivationMode = "auto") -> Path:
    """One stage: scan, plan and apply the pass over ``src`` into ``out`` (see
    :mod:`compress.pipeline.stream`) computing on ``device`` (default: the host); ``resume``
    continues from ``OUT.partial``'s last commit."""
    device = device or torch.device("cpu")
    torch.manual_seed(recipe.seed)
    st = _prepare(recipe, index, src, cache, device)
    the_pass, needs, reader, adapter, in_manifest, model, calib = (
        st.the_pass, st.needs, st.reader, st.adapter, st.in_manifest, st.model, st.calib)
    trim()  # the corpus text and tokenizer buffers are garbage now
    t0 = time.perf_counter()
    identity = stage_identity(recipe, index, src, calib, memo=cache, device=device)
    partial = out.with_name(out.name + ".partial")
    point = resume_io.load_point(partial, identity) if resume else None  # refuses another run's
    with CheckpointWriter(out, overwrite=overwrite, keep_partial=point is not None) as writer:
        run = RunContext(reader, adapter, model, dict(reader.config), None,
                         dict(in_manifest.get("modules", {})), list(in_manifest.get("transforms", [])),
                         shared={g: {"tensors": v["tensors"]} for g, v in in_manifest.get("shared", {}).items()},
                         device=device, activations=activations, calibration=calib)
        stats = _open_stats(the_pass, needs, src, calib, len(get_module(model, adapter.layers)),
                            cache, out.parent, device.type)
        stream = Stream(run, the_pass, writer, needs, calib, recipe.calibration.batch_size, stats,
                        identity, point, progress)
        try:
            stream.embeddings()
            stream.blocks()
            stream.tail()
        finally:
            if stats is not None:
                stats.close()
        meta = provenance(reader, recipe, index, calib, in_manifest, time.perf_counter() - t0)
        config, export = export_quantization_config(run.config, run.modules, run.transforms, adapter)
        meta.update({"modules": run.modules, "transforms": run.transforms, "shared": run.shared_section(),
                     "notes": run.notes, "export": export})
        writer.write_json("config.json", config)
        writer.write_json("compression.json", meta)
        writer.write_text("recipe.yaml", recipe.to_yaml())
        side_files(reader.path, writer)
        if run.records:
            write_all(run.records, writer.directory / "reports", f"{the_pass.scheme()} on {src.name}")
        the_pass.write_reports(run, writer.directory / "reports")
        resume_io.clear(writer.partial)
        writer.commit()
    return out


def _open_stats(the_pass: Pass, needs: Needs, src: Path, calib: Calibration | None, n_blocks: int,
                cache: bool, scratch_dir: Path, device: str = "cpu") -> BlockStats | None:
    if not needs.scan:
        return None
    statistic = the_pass.statistic()
    if statistic is None:
        raise TypeError(f"{type(the_pass).__name__} declares a scan but no statistic()")
    return open_stats(statistic, src, None if calib is None else calib.fingerprint, n_blocks,
                      cache=cache, keep_all=needs.plan or needs.activations, scratch_dir=scratch_dir,
                      device=device)


def stored_plan(recipe: Recipe, src: Path) -> BaseModel | None:
    """The plan the first stage would make on ``src`` when its pass has a plan step and every
    block's scan statistics are already in the work store (None otherwise): ``compress plan``
    shows it without scanning."""
    stage = recipe.stages[0]
    if not get_pass(stage.pass_name).pass_cls(stage.config).needs().plan:
        return None
    st = _prepare(recipe, 0, src)
    stats = _open_stats(st.the_pass, st.needs, src, st.calib, len(get_module(st.model, st.adapter.layers)), True, src)
    if stats is None or stats.missing():
        return None
    run = RunContext(st.reader, st.adapter, st.model, dict(st.reader.config), None,
                     dict(st.in_manifest.get("modules", {})), list(st.in_manifest.get("transforms", [])),
                     calibration=st.calib)
    return st.the_pass.plan(stats, run)


@dataclass
class _Prepared:
    """A stage before any block is touched: its pass (resolved on the model's shapes), the input
    reader, adapter and manifest, the meta skeleton, and the calibration windows if it calibrates."""

    the_pass: Pass
    needs: Needs
    reader: CheckpointReader
    adapter: Adapter
    in_manifest: dict
    model: nn.Module
    calib: Calibration | None


def _prepare(recipe: Recipe, index: int, src: Path, cache: bool = True,
             device: torch.device | None = None) -> _Prepared:
    stage = recipe.stages[index]
    spec = get_pass(stage.pass_name)
    the_pass = spec.pass_cls(stage.config)
    reader = CheckpointReader(src)
    adapter = get_adapter(reader.config)
    in_manifest = reader_manifest(reader)
    model = build_skeleton(reader, adapter, in_manifest, device)
    the_pass.resolve(block_linears(model, adapter))
    calib = load_calibration(src, recipe.calibration, reader.config, cache) if spec.calibrates(stage.config) else None
    return _Prepared(the_pass, the_pass.needs(), reader, adapter, in_manifest, model, calib)


def block_linears(model: nn.Module, adapter: Adapter) -> list[tuple[str, int, int]]:
    """(block-relative name, out_features, in_features) of every linear in every block."""
    out = []
    for layer in get_module(model, adapter.layers):
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear):
                out.append((name, mod.out_features, mod.in_features))
    return out
