"""FlatQuant W4A4 KV4 vs its baselines on SmolLM2-135M (brown-512), and serving cost.

Rows (every one a CLI command, every output scored through ``compress.load``):

* ``flatquant-w4a4kv4`` — ``compress quantize --bits 4 --act-bits 4 --kv-bits 4 --transform
  flatquant`` with the reference's training defaults (15 epochs, lr 5e-3, batch 4);
* ``hadamard-w4a4kv4`` — fixed random Hadamard rotations at the same sites (QuaRot-style);
* ``smooth-w4a4kv4`` — SmoothQuant scaling only (α 0.5); ``rtn-w4a4kv4`` — no transform;
* ``rtn-w4a8`` / ``hadamard-w4a8`` — 8-bit activations, dense KV cache;
* ``gptq-w4a16`` — weight-only GPTQ W4 (g64, the tool's default), for reference.

Per row: PPL, KL and top-1 agreement against the dense model, bytes, wall time and peak RSS of
the whole process, and for FlatQuant the per-block training seconds and loss before/after (from
the output's report). Then ``compress bench`` of the FlatQuant output against the dense model
(prefill and decode latency, peak memory; the CPU twin on this machine). Acceptance:
``acceptance``.

Usage: python benchmarks/flatquant.py [--only ROW,...] [--work DIR] [--no-bench]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the checkout, not benchmarks/

import torch  # noqa: E402

from benchmarks.common import (RESULTS, SMOLLM2_LABEL, compress_cmd, ensure_dense, machine, measured,  # noqa: E402
                               merge_save, rows_to_run, scored)
from compress.api import load  # noqa: E402
from compress.assets import cache_dir, materialize  # noqa: E402
from compress.checkpoint import CheckpointReader  # noqa: E402
from compress.eval import eval_token_windows  # noqa: E402

PROTOCOL = "brown-512"
W4A4KV4 = ["--bits", "4", "--act-bits", "4", "--kv-bits", "4"]
ROWS: dict[str, list[str]] = {  # the peers of the acceptance first, then FlatQuant, then the rest
    "hadamard-w4a4kv4": [*W4A4KV4, "--transform", "hadamard"],
    "rtn-w4a4kv4": [*W4A4KV4, "--transform", "none"],
    # 32 of the protocol's 128 calibration windows (protocol brown-512-c32): 15 epochs of 128 windows
    # take about 2.5 h on this 2-core CPU, 32 windows about 40 min
    "flatquant-w4a4kv4-c32": [*W4A4KV4, "--transform", "flatquant", "--n-samples", "32"],
    "smooth-w4a4kv4": [*W4A4KV4, "--transform", "smooth"],
    "rtn-w4a8": ["--bits", "4", "--act-bits", "8", "--transform", "none"],
    "hadamard-w4a8": ["--bits", "4", "--act-bits", "8", "--transform", "hadamard"],
    "gptq-w4a16": ["--method", "gptq", "--bits", "4"],
    "flatquant-w4a4kv4": [*W4A4KV4, "--transform", "flatquant"],  # the full protocol
}
FLATQUANT_ROWS = ("flatquant-w4a4kv4", "flatquant-w4a4kv4-c32")  # their outputs stay for compress bench


def training(out: Path) -> dict | None:
    """Per-block training seconds and block MSE before/after, from the output's report."""
    recs = json.loads((out / "reports" / "report.json").read_text())
    blocks: dict[int, dict] = {}
    for r in recs:
        e = r.get("extra") or {}
        if "train_s" in e:
            blocks[r["layer"]] = {"train_s": e["train_s"], "mse_before": e["block_mse_before"],
                                  "mse_after": e["block_mse_after"], "block_s": 0.0}
    for r in recs:
        if r["layer"] in blocks:
            blocks[r["layer"]]["block_s"] += r["time_s"]
    if not blocks:
        return None
    per = [blocks[i] for i in sorted(blocks)]
    return {"blocks": per, "block_s_median": statistics.median(b["block_s"] for b in per),
            "train_s_total": sum(b["train_s"] for b in per), "block_s_total": sum(b["block_s"] for b in per)}


