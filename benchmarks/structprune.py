"""StructPrune on SmolLM2 under protocol brown-512 (JSON in benchmarks/results/structprune.json).

Sections (``--sections``, default all; rows already in the JSON are kept and skipped, and the
JSON is written after every row, so an interrupted run resumes):

* ``sweep`` — at 20, 30 and 50 % of the block linears' parameters removed, on the same
  calibration windows: StructPrune (energy-based softmax allocation + ADMM re-fit), uniform
  allocation + ADMM, uniform group-Wanda with no reconstruction, and the global threshold over
  all layers' standardized scores (+ ADMM). Each row: PPL, mean per-token KL(dense || pruned),
  top-1 agreement, parameters (block linears and whole model), bytes on disk, whole-process
  wall time and peak RSS of the ``compress prune`` run;
* ``bench`` — ``compress bench`` prefill (M = 512, CPU) of the 30 % StructPrune model vs dense;
* ``slicegpt`` — StructPrune against our SliceGPT at equal parameter count: SliceGPT's PPL
  interpolated (log PPL linear in parameters) from the rows of ``benchmarks/results/slicegpt.json``
  (same protocol and calibration windows; PPL does not depend on the machine).

Usage: python benchmarks/structprune.py [--sections sweep,bench,slicegpt] [--only NAME,...]
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
RATIOS = (0.2, 0.3, 0.5)
METHODS = {  # name → extra `compress prune` options
    "structprune": [],
    "uniform-admm": ["--allocation", "uniform"],
    "uniform-none": ["--allocation", "uniform", "--reconstruct", "none"],
    "global-admm": ["--allocation", "global"],
}
GLOBAL_TOLERANCE = 1.05  # StructPrune PPL ≤ 1.05 × the global threshold's (the paper: "matches")
BENCH_RATIO = 0.3


def block_linear_params(model: torch.nn.Module) -> int:
    """Parameters of the linears inside the decoder blocks (what --sparsity counts)."""
    return sum(m.weight.numel() for layer in model.model.layers for m in layer.modules()
               if isinstance(m, torch.nn.Linear))


def params_of(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied table once


def quality(out: Path, dense: torch.nn.Module, windows: torch.Tensor) -> dict:
    model = load(out)
    return {**scored(model, windows, dense),
            "params": params_of(model), "block_linear_params": block_linear_params(model),
            "bytes_on_disk": CheckpointReader(out).total_bytes()}


def sweep_row(src: Path, work: Path, name: str, opts: list[str], dense: torch.nn.Module,
              windows: torch.Tensor, dense_block: int) -> dict:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["prune", str(src), *opts]
    run = measured(compress_cmd(*cmd, "-o", str(out)), log=work / f"{name}.log")
    q = quality(out, dense, windows)
    q["removed_fraction"] = 1 - q["block_linear_params"] / dense_block
    if not name.endswith(f"-{int(BENCH_RATIO * 100)}") or not name.startswith("structprune"):
        shutil.rmtree(out, ignore_errors=True)  # the 30 % StructPrune model stays for the bench
    return {"name": name, "command": "compress " + " ".join(cmd).replace(str(src), "smollm2-135m"),
            **q, **run}


def store(res: dict) -> Path:
    return merge_save("structprune", res, nested={"sweep": ("name",), "commands": None})


def bench(src: Path, work: Path) -> dict:
    out = work / f"structprune-{int(BENCH_RATIO * 100)}"
    if not (out / "config.json").is_file():
        raise SystemExit(f"{out} is missing: run --sections sweep --only structprune-30 first")
    js = work / "bench.json"
    cmd = ["bench", str(out), "--against", str(src), "--seq", "512", "--decode-tokens", "0"]
    measured(compress_cmd(*cmd, "--json", str(js)), log=work / "bench.log")
    rep = json.loads(js.read_text())
    row = next(p for p in rep["phases"] if p["phase"] == "prefill" and p["tokens"] == 512)
    return {"command": "compress " + " ".join(cmd).replace(str(out), f"structprune-{int(BENCH_RATIO * 100)}")
            .replace(str(src), "smollm2-135m"),
            "tokens": 512, "pruned_s": row["compressed"]["latency_s"], "dense_s": row["dense"]["latency_s"],
            "latency_ratio": row["latency_ratio"], "pruned_peak_bytes": row["compressed"]["peak_bytes"],
            "dense_peak_bytes": row["dense"]["peak_bytes"], "peak_ratio": row["peak_ratio"],
            "repeats": rep.get("repeats"), "device": rep.get("device"), "machine": machine()}


def interpolate(points: list[tuple[int, float]], n: int) -> float | None:
    """log PPL linear in parameter count between the two measured points around ``n``."""
    pts = sorted(points)
    for (a, pa), (b, pb) in zip(pts, pts[1:], strict=False):
        if a <= n <= b:
            t = 0.0 if b == a else (n - a) / (b - a)
            return math.exp((1 - t) * math.log(pa) + t * math.log(pb))
    return None


def slicegpt(rows: list[dict]) -> dict:
    sg = json.loads((RESULTS / "slicegpt.json").read_text())
    pts = [(r["params"], r["ppl"]) for r in sg["sweep"] if r["name"].startswith("slice-")
           and not r["name"].endswith("gptq-w4g64") and r["name"] != "slice-10"]  # 10 % grows the model
    out = []
    for r in sorted((r for r in rows if r["name"].startswith("structprune-")), key=lambda r: r["params"]):
        s = interpolate(pts, r["params"])
        out.append({"name": r["name"], "params": r["params"], "structprune_ppl": r["ppl"], "slicegpt_ppl": s,
                    "ratio": None if s is None else r["ppl"] / s,
                    "better": None if s is None else ("structprune" if r["ppl"] < s else "slicegpt")})
    return {"source": "benchmarks/results/slicegpt.json sweep (slice-0, 20, 25, 30; slice-10 has more "
                      "parameters than dense and is left out)", "slicegpt_points": sorted(pts),
            "slicegpt_min_params": min(p for p, _ in pts), "rows": out}


def acceptance(rows: list[dict]) -> dict:
    by = {r["name"]: r for r in rows}
    out = {}
    for ratio in RATIOS:
        tag = int(ratio * 100)
        sp, uni, glo = (by.get(f"{m}-{tag}") for m in ("structprune", "uniform-admm", "global-admm"))
        if sp and uni and glo:
            out[str(tag)] = {"le_uniform": sp["ppl"] <= uni["ppl"],
                             "vs_global": sp["ppl"] / glo["ppl"],
                             "le_global_tol": sp["ppl"] <= GLOBAL_TOLERANCE * glo["ppl"],
                             "rss_vs_global": sp["peak_rss_bytes"] / glo["peak_rss_bytes"],
                             "wall_vs_global": sp["wall_s"] / glo["wall_s"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="sweep,bench,slicegpt")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--only", default=None, help="comma-separated sweep row names (e.g. structprune-30)")
    a = ap.parse_args()
    sections = set(a.sections.split(","))
    src = materialize("smollm2-135m")
    work = a.work or cache_dir() / "bench" / "structprune"
    work.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "structprune.json"
    res: dict = json.loads(path.read_text()) if path.is_file() else {}
    res.update({"machine": machine(), "protocol": PROTOCOL, "model": SMOLLM2_LABEL,
                "global_tolerance": GLOBAL_TOLERANCE})
    res.setdefault("commands", {})
    dense = load(src)
    windows = eval_token_windows(src, PROTOCOL, None)
    dense_block = block_linear_params(dense)
    if "dense" not in res:
        with torch.no_grad():
            s = score(dense, windows)
        res["dense"] = {"ppl": math.exp(s["nll"] / s["tokens"]), "params": params_of(dense),
                        "block_linear_params": dense_block, "bytes_on_disk": CheckpointReader(src).total_bytes()}
        store(res)
    if "sweep" in sections:
        res["commands"]["sweep"] = "python benchmarks/structprune.py --sections sweep"  # rows resume: --only reruns one
        rows = res.setdefault("sweep", [])
        for ratio in RATIOS:
            for method, opts in METHODS.items():
                name = f"{method}-{int(ratio * 100)}"
                if any(r["name"] == name for r in rows) or (a.only and name not in a.only.split(",")):
                    continue
                rows.append(sweep_row(src, work, name, ["--sparsity", str(ratio), *opts], dense, windows,
                                      dense_block))
                store(res)
                print(json.dumps(rows[-1]), flush=True)
        res["sweep"] = json.loads(path.read_text()).get("sweep", rows)
        res["acceptance"] = acceptance(res["sweep"])
        store(res)
    if "bench" in sections:
        res["commands"]["bench"] = "python benchmarks/structprune.py --sections bench"
        res["bench"] = bench(src, work)
        store(res)
        print("bench", res["bench"], flush=True)
    if "slicegpt" in sections:
        res["slicegpt"] = slicegpt(json.loads(path.read_text()).get("sweep", []))
        store(res)
    print(store(res))


if __name__ == "__main__":
    main()
