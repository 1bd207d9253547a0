"""Per-layer records of a run: one schema, written to JSON + CSV, a rich table and a PNG plot."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field
from rich import box
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CSV_FIELDS = ("stage", "layer", "module", "kind", "bits", "error", "weight_error", "time_s", "bytes",
              "params", "extra")


class LayerRecord(BaseModel):
    """What a pass did to one module.

    Args:
        stage: pass name; layer: block index (-1 outside blocks); module: full module name.
        kind: representation after the pass (quant, lowrank, sliced, dense).
        bits: storage bits per original parameter, if meaningful.
        error: relative output error on the calibration data, ‖ΔY‖²/‖Y‖² (None if data-free).
        weight_error: relative weight reconstruction error ‖W − Ŵ‖²_F/‖W‖²_F (None where the
            pass has no per-module weight to compare, e.g. SliceGPT's rotated blocks).
        time_s: seconds spent; bytes: stored bytes; params: stored parameter count.
        extra: pass-specific numbers (damping used, ranks, explained variance, ...).
    """

    model_config = ConfigDict(extra="forbid")
    stage: str
    layer: int
    module: str
    kind: str
    bits: float | None = None
    error: float | None = None
    weight_error: float | None = None
    time_s: float = 0.0
    bytes: int = 0
    params: int = 0
    extra: dict[str, float | int | str] = Field(default_factory=dict)


def write_json(records: list[LayerRecord], path: Path) -> None:
    path.write_text(json.dumps([r.model_dump() for r in records], indent=1) + "\n")


def read_json(path: Path) -> list[LayerRecord]:
    """Records from ``report.json`` (older reports without ``weight_error`` read as None)."""
    return [LayerRecord.model_validate(r) for r in json.loads(path.read_text())]


def write_csv(records: list[LayerRecord], path: Path) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in records:
            row = r.model_dump()
            row["extra"] = json.dumps(row["extra"], sort_keys=True)
            w.writerow(row)


def read_csv(path: Path) -> list[LayerRecord]:
    """Records from ``report.csv``; columns missing from older reports take their defaults."""
    out = []
    with path.open() as fh:
        for row in csv.DictReader(fh):
            clean = {k: (None if v == "" else v) for k, v in row.items()}
            clean["extra"] = json.loads(row["extra"] or "{}")
            out.append(LayerRecord.model_validate(clean))
    return out


# -- what to show ------------------------------------------------------------------------------
Metric = Literal["error", "weight_error"]
_HEADER: dict[str, str] = {"error": "rel. out err", "weight_error": "rel. W err"}
_WORDS: dict[str, str] = {"error": "rel. output error", "weight_error": "rel. weight error"}
_AXIS: dict[str, str] = {"error": "relative output error ‖ΔY‖²/‖Y‖²",
                         "weight_error": "relative weight error ‖ΔW‖²/‖W‖²"}


def measured(records: list[LayerRecord]) -> Metric | None:
    """The error a run measured: the output error when any record has it (it is what the model
    sees), else the weight error (data-free passes), else None."""
    metrics: tuple[Metric, ...] = ("error", "weight_error")
    return next((m for m in metrics if any(getattr(r, m) is not None for r in records)), None)


def worst(records: list[LayerRecord], metric: Metric | None, limit: int) -> list[LayerRecord]:
    """The ``limit`` records with the largest ``metric``, worst first (NaN first, unmeasured last)."""
    if metric is None:
        return records[:limit]

    def key(r: LayerRecord) -> float:
        v = getattr(r, metric)
        return float("-inf") if v is None else float("inf") if math.isnan(v) else v

    return sorted(records, key=key, reverse=True)[:limit]


_INDEX = re.compile(r"\.(\d+)\.")


def short_name(module: str, layer: int | None = None) -> str:
    """``model.layers.12.self_attn.q_proj`` → ``L12 self_attn.q``: the block index and the
    block-relative name without a trailing ``_proj``, so q/k/v/o stay distinct in a narrow
    column. ``layer`` is the block index when known (else the first numeric name component is
    taken); names outside blocks (``lm_head``, layer -1) are returned unchanged."""
    if layer is not None and layer < 0:
        return module
    m = (_INDEX if layer is None else re.compile(rf"\.({layer})\.")).search(module)
    return module if m is None else f"L{int(m.group(1))} {module[m.end():].removesuffix('_proj')}"


def _num(v: float | None, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


# -- table -------------------------------------------------------------------------------------
def compact_table(title: str) -> Table:
    """A table without vertical rules or outer edges, two spaces between columns: the narrowest
    rich layout that still reads as a table, so reports fit 80 columns."""
    return Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)


def table(records: list[LayerRecord], title: str = "per-layer report", limit: int = 20,
          csv_hint: str = "") -> Table:
    """The ``limit`` worst modules by the measured error, with short names (``L12 self_attn.q``).

    Args:
        records: every record of the run; limit: rows shown.
        csv_hint: where all rows are (e.g. ``out/reports/report.csv``), named in the caption.
    """
    metric = measured(records)
    t = compact_table(title)
    t.add_column("module", overflow="fold")
    t.add_column("kind", overflow="fold")
    for col in ("bits", _HEADER[metric or "error"], "time s", "KiB"):
        t.add_column(col, justify="right", no_wrap=True)
    shown = worst(records, metric, limit)
    for r in shown:
        t.add_row(short_name(r.module, r.layer), r.kind, _num(r.bits, ".2f"),
                  _num(getattr(r, metric or "error"), ".2e"), f"{r.time_s:.2f}", f"{r.bytes / 1024:.0f}")
    t.caption = _caption(len(shown), len(records), metric, csv_hint)
    return t


def _caption(shown: int, total: int, metric: Metric | None, csv_hint: str) -> str:
    """``worst 20 of 210 by rel. output error`` (+ a line naming the CSV with every row)."""
    if metric is None:
        head = f"{shown} of {total} modules (no per-layer error measured)"
    elif shown < total:
        head = f"worst {shown} of {total} by {_WORDS[metric]}"
    else:
        head = f"{total} modules, worst first by {_WORDS[metric]}"
    return head + (f"\nall rows: {csv_hint}" if csv_hint else "")


def print_table(records: list[LayerRecord], console: Console | None = None, title: str = "",
                limit: int = 20, csv_hint: str = "") -> None:
    """Print :func:`table` (to stderr unless ``console`` is given)."""
    (console or Console(stderr=True)).print(table(records, title or "per-layer report", limit, csv_hint))


# -- plot --------------------------------------------------------------------------------------
def _role(module: str, layer: int) -> str:
    """The block-relative role of a module (``self_attn.q``), one plot line per role."""
    return short_name(module, layer).partition(" ")[2] or module


def figure(records: list[LayerRecord], title: str) -> Figure:
    """The measured error (output error if any, else weight error) per block, one line per
    module role, log scale; a figure saying so when no block has an error. ``title`` should
    name the scheme (the runner passes ``Pass.scheme()``)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    metric = measured(records)
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        v = None if metric is None else getattr(r, metric)
        if v is not None and r.layer >= 0:
            series.setdefault(_role(r.module, r.layer), []).append((r.layer, v))
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    ax.set_title(title)
    if not series or metric is None:
        ax.text(0.5, 0.5, "no per-layer error measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    log = any(v > 0 for pts in series.values() for _, v in pts)  # else all zero: linear axis
    for name, pts in sorted(series.items()):
        kept = sorted(p for p in pts if p[1] > 0 or not log)
        if kept:
            xs, ys = zip(*kept, strict=True)
            ax.plot(xs, ys, marker="o", ms=3, label=name)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(_AXIS[metric])
    ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    return fig


def plot(records: list[LayerRecord], path: Path, title: str) -> None:
    """Save :func:`figure` as a PNG (no pyplot: no global figure state, any backend)."""
    figure(records, title).savefig(path, dpi=100)


def write_all(records: list[LayerRecord], directory: Path, title: str) -> None:
    """report.json, report.csv and report.png in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    write_json(records, directory / "report.json")
    write_csv(records, directory / "report.csv")
    plot(records, directory / "report.png", title)
