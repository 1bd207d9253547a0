"""The phases of one stage over the block stream: scan, plan, apply (see :mod:`pass_api`).

Memory stays at one block + the calibration activations + the embeddings, whatever the depth.
In the apply phase block i is loaded from the input shards, given its statistics, compressed by
the pass, run forward to produce block i+1's inputs (unless the pass reads statistics only),
written to the output shard, committed for ``--resume``, and freed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from compress._memory import trim
from compress.calib.pipeline import CalibState, LayerContext, capture_block_inputs
from compress.checkpoint import CheckpointWriter
from compress.device import rng_states, set_rng_states
from compress.distributed import share, world
from compress.errors import CompressError
from compress.modules.kinds import SHARED_PREFIX, model_shared
from compress.model import (
    build_skeleton, get_module, materialize, materialize_shared, reader_manifest, release, state_dict_of, tie_head)
from compress.pipeline import resume as resume_io
from compress.pipeline.contexts import Calibration, RunContext
from compress.pipeline.pass_api import Needs, Pass
from compress.pipeline.stats import BlockStats
from compress.report import LayerRecord

Progress = Callable[[int, int, str], None]


@dataclass
class Stream:
    """One stage's apply stream and what it needs besides the run state."""

    run: RunContext
    the_pass: Pass
    writer: CheckpointWriter
    needs: Needs
    calib: Calibration | None
    batch_size: int
    stats: BlockStats | None
    identity: resume_io.Identity
    point: dict | None = None  # the committed state a --resume continues from
    progress: Progress | None = None
    missing: set[int] = field(default_factory=set)

    @property
    def fused(self) -> bool:
        """Block i's scan runs just before block i is applied (no plan, statistics-only apply)."""
        return self.stats is not None and not self.needs.plan and not self.needs.activations

    # -- embeddings, scan, plan, begin ---------------------------------------------------------
    def embeddings(self) -> None:
        """Load the embeddings, catch block 0's calibration inputs when something will read them,
        scan + plan when the pass has a plan step, let the pass begin, write the embeddings."""
        run = self.run
        materialize_shared(run.model, run.reader, run.device)  # any block's modules may read them
        for path in run.adapter.embeddings:
            materialize(get_module(run.model, path), f"{path}.", run.reader, device=run.device)
        self.missing = set(self.stats.missing()) if self.stats is not None else set()
        if self.calib is not None:
            run.notes["calibration"] = {"protocol": self.calib.protocol.name,
                                        "windows": list(self.calib.windows.shape)}
            if world().size > 1:
                run.notes["data_parallel"] = {"processes": world().size, "device": run.device.type}
            if self.needs.activations or self.missing or self.stats is None:
                run.state = self._capture()
        if self.stats is not None and not self.fused:
            self._scan_all()
            if self.needs.activations:
                run.state = self._capture()  # the apply stream starts again from block 0
        if self.needs.plan:
            assert self.stats is not None
            run.plan = self.the_pass.plan(self.stats, run)
            self.writer.write_json("plan.json", run.plan.model_dump(mode="json"))
        run.tied_head = run.adapter.head is not None and bool(run.config.get("tie_word_embeddings")) \
            and f"{run.adapter.head}.weight" not in run.reader
        self.the_pass.begin(run)
        deferred = self.the_pass.rewrites_embeddings(run)
        if self.point is not None:
            self._restore_point()
        elif not deferred:
            for path in run.adapter.embeddings:
                self.writer.add_many(state_dict_of(get_module(run.model, path), f"{path}."))
        if not deferred and (not run.tied_head or not self.the_pass.needs_embeddings_at_finish):
            for path in run.adapter.embeddings:
                release(get_module(run.model, path))

    def _capture(self) -> CalibState:
        assert self.calib is not None
        run = self.run
        return capture_block_inputs(run.model, run.adapter, self._windows(), self.batch_size, run.device,
                                    run.activations)

    def _windows(self) -> torch.Tensor:
        """This process's calibration windows (all of them, or its share in a data-parallel run)."""
        assert self.calib is not None
        return share(self.calib.windows, self.batch_size, world())

    def _scan_all(self) -> None:
        """The read-only scan: every block up to the last missing one, dense, in order."""
        if not self.missing:
            return
        last = max(self.missing)
        for ctx in self._dense_blocks(self.run.state, last + 1):  # type: ignore[arg-type]
            if ctx.index in self.missing:
                self._scan(ctx)
            if ctx.index < last:
                ctx.propagate()
            if self.progress is not None:
                self.progress(ctx.index + 1, last + 1, f"{self.the_pass.name} scan (layer {ctx.index + 1}/{last + 1})")
        self.missing.clear()
        self.run.state = None

    def _dense_blocks(self, state: CalibState, upto: int) -> Iterator[LayerContext]:
        """Blocks ``0..upto-1`` of the dense input model, each materialised from the input shards
        into a fresh skeleton (the run's own blocks may already be compressed), then freed."""
        run = self.run
        dense = get_module(self._input_skeleton(), run.adapter.layers)
        for i in range(upto):
            prefix = run.adapter.layer_prefix(i)
            materialize(dense[i], prefix, run.reader, device=run.device)
            with torch.no_grad():
                yield LayerContext(i, prefix, dense[i], run.adapter, state)
            release(dense[i])
            trim()

    def _input_skeleton(self) -> nn.Module:
        """A fresh skeleton of the input checkpoint (its compressed modules and shared tensors
        as stored), whatever this run has already changed in ``run.model``."""
        run = self.run
        model = build_skeleton(run.reader, run.adapter, reader_manifest(run.reader), run.device)
        materialize_shared(model, run.reader, run.device)
        return model

    def _scan(self, ctx: LayerContext) -> dict[str, torch.Tensor]:
        """Block ``ctx.index``'s statistics from its dense block, checked and stored."""
        stats = self._checked(self.the_pass.scan_layer(ctx), ctx)
        self.stats.put(ctx.index, stats)  # type: ignore[union-attr]
        return stats

    @staticmethod
    def _checked(stats: dict[str, torch.Tensor], ctx: LayerContext) -> dict[str, torch.Tensor]:
        bad = [k for k, t in stats.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise CompressError(f"block {ctx.index}: the scan statistic {bad[0]} has NaN or Inf values",
                                "check the input checkpoint (compress validate) and the calibration data")
        return stats

    # -- apply ---------------------------------------------------------------------------------
    def blocks(self) -> None:
        run = self.run
        layers = get_module(run.model, run.adapter.layers)
        n = len(layers)
        start = int(self.point["blocks_done"]) if self.point is not None else 0
        for i in range(start, n):
            prefix = run.adapter.layer_prefix(i)
            layer = layers[i]
            materialize(layer, prefix, run.reader, device=run.device)
            ctx = LayerContext(i, prefix, layer, run.adapter, run.state)
            if self.stats is not None:
                ctx.stats = self._block_stats(ctx, n) if self.fused else self._scanned(i)
            grad = torch.enable_grad() if self.needs.gradients else torch.no_grad()
            with grad:
                run.records.extend(self.the_pass.process_layer(ctx, run))
            if i < n - 1 or self.the_pass.uses_final_hidden:
                ctx.propagate()
            record_modules(run, layer, prefix)
            self.writer.add_many(state_dict_of(layer, prefix))
            release(layer)
            trim()
            self.commit(i + 1)
            if self.progress is not None:
                self.progress(i + 1, n, f"{self.the_pass.name} (layer {i + 1}/{n})")

    def _block_stats(self, ctx: LayerContext, n: int) -> dict[str, torch.Tensor]:
        """Block i's statistics: stored ones (verified), else scanned now on the dense block.
        A stored block whose later blocks are missing still runs its dense forward, so the
        scans after it see the dense model's activations."""
        assert self.stats is not None
        i = ctx.index
        stats = None if i in self.missing else self.stats.block(i)
        if stats is not None:
            stats = _to(stats, self.run.device)
        if stats is None:
            if self.run.state is None:  # stored but found corrupt or evicted: rebuild the dense inputs
                self.run.state = self._replay_dense(i)
            ctx.state = self.run.state
            stats = self._scan(ctx)
            self.missing.discard(i)
        if not any(j > i for j in self.missing):
            self.run.state = ctx.state = None  # nothing later reads activations
        ctx.propagate()  # dense outputs, before the pass changes the block (no-op if the scan did it)
        return stats

    def _scanned(self, i: int) -> dict[str, torch.Tensor]:
        """Block ``i``'s statistics from the scan that ran before the apply stream (a plan step
        or an apply phase with its own activations), on the run's device."""
        assert self.stats is not None
        stats = self.stats.block(i)
        if stats is None:
            raise CompressError(f"the scan statistics of block {i} vanished from the work store during the run",
                                "run again (or with --no-cache)")
        return _to(stats, self.run.device)

    def _replay_dense(self, upto: int) -> CalibState:
        """Activations entering block ``upto`` of the dense input model, recomputed from block 0
        (an evicted or corrupt statistic in the middle of a run)."""
        run = self.run
        model = self._input_skeleton()
        for path in run.adapter.embeddings:
            materialize(get_module(model, path), f"{path}.", run.reader, device=run.device)
        assert self.calib is not None
        state = capture_block_inputs(model, run.adapter, self._windows(), self.batch_size, run.device,
                                     run.activations)
        del model
        for ctx in self._dense_blocks(state, upto):
            ctx.propagate()
        return state

    # -- resume --------------------------------------------------------------------------------
    def commit(self, blocks_done: int) -> None:
        """Commit the state after ``blocks_done`` blocks for ``--resume``."""
        run = self.run
        tensors: dict[str, dict[str, torch.Tensor]] = {"rng": rng_states(run.device)}
        st = run.state
        if st is not None:
            width = st.width or st.hidden.shape[-1]
            tensors["hidden"] = {"hidden": st.hidden[..., :width]}  # (windows, seq, width)
        carry_t, carry_j = resume_io.split_carry(self.the_pass.carry_state())
        if carry_t:
            tensors["carry"] = carry_t
        holder = model_shared(run.model)
        if run.new_shared and holder is not None:  # groups this stage added (small, written at the tail)
            tensors["shared"] = {f"{g}.{t}": b for g in run.new_shared for t, b in holder.get_submodule(g).named_buffers()}
        point = {"blocks_done": blocks_done, "writer": self.writer.snapshot(), "modules": run.modules,
                 "transforms": run.transforms, "notes": run.notes, "carry": carry_j,
                 "shared": run.shared, "new_shared": run.new_shared,
                 "records": [r.model_dump() for r in run.records],
                 "generation": (self.point or {}).get("generation", 0)}
        resume_io.save_point(self.writer.partial, self.identity, point, tensors)
        self.point = {"generation": point["generation"] + 1}

    def _restore_point(self) -> None:
        """After ``begin``: the writer, manifest, records, carried state, RNG and activations."""
        point, run, partial = self.point, self.run, self.writer.partial
        assert point is not None
        self.writer.restore(point["writer"])
        run.modules = dict(point["modules"])
        run.transforms = list(point["transforms"])
        run.notes = dict(point["notes"])
        run.records = [LayerRecord(**r) for r in point["records"]]
        saved = _to(resume_io.load_tensors(partial, point, "shared"), run.device)
        for g in point.get("new_shared", []):
            prefix = f"{g}."
            run.add_shared(g, {k[len(prefix):]: t for k, t in saved.items() if k.startswith(prefix)})
        run.shared = dict(point.get("shared", run.shared))
        carried = _to(resume_io.load_tensors(partial, point, "carry"), run.device)
        self.the_pass.restore_carry({**point.get("carry", {}), **carried})
        set_rng_states(resume_io.load_tensors(partial, point, "rng"), run.device)
        hidden = resume_io.load_tensors(partial, point, "hidden").get("hidden")
        done = int(point["blocks_done"])
        if hidden is not None and run.state is not None:
            _load_hidden(run.state, hidden)
        elif run.state is not None and done:
            run.state = self._replay_dense(done)  # e.g. the statistics were evicted since

    # -- tail ----------------------------------------------------------------------------------
    def tail(self) -> None:
        run, writer = self.run, self.writer
        paths = tail_paths(run.model, run.adapter)
        if run.tied_head:
            tie_head(run.model, run.adapter, run.reader)
            paths = [p for p in paths if p != run.adapter.head]
        for p in paths:
            materialize(get_module(run.model, p), f"{p}.", run.reader, device=run.device)
        self.the_pass.finish(run)
        record_modules(run, run.model, "")
        paths += [p for p in tail_paths(run.model, run.adapter)  # shared groups added by finish
                  if p not in paths and p.startswith(SHARED_PREFIX + ".")]
        if self.the_pass.rewrites_embeddings(run):
            paths = [*run.adapter.embeddings, *paths]
            if run.tied_head and not _head_reads_table(run):
                paths.append(run.adapter.head)  # finish untied it: the head stores its own tensors now
        for p in paths:
            writer.add_many(state_dict_of(get_module(run.model, p), f"{p}."))
        for key in run.reader.keys():  # tensors the model does not own (e.g. legacy buffers)
            if key not in writer.names() and not _owned(run, key, paths):
                writer.add(key, run.reader.get(key))


def _head_reads_table(run: RunContext) -> bool:
    """Whether the head is still the dense token table (tied, so nothing of its own to store)."""
    head = get_module(run.model, run.adapter.head)
    emb = get_module(run.model, run.adapter.token_embedding)
    return "weight" in head._parameters and head.weight is getattr(emb, "weight", None)


def _to(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Tensors read from the host (work store, resume files) on the run's device."""
    return {k: t.to(device) for k, t in tensors.items()}


def _load_hidden(state: CalibState, hidden: torch.Tensor) -> None:
    """Put saved activations (windows, seq, width) into the state's buffer."""
    if tuple(hidden.shape[:-1]) != tuple(state.hidden.shape[:-1]):
        raise CompressError("the partial run's activations do not match the calibration windows",
                            "run again without --resume")
    w = hidden.shape[-1]
    if w > state.hidden.shape[-1]:
        state.hidden = state.hidden.new_zeros((*state.hidden.shape[:-1], w))
    state.hidden[..., :w] = hidden.to(state.hidden.dtype)
    state.set_width(w)


def record_modules(run: RunContext, root: nn.Module, prefix: str) -> None:
    """Copy every compressed module's manifest entry (``manifest_entry()``) into the run (the
    outermost one only: a mixed-width linear's segments belong to its entry)."""
    recorded: list[str] = []
    for name, mod in root.named_modules():
        if any(name.startswith(r + ".") for r in recorded):
            continue
        if hasattr(mod, "manifest_entry"):
            run.modules[prefix + name] = mod.manifest_entry()
            recorded.append(name)


def tail_paths(model: nn.Module, adapter: object) -> list[str]:
    """Shallowest modules with tensors outside the embeddings and the blocks (norm, head, pooler)."""
    skip = (adapter.layers, *adapter.embeddings)  # type: ignore[attr-defined]
    chosen: list[str] = []
    for name, mod in model.named_modules():
        if not name or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if any(name.startswith(c + ".") for c in chosen):
            continue
        if mod._parameters or any(k not in mod._non_persistent_buffers_set for k in mod._buffers):
            chosen.append(name)
    return chosen


def _owned(run: RunContext, key: str, tail: list[str]) -> bool:
    prefixes = (run.adapter.layers + ".", *(e + "." for e in (*run.adapter.embeddings, *tail)))
    if run.tied_head and key.startswith(f"{run.adapter.head}."):
        return True
    return key.startswith(prefixes)
