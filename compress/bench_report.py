"""Rich tables for :class:`compress.bench.BenchReport` (end-to-end and per layer)."""

from __future__ import annotations

from rich.table import Table

from compress.bench import BenchReport


def _ms(s: float | None) -> str:
    return "—" if s is None else f"{1e3 * s:.2f}"


def _mb(b: int | None) -> str:
    return "—" if b is None else f"{b / 2**20:.1f}"


def _x(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}×"


def _phase_name(phase: str, tokens: int) -> str:
    return f"prefill {tokens}" if phase == "prefill" else f"decode ×{tokens}"


def phase_table(report: BenchReport) -> Table:
    """End to end: latency, throughput and memory per phase, compressed vs dense and their ratio."""
    t = Table(title=f"end to end ({report.device}; medians of {report.repeats}; ratio = compressed / dense)")
    cols = ("phase", "latency ms", "ratio", "tok/s", "peak MB", "ratio", "transient MB")
    for c in cols:
        t.add_column(c + ("" if c in ("phase", "ratio") else " (dense)"), justify="left" if c == "phase" else "right")
    for row in report.phases:
        c, d = row["compressed"], row["dense"] or {}
        t.add_row(_phase_name(row["phase"], row["tokens"]) + (" (per token)" if row["phase"] == "decode" else ""),
                  f"{_ms(c['latency_s'])} ({_ms(d.get('latency_s'))})", _x(row["latency_ratio"]),
                  f"{c['tokens_per_s']:.1f} ({'—' if not d else format(d['tokens_per_s'], '.1f')})",
                  f"{_mb(c['peak_bytes'])} ({_mb(d.get('peak_bytes'))})", _x(row["peak_ratio"]),
                  f"{_mb(c['transient_bytes'])} ({_mb(d.get('transient_bytes'))})")
    if report.phases:
        c, d = report.phases[0]["compressed"], report.phases[0]["dense"] or {}
        lines = [f"weights: {_mb(c['weight_bytes'])} MB vs dense {_mb(d.get('weight_bytes'))} MB; "
                 f"memory: fresh process per phase, peak RSS (CPU) / max_memory_allocated (CUDA)"]
        lines += roofline_lines(report)
        t.caption = "\n".join(lines)
    return t


def roofline_lines(report: BenchReport) -> list[str]:
    """Decode's achieved bandwidth (weight bytes per step / step time) against the copy bandwidth
    measured in the same run, and the kernel path of every compressed linear at M = 1."""
    lines = []
    bw = report.copy_bandwidth_Bps
    for row in report.phases:
        if row["phase"] != "decode":
            continue
        for label in ("compressed", "dense"):
            r = row.get(label)
            if not r or not r.get("bytes_per_step"):
                continue
            achieved = r["bytes_per_step"] / r["latency_s"]
            share = f" = {100 * achieved / bw:.0f}% of the {bw / 1e9:.1f} GB/s copy bandwidth" if bw else ""
            lines.append(f"roofline ({label}): {r['bytes_per_step'] / 1e6:.1f} MB of weights per token / "
                         f"{1000 * r['latency_s']:.2f} ms = {achieved / 1e9:.2f} GB/s{share}")
        paths = (row.get("compressed") or {}).get("paths") or {}
        if paths:
            ranked = sorted(paths.items(), key=lambda kv: -kv[1])
            lines.append("paths at M = 1: " + "; ".join(f"{n}× {p}" for p, n in ranked))
    return lines


def layer_table(report: BenchReport) -> Table:
    """Per block: weight bytes and, per phase, compressed / dense latency and their ratio."""
    t = Table(title=f"per layer ({report.device}; ms, medians)")
    t.add_column("layer")
    t.add_column("weights MB", justify="right")
    t.add_column("dense MB", justify="right")
    keys = [(r["phase"], r["tokens"]) for r in report.phases]
    for ph, tok in keys:
        t.add_column(_phase_name(ph, tok) + " (ratio)", justify="right")
    by_layer: dict[str, dict] = {}
    for r in report.layers:
        by_layer.setdefault(r["layer"], {})[(r["phase"], r["tokens"])] = r
    for name, per in by_layer.items():
        first = next(iter(per.values()))
        cells = []
        for k in keys:
            r = per.get(k)
            cells.append("—" if r is None else
                         f"{_ms(r['compressed_s'])} / {_ms(r['dense_s'])} ({_x(r['latency_ratio'])})")
        t.add_row(name, _mb(first["compressed_weight_bytes"]), _mb(first["dense_weight_bytes"]), *cells)
    return t