def run_row(src: Path, work: Path, name: str, opts: list[str], dense: torch.nn.Module,
            windows: torch.Tensor) -> dict:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["quantize", str(src), *opts]
    run = measured(compress_cmd(*cmd, "-o", str(out)), log=work / f"{name}.log")
    row = {"name": name, "command": "compress " + " ".join(cmd).replace(str(src), "smollm2-135m"),
           **scored(load(out), windows, dense), "bytes_on_disk": CheckpointReader(out).total_bytes(), **run}
    row["calibration"] = (json.loads((out / "compression.json").read_text()).get("calibration") or {}).get("protocol")
    t = training(out)
    if t is not None:
        row["training"] = t
    if name not in FLATQUANT_ROWS:
        shutil.rmtree(out, ignore_errors=True)
    return row


def bench(work: Path, src: Path) -> dict | None:
    """``compress bench`` of a FlatQuant output (the full protocol's when it exists): serving cost
    does not depend on how the transforms were calibrated."""
    out = next((work / n for n in FLATQUANT_ROWS if (work / n).is_dir()), None)
    if out is None:
        return None
    target = work / "bench.json"
    cmd = compress_cmd("bench", str(out), "--against", str(src), "--seq", "512", "--decode-tokens", "32",
                       "--json", str(target))
    run = measured(cmd, log=work / "bench.log")
    if not target.is_file():
        return {"error": "compress bench wrote no JSON", **run}
    return {"command": f"compress bench out/{out.name} --against smollm2-135m --seq 512 --decode-tokens 32",
            "result": json.loads(target.read_text())}


def acceptance(res: dict) -> dict:
    """Per FlatQuant row: its PPL against dense, and its ratio to each peer against the limit."""
    by = {r["name"]: r for r in res.get("rows", [])}
    dense = res["dense"]["ppl"]
    out: dict = {}
    for name in FLATQUANT_ROWS:
        fq = by.get(name)
        if fq is None:
            continue
        peers = {}
        for peer, limit in (("hadamard-w4a4kv4", 0.7), ("rtn-w4a4kv4", 0.5)):
            if peer in by:
                ratio = fq["ppl"] / by[peer]["ppl"]
                peers[peer] = {"ppl": by[peer]["ppl"], "ratio": ratio, "limit": limit, "met": ratio <= limit}
        out[name] = {"calibration": fq.get("calibration"), "ppl": fq["ppl"], "ratio_to_dense": fq["ppl"] / dense,
                     "peers": peers}
    return out


def store(res: dict) -> Path:
    return merge_save("flatquant", res, nested={"rows": ("name",), "commands": None})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--only", default=None, help="comma-separated row names to (re)measure")
    ap.add_argument("--no-bench", action="store_true", help="skip compress bench")
    a = ap.parse_args()
    src = materialize("smollm2-135m")
    work = a.work or cache_dir() / "bench" / "flatquant"
    work.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "flatquant.json"
    res: dict = json.loads(path.read_text()) if path.is_file() else {}
    res.update({"machine": machine(), "protocol": PROTOCOL, "model": SMOLLM2_LABEL,
                "targets": {"vs_hadamard": 0.7, "vs_rtn": 0.5}})
    res.setdefault("commands", {})["run"] = "python benchmarks/flatquant.py"
    dense = load(src)
    windows = eval_token_windows(src, PROTOCOL, None)
    ensure_dense(res, dense, src, windows, store)
    rows = res.setdefault("rows", [])
    for name in rows_to_run(list(ROWS), rows, a.only):
        rows.append(run_row(src, work, name, ROWS[name], dense, windows))
        res["acceptance"] = acceptance(res)
        store(res)
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "training"}), flush=True)
    if not a.no_bench:
        b = bench(work, src)
        if b is not None:
            res["bench"] = b
    res["acceptance"] = acceptance(res)
    print(store(res))


if __name__ == "__main__":
    main()
