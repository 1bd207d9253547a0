"""Per-layer records of a run: one schema, written to JSON + CSV, a rich table and a PNG plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.table import Table

CSV_FIELDS = ("stage", "layer", "module", "kind", "bits", "error", "time_s", "bytes", "params", "extra")


class LayerRecord(BaseModel):
    """What a pass did to one module.

    Args:
        stage: pass name; layer: block index (-1 outside blocks); module: full module name.
        kind: representation after the pass (quant, lowrank, sliced, dense).
        bits: storage bits per original parameter, if meaningful.
        error: relative output error on the calibration data, ‖ΔY‖²/‖Y‖² (None if data-free).
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
    time_s: float = 0.0
    bytes: int = 0
    params: int = 0
    extra: dict[str, float | int | str] = Field(default_factory=dict)


def write_json(records: list[LayerRecord], path: Path) -> None:
    path.write_text(json.dumps([r.model_dump() for r in records], indent=1) + "\n")


def read_json(path: Path) -> list[LayerRecord]:
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
    out = []
    with path.open() as fh:
        for row in csv.DictReader(fh):
            clean = {k: (None if v == "" else v) for k, v in row.items()}
            clean["extra"] = json.loads(row["extra"] or "{}")
            out.append(LayerRecord.model_validate(clean))
    return out


def table(records: list[LayerRecord], title: str = "per-layer report", limit: int = 60) -> Table:
    t = Table(title=title)
    for col in ("layer", "module", "kind", "bits", "rel. out err", "time s", "KiB"):
        t.add_column(col, justify="right" if col not in ("module", "kind") else "left")
    for r in records[:limit]:
        t.add_row(str(r.layer), r.module, r.kind, "" if r.bits is None else f"{r.bits:.2f}",
                  "" if r.error is None else f"{r.error:.2e}", f"{r.time_s:.2f}", f"{r.bytes / 1024:.0f}")
    if len(records) > limit:
        t.caption = f"{len(records) - limit} more rows in report.csv"
    return t


def plot(records: list[LayerRecord], path: Path, title: str) -> None:
    """Relative output error per block, one line per module role, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r.error is not None and r.layer >= 0 and r.error > 0:
            role = r.module.rsplit(".", 1)[-1]
            series.setdefault(role, []).append((r.layer, r.error))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for role, pts in sorted(series.items()):
        xs, ys = zip(*sorted(pts), strict=True)
        ax.plot(xs, ys, marker="o", ms=3, label=role)
    ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel("relative output error ‖ΔY‖²/‖Y‖²")
    ax.set_title(title)
    if series:
        ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_all(records: list[LayerRecord], directory: Path, title: str) -> None:
    """report.json, report.csv and report.png in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    write_json(records, directory / "report.json")
    write_csv(records, directory / "report.csv")
    plot(records, directory / "report.png", title)


def print_table(records: list[LayerRecord], console: Console | None = None, title: str = "") -> None:
    (console or Console(stderr=True)).print(table(records, title or "per-layer report"))
