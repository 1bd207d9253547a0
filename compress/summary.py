"""``compress inspect`` and ``compress plan``: what a checkpoint holds and what a recipe will do."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rich.console import Group
from rich.table import Table
from rich.text import Text

from compress.arch import Adapter, get_adapter
from compress.assets import resolve_model
from compress.calib.corpus import corpus_bytes
from compress.calib.protocol import corpus_protocol_name
from compress.checkpoint import CheckpointReader
from compress.model import reader_manifest
from compress.pipeline.memory import PeakEstimate, memory_shape, stage_peak
from compress.pipeline.pass_api import PassConfig
from compress.recipe import CalibrationConfig, Recipe
from compress.registry import PassSpec, get_pass
from compress.runner import make_protocol, planned_stages, stored_plan
from compress.units import human_bytes

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
            ("bytes on disk", f"{human_bytes(reader.total_bytes())} ({reader.total_bytes():,} B)"),
            ("shards", str(len(reader.files()))),
            ("compressed modules", ", ".join(f"{k}: {v}" for k, v in kinds.items()) or "none"),
            *_kind_rows(reader, manifest),
            ("transforms", ", ".join(x["kind"] for x in manifest.get("transforms", [])) or "none")]
    if "tool" in manifest:
        rows += [("made by", f"compress {manifest['tool']['version']} ({manifest['tool'].get('git_sha')})"),
                 ("stages", " → ".join(h["pass"] for h in manifest.get("history", []))),
                 ("calibration", (manifest.get("calibration") or {}).get("protocol") or "none (data-free)")]
    export = manifest.get("export")
    if export is not None:
        rows.append(("loads in", "compress.load and transformers + compressed-tensors"
                     if export.get("compressed_tensors") else f"compress.load only ({export.get('reason')})"))
    for r in rows:
        t.add_row(*r)
    return t


def _quant_widths(modules: dict[str, dict]) -> Counter[int]:
    """Weights of every ``quant`` entry per code width (column or row ranges of mixed entries)."""
    from compress.modules.kinds import parse_entry

    widths: Counter[int] = Counter()
    for name, e in modules.items():
        if e.get("kind") != "quant":
            continue
        entry = parse_entry(name, e)
        other = entry.in_features if entry.row_segments is not None else entry.out_features
        for a, b, bits in entry.widths():
            widths[bits] += (b - a) * other
    return widths


def _power_exponents(modules: dict[str, dict]) -> list[tuple[str, float, tuple[float, float] | None]]:
    """(module, exponent, per-channel range) of every power-grid ``lut`` entry (NUPES)."""
    return [(name, float(e["exponent"]), tuple(e["exponent_range"]) if e.get("exponent_range") else None)
            for name, e in modules.items()
            if e.get("kind") == "lut" and e.get("grid") == "power" and e.get("exponent") is not None]


def _exponent_text(exps: list[tuple[str, float, tuple[float, float] | None]]) -> str:
    """NUPES exponents in one line: range and median over linears, per role, per-channel spread."""
    vals = sorted(a for _, a, _ in exps)
    roles: dict[str, list[float]] = {}
    for name, a, _ in exps:
        roles.setdefault(name.rsplit(".", 1)[-1], []).append(a)
    per_role = ", ".join(f"{r} {sum(v) / len(v):.2f}" for r, v in sorted(roles.items()))
    text = (f"{len(vals)} linears, a = {vals[0]:.3f}..{vals[-1]:.3f} (median {vals[len(vals) // 2]:.3f}; "
            f"1 = uniform); mean per role: {per_role}")
    ranges = [r for _, _, r in exps if r is not None]
    if ranges:
        text += f"; per channel {min(r[0] for r in ranges):.3f}..{max(r[1] for r in ranges):.3f}"
    return text


def _cpu_paths(modules: dict) -> str:
    """How the single-width quantised linears serve on CPU: torch's native int4/int8 ops, or the
    twin and why (from the manifest alone; mixed widths and other kinds are not counted)."""
    from compress.kernels import native_cpu

    served: Counter[str] = Counter()
    for e in modules.values():
        if e.get("kind") not in ("quant", "quant-tied") or e.get("bits") is None or e.get("role") == "embedding":
            continue
        why = native_cpu.unsupported(int(e["bits"]), int(e["group_size"]), int(e["in_features"]),
                                     int(e["out_features"]), bool(e.get("symmetric", True)))
        served["native int4" if why is None and e["bits"] == 4 else "native int8" if why is None
               else f"torch twin ({why})"] += 1
    return ", ".join(f"{n} × {p}" for p, n in served.most_common())


def _kind_rows(reader: CheckpointReader, manifest: dict) -> list[tuple[str, str]]:
    """Bytes per module kind (each kind's own accounting) and the shared groups, if any."""
    from compress.model import config_dtype, load_config
    from compress.modules.kinds import entry_bytes, parse_entry, parse_shared, shared_key

    modules = manifest.get("modules", {})
    if not modules:
        return []
    dtype = config_dtype(load_config(reader))
    per_kind: Counter[str] = Counter()
    for name, e in modules.items():
        entry = parse_entry(name, e)
        per_kind[entry.kind] += entry_bytes(entry, dtype)
    rows = [("bytes by kind", ", ".join(f"{k}: {human_bytes(v)}" for k, v in per_kind.items()))]
    widths = _quant_widths(modules)
    if len(widths) > 1:  # a bit allocation (BAQ): what share of the quantised weights each width holds
        total = sum(widths.values())
        rows.append(("quantised weights by width", ", ".join(
            f"{b} bits: {100 * n / total:.1f} %" for b, n in sorted(widths.items()))
            + f" (average {sum(b * n for b, n in widths.items()) / total:.3f})"))
    exps = _power_exponents(modules)
    if exps:
        rows.append(("power exponents", _exponent_text(exps)))
    cpu = _cpu_paths(modules)
    if cpu:
        rows.append(("CPU kernels", cpu))
    groups = parse_shared(manifest.get("shared"))
    if groups:
        size = sum(reader.nbytes(shared_key(g, t)) for g, spec in groups.items() for t in spec.tensors
                   if shared_key(g, t) in reader)
        users = sum(len(spec.users) for spec in groups.values())
        rows.append(("shared tensors", f"{len(groups)} groups, {human_bytes(size)}, read by {users} modules"))
    return rows


def plan_recipe(recipe: Recipe, model: str) -> Group:
    """Validate ``recipe`` against ``model``: each stage's effective options (after the pass has
    resolved shape-dependent ones such as ``group_size: auto``) and calibration, then estimates
    of the output size and the peak memory, in human units, within 80 columns."""
    reader = CheckpointReader(resolve_model(model))
    adapter = get_adapter(reader.config)
    stages = Table(title=f"plan: {recipe.name or 'recipe'} on {Path(reader.path).name}")
    stages.add_column("#")
    stages.add_column("pass")
    stages.add_column("calibration", overflow="fold")
    stages.add_column("options (* = set by the recipe)", overflow="fold")
    total_in = reader.total_bytes()
    estimates = stage_estimates(recipe, reader, adapter, stages)
    est = Table(title="estimates")
    est.add_column("quantity")
    est.add_column("size", justify="right", no_wrap=True)
    last = len(estimates) - 1
    rows = [("input on disk", total_in)]
    for i, (st, e) in enumerate(zip(recipe.stages, estimates, strict=True)):
        rows.append(("output on disk (estimate)" if i == last else f"after stage {i} ({st.pass_name}) (estimate)",
                     e.bytes))
    if len(estimates) > 1:
        rows += [(f"peak memory of stage {i} ({st.pass_name})", e.peak.peak)
                 for i, (st, e) in enumerate(zip(recipe.stages, estimates, strict=True))]
    top = max(range(len(estimates)), key=lambda i: estimates[i].peak.peak)
    where = f"stage {top}: {estimates[top].peak.phase}" if len(estimates) > 1 else estimates[top].peak.phase
    rows += [(f"  {k}", v) for k, v in estimates[top].peak.terms.items()]
    rows.append((f"peak memory (estimate; {where})", estimates[top].peak.peak))
    for k, v in rows:
        est.add_row(k, human_bytes(v))
    return Group(stages, est, *_stored_plan_lines(recipe, Path(reader.path)))


def _stored_plan_lines(recipe: Recipe, src: Path) -> list[Text]:
    """The first stage's plan (JSON) when its pass plans from a scan whose statistics are stored;
    a note when they are not yet."""
    stage = recipe.stages[0]
    if not get_pass(stage.pass_name).pass_cls(stage.config).needs().plan:
        return []
    plan = stored_plan(recipe, src)
    if plan is None:
        return [Text(f"stage 0 ({stage.pass_name}) plans from a scan of every block; its statistics are not "
                     "stored yet, so the plan is shown after the first run")]
    summary = getattr(plan, "summary", None)  # a plan too long to print whole says what matters
    body = "\n".join(summary()) if callable(summary) else json.dumps(plan.model_dump(mode="json"), indent=1)
    return [Text(f"plan of stage 0 ({stage.pass_name}), from stored statistics:"), Text(body)]


@dataclass(frozen=True)
class StageEstimate:
    """What ``plan`` predicts for one stage: the bytes on disk it leaves and its peak memory."""

    bytes: int
    peak: PeakEstimate


def stage_estimates(recipe: Recipe, reader: CheckpointReader, adapter: Adapter,
                    table: Table | None = None) -> list[StageEstimate]:
    """Every stage resolved against, and estimated on, the shapes the stage before it leaves
    (:class:`ShapePlan`): its peak memory on its input's shapes, then the bytes it writes. With
    ``table`` each stage's effective options are added to it as a row."""
    peaks, sizes, plan = [], [], None
    for i, spec, the_pass, plan in planned_stages(recipe, reader, adapter):
        if i:
            sizes.append(plan.total_bytes())  # what stage i - 1 leaves
        st = recipe.stages[i]
        if table is not None:
            table.add_row(str(i), spec.name, _calibration_cell(spec, st.config, recipe.calibration),
                          _options_cell(st.config, the_pass.config))
        protocol = make_protocol(recipe.calibration) if spec.calibrates(st.config) else None
        shape = memory_shape(plan, reader, adapter, protocol, recipe.calibration.batch_size,
                             corpus_bytes(recipe.calibration.data))
        peaks.append(stage_peak(shape, the_pass.plan_memory(shape), plan.tied_head))
    assert plan is not None  # a recipe has at least one stage
    sizes.append(plan.total_bytes())  # the walk rewrote it for the last stage on finishing
    return [StageEstimate(b, p) for b, p in zip(sizes, peaks, strict=True)]


def stage_bytes(recipe: Recipe, reader: CheckpointReader, adapter: Adapter) -> list[int]:
    """Estimated bytes on disk after each stage (:func:`stage_estimates`)."""
    return [e.bytes for e in stage_estimates(recipe, reader, adapter)]


def _calibration_cell(spec: PassSpec, config: PassConfig, cal: CalibrationConfig) -> str:
    """``no (data-free)``, or the protocol the stage calibrates on as the runner names it."""
    if not spec.calibrates(config):
        return "no (data-free)"
    proto = make_protocol(cal)
    return f"yes: {corpus_protocol_name(proto.name, cal.data)}\n{proto.n_calib} × {proto.seq_len} tokens"


def _options_cell(requested: PassConfig, effective: PassConfig) -> Text:
    """One ``key: value`` line per option of the effective config; a value the pass resolved
    reads ``auto → 64``; options the recipe set carry ``*``, defaults are dimmed."""
    cell = Text()
    for key in type(effective).model_fields:
        if key == "version":  # the config schema version, not an option
            continue
        before, after = getattr(requested, key), getattr(effective, key)
        value = _fmt(after) if before == after else f"{_fmt(before)} → {_fmt(after)}"
        chosen = key in requested.model_fields_set
        if cell:
            cell.append("\n")
        cell.append(f"{'*' if chosen else ' '} {key}: {value}", style=None if chosen else "dim")
    return cell


def _fmt(value: object) -> str:
    """An option value as a recipe spells it (YAML booleans and nulls); a mapping by its size."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return f"{{{len(value)} entries}}"
    return str(value)


def support_table() -> Group:
    """``compress list --archs``: model_type × pass (:func:`compress.registry.support_matrix`),
    then each refusal's reason once."""
    from compress.registry import support_matrix

    matrix = support_matrix()
    names = list(next(iter(matrix.values())))
    t = Table(title="supported model families × passes")
    for col in ("model_type", *names):
        t.add_column(col, overflow="fold")
    for model_type, row in matrix.items():
        t.add_row(model_type, *("yes" if row[n] is None else "no" for n in names))
    reasons = sorted({r for row in matrix.values() for r in row.values() if r})
    return Group(t, *(Text(f"no: {r}") for r in reasons))

