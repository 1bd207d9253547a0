"""NUPES power-exponent quantisation vs uniform RTN and GPTQ on SmolLM2-135M (brown-512), one run.

Rows (every command through the CLI, every output scored by ``compress.load``; group 64):

* ``rtn-w3`` / ``rtn-w4`` — uniform symmetric RTN (``--method rtn``);
* ``nupes-df-w3`` / ``nupes-df-w4`` — data-free NUPES (``--grid power``: the exponent per linear
  searched on the weight error, then round to nearest on the power grid);
* ``nupes-df-channel-w3`` — the same with one exponent per output channel;
* ``gptq-w3`` / ``gptq-w4`` — uniform GPTQ (``compress quantize`` defaults);
* ``nupes-gptq-w3`` — GPTQ on the power grid, no learning (``--init gptq``);
* ``nupes-learn-w3`` / ``nupes-learn-w4`` — learned NUPES from GPTQ codes (``--init gptq --learn``,
  the learner's defaults).

Per row: PPL, KL and top-1 agreement to the dense model on the brown-512 evaluation windows,
bytes on disk (the lookup tables included: they are stored tensors), whole-process wall time
and peak RSS; learned rows add the wall time per block (from the per-module report).
``bench``: ``compress bench`` decode and prefill of the learned NUPES W4 model against the
uniform GPTQ W4 model (CPU, torch twin). Acceptance: ``acceptance``.

Usage: python benchmarks/nupes.py [--only ROW,...] [--sections rows,bench] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the checkout, not benchmarks/ (its kernels.py would shadow the PyPI package transformers imports)

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    RESULTS, SMOLLM2_LABEL, compress_cmd, machine, measured, merge_save, scored)
from compress.api import load  # noqa: E402
from compress.assets import cache_dir, materialize  # noqa: E402
from compress.checkpoint import CheckpointReader  # noqa: E402
from compress.eval import eval_token_windows, score  # noqa: E402

PROTOCOL = "brown-512"
LEARN_W3_TARGET = 0.95  # learned NUPES W3 PPL ≤ 0.95 × GPTQ W3's
ROWS = {  # name → `compress quantize` options after the model (run in this order)
    "gptq-w3": ["--bits", "3"],
    "nupes-learn-w3": ["--bits", "3", "--grid", "power", "--init", "gptq", "--learn"],
    "rtn-w3": ["--method", "rtn", "--bits", "3"],
    "nupes-df-w3": ["--bits", "3", "--grid", "power"],
    "rtn-w4": ["--method", "rtn", "--bits", "4"],
    "nupes-df-w4": ["--bits", "4", "--grid", "power"],
    "gptq-w4": ["--bits", "4"],
    "nupes-learn-w4": ["--bits", "4", "--grid", "power", "--init", "gptq", "--learn"],
    "nupes-df-channel-w3": ["--bits", "3", "--grid", "power", "--exponent", "channel"],
    "nupes-gptq-w3": ["--bits", "3", "--grid", "power", "--init", "gptq"],
}
KEEP = ("gptq-w4", "nupes-learn-w4")  # served by the bench section
GROUP = ["--group-size", "64"]


def per_block(out: Path) -> dict:
    """Wall seconds per block (the per-module times of a block sum to the block's) and exponents."""
    rows = json.loads((out / "reports" / "report.json").read_text())
    rows = rows["layers"] if isinstance(rows, dict) else rows
    blocks: dict[int, float] = {}
    exps = []
    for r in rows:
        blocks[r["layer"]] = blocks.get(r["layer"], 0.0) + r["time_s"]
        if "exponent" in (r.get("extra") or {}):
            exps.append(r["extra"]["exponent"])
    times = sorted(blocks.values())
    out_d = {"blocks": len(times), "block_s_mean": sum(times) / len(times), "block_s_max": times[-1],
             "blocks_s_total": sum(times)}
    if exps:
        out_d["exponent_min"], out_d["exponent_max"] = min(exps), max(exps)
        out_d["exponent_mean"] = sum(exps) / len(exps)
    return out_d


def run_row(src: Path, work: Path, name: str, opts: list[str], dense: torch.nn.Module, windows: torch.Tensor) -> dict:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["quantize", str(src), *opts, *GROUP]
    run = measured(compress_cmd(*cmd, "-o", str(out)), log=work / f"{name}.log")
    if not (out / "config.json").is_file():
        raise SystemExit(f"{name} failed: see {work / f'{name}.log'}")
    row = {"name": name, "command": "compress " + " ".join(cmd).replace(str(src), "smollm2-135m"),
           **scored(load(out), windows, dense), "bytes_on_disk": CheckpointReader(out).total_bytes(), **run,
           "timing": per_block(out)}
    if name not in KEEP:
        shutil.rmtree(out, ignore_errors=True)
    return row


def bench(work: Path) -> dict:
    """Decode and prefill of the learned NUPES W4 model against the uniform GPTQ W4 model."""
    new, ref = work / "nupes-learn-w4", work / "gptq-w4"
    for p in (new, ref):
        if not (p / "config.json").is_file():
            raise SystemExit(f"{p} is missing: run --only {p.name} first")
    js = work / "bench.json"
    cmd = ["bench", str(new), "--against", str(ref), "--seq", "512", "--decode-tokens", "16"]
    measured(compress_cmd(*cmd, "--json", str(js)), log=work / "bench.log")
    rep = json.loads(js.read_text())
    phases = [{"phase": p["phase"], "tokens": p["tokens"], "nupes_s": p["compressed"]["latency_s"],
               "uniform_s": p["dense"]["latency_s"], "latency_ratio": p["latency_ratio"]}
              for p in rep["phases"]]
    return {"command": "compress " + " ".join(cmd).replace(str(new), "nupes-learn-w4").replace(str(ref), "gptq-w4"),
            "phases": phases, "repeats": rep.get("repeats"), "device": rep.get("device"),
            "served_by": "CPU, torch twin (lut and quant kinds)", "machine": machine()}


def acceptance(rows: list[dict]) -> dict:
    by = {r["name"]: r for r in rows}
    out: dict = {}
    for b in (3, 4):
        if {f"nupes-df-w{b}", f"rtn-w{b}"} <= by.keys():
            n, r = by[f"nupes-df-w{b}"], by[f"rtn-w{b}"]
            out[f"data_free_w{b}"] = {"ppl_ratio_vs_rtn": n["ppl"] / r["ppl"], "beats_rtn": n["ppl"] < r["ppl"],
                                      "bytes_ratio": n["bytes_on_disk"] / r["bytes_on_disk"]}
        if {f"nupes-learn-w{b}", f"gptq-w{b}"} <= by.keys():
            n, g = by[f"nupes-learn-w{b}"], by[f"gptq-w{b}"]
            target = LEARN_W3_TARGET if b == 3 else 1.0
            out[f"learned_w{b}"] = {"ppl_ratio_vs_gptq": n["ppl"] / g["ppl"], "target": target,
                                    "met": n["ppl"] <= target * g["ppl"],
                                    "bytes_ratio": n["bytes_on_disk"] / g["bytes_on_disk"]}
    return out


def store(res: dict) -> Path:
    return merge_save("nupes", res, nested={"rows": ("name",), "commands": None})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--only", default=None, help="comma-separated row names to (re)measure")
    ap.add_argument("--sections", default="rows,bench")
    a = ap.parse_args()
    sections = set(a.sections.split(","))
    src = materialize("smollm2-135m")
    work = a.work or cache_dir() / "bench" / "nupes"
    work.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "nupes.json"
    res: dict = json.loads(path.read_text()) if path.is_file() else {}
    res.update({"machine": machine(), "protocol": PROTOCOL, "model": SMOLLM2_LABEL,
                "targets": {"learned_w3_ppl_ratio": LEARN_W3_TARGET, "learned_w4_ppl_ratio": 1.0}})
    res.setdefault("commands", {})
    if "rows" in sections:
        res["commands"]["rows"] = "python benchmarks/nupes.py --sections rows"
        dense = load(src)
        windows = eval_token_windows(src, PROTOCOL, None)
        if "dense" not in res:
            with torch.no_grad():
                s = score(dense, windows)
            res["dense"] = {"ppl": math.exp(s["nll"] / s["tokens"]),
                            "bytes_on_disk": CheckpointReader(src).total_bytes()}
            store(res)
        only = set(a.only.split(",")) if a.only else set(ROWS)
        rows = {r["name"]: r for r in res.get("rows", [])}
        for name, opts in ROWS.items():
            if name not in only:
                continue
            rows[name] = run_row(src, work, name, opts, dense, windows)
            print(name, {k: rows[name][k] for k in ("ppl", "kl", "bytes_on_disk", "wall_s")}, flush=True)
            res["rows"] = [rows[n] for n in ROWS if n in rows]
            res["acceptance"] = acceptance(res["rows"])
            store(res)
    if "bench" in sections:
        res["commands"]["bench"] = "python benchmarks/nupes.py --sections bench"
        res["bench"] = bench(work)
        print("bench", res["bench"], flush=True)
        store(res)
    print(json.dumps(res.get("acceptance", {}), indent=2))


if __name__ == "__main__":
    main()
