"""BAQ bit allocation vs uniform GPTQ on SmolLM2-135M (brown-512), one calibration, one run.

Rows (every command through the CLI, every output scored by ``compress.load``):

* ``gptq-w2``, ``gptq-w3``, ``gptq-w4`` — uniform GPTQ, group 64 (the defaults of ``compress quantize``);
* ``baq-3.0``, ``baq-2.5``, ``baq-4.0`` — ``--allocate baq`` at that average (widths 2/3/4/8 per
  group of 64 columns); 3.0 and 2.5 share the scan at the reference width 3 (the second reads it
  from the work store), 4.0 scans at 4;
* ``baq-3.0-rows`` — one width per block of 64 output rows instead of per column group;
* ``baq-3.0-model-relative`` — the closed form across layers on losses relative to each group's
  output energy (the default balances inside each fused group, as the paper).

``kernel_split``: CPU latency of a mixed-width linear (a sum of per-width matmuls) against one
width at the same shape. Per row: PPL, KL and top-1 agreement to the dense model on the brown-512 evaluation windows,
bytes on disk, wall time and peak RSS of the command; for BAQ rows the realised average (asserted
within ±0.01 of the budget) and the correlation over fused groups of log predicted loss
(``Σ n_g c_g 2^(−θ b_g)``) with log measured OBS loss in the apply. Acceptance: ``acceptance``.

Usage: python benchmarks/baq.py [--only ROW,...] [--work DIR]
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
from compress.passes.baq import UnitPlan, log_correlation  # noqa: E402
from compress.passes.quantize import GPTQConfig  # noqa: E402

PROTOCOL = "brown-512"
BUDGET_TOLERANCE = 0.01
W3_TARGET = 0.85  # BAQ-3.0 PPL ≤ 0.85 × uniform W3's
BYTES_TOLERANCE = 0.01  # ... at bytes within 1 % of uniform W3's
DEFAULT_SCOPE = GPTQConfig.model_fields["scope"].default
ROWS = {  # name → `compress quantize` options after the model
    "gptq-w3": ["--bits", "3"],
    "baq-3.0": ["--bits", "3", "--allocate", "baq"],
    "baq-2.5": ["--bits", "3", "--allocate", "baq", "--average-bits", "2.5"],
    "baq-3.0-rows": ["--bits", "3", "--allocate", "baq", "--granularity", "rows"],
    "baq-3.0-model-relative": ["--bits", "3", "--allocate", "baq", "--scope", "model-relative"],
    "gptq-w2": ["--bits", "2"],
    "gptq-w4": ["--bits", "4"],
    "baq-4.0": ["--bits", "4", "--allocate", "baq"],
}
GROUP = ["--group-size", "64"]


def quality(out: Path, dense: torch.nn.Module, windows: torch.Tensor) -> dict:
    model = load(out)
    return {**scored(model, windows, dense),
            "bytes_on_disk": CheckpointReader(out).total_bytes()}


def allocation(out: Path) -> dict:
    """The plan's realised average and widths, and predicted-vs-measured loss per fused group."""
    plan = json.loads((out / "plan.json").read_text())
    rows = json.loads((out / "reports" / "report.json").read_text())
    rows = rows["layers"] if isinstance(rows, dict) else rows
    seen: dict[tuple[int, str], tuple[float, float]] = {}
    for r in rows:
        x = r.get("extra") or {}
        if "predicted_loss" in x:  # siblings of one fused group carry the same pair: count it once
            seen.setdefault((r["layer"], str(x["predicted_loss"])), (x["predicted_loss"], x["measured_loss"]))
    pred, meas = zip(*seen.values(), strict=True) if seen else ((), ())
    weights: dict[str, int] = {}
    for u in (UnitPlan.model_validate(x) for x in plan["units"]):
        if u.row_bits is not None:  # row blocks: every row's width times its columns
            for b in u.row_widths():
                weights[str(b)] = weights.get(str(b), 0) + u.in_features
        for g, b in enumerate(u.group_bits):
            cols = min(u.group_width, u.in_features - g * u.group_width)
            weights[str(b)] = weights.get(str(b), 0) + cols * u.rows
    return {"budget": plan["budget"], "realized": plan["realized"], "scope": plan["scope"],
            "repair_moves": plan["repair_moves"], "weights_per_width": dict(sorted(weights.items())),
            "predicted_total": plan["predicted_loss"], "uniform_predicted_total": plan["uniform_predicted_loss"],
            "loss_log_correlation": log_correlation(list(pred), list(meas)), "groups_correlated": len(seen)}


def run_row(src: Path, work: Path, name: str, opts: list[str], dense: torch.nn.Module, windows: torch.Tensor) -> dict:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["quantize", str(src), *opts, *GROUP]
    run = measured(compress_cmd(*cmd, "-o", str(out)), log=work / f"{name}.log")
    row = {"name": name, "command": "compress " + " ".join(cmd).replace(str(src), "smollm2-135m"),
           **quality(out, dense, windows), **run}
    if "--allocate" in opts:
        row["allocation"] = allocation(out)
        budget = row["allocation"]["budget"]
        assert abs(row["allocation"]["realized"] - budget) <= BUDGET_TOLERANCE, row["allocation"]
    shutil.rmtree(out, ignore_errors=True)
    return row


def interpolate_bytes(a: dict, b: dict, nbytes: int) -> float:
    """log PPL linear in bytes between rows ``a`` and ``b`` at ``nbytes``."""
    t = (nbytes - a["bytes_on_disk"]) / (b["bytes_on_disk"] - a["bytes_on_disk"])
    return math.exp((1 - t) * math.log(a["ppl"]) + t * math.log(b["ppl"]))


def acceptance(rows: list[dict]) -> dict:
    by = {r["name"]: r for r in rows}
    out: dict = {}
    if {"baq-3.0", "gptq-w3"} <= by.keys():
        b, u = by["baq-3.0"], by["gptq-w3"]
        out["3.0"] = {"ppl_ratio": b["ppl"] / u["ppl"], "le_target": b["ppl"] <= W3_TARGET * u["ppl"],
                      "bytes_ratio": b["bytes_on_disk"] / u["bytes_on_disk"],
                      "bytes_within": abs(b["bytes_on_disk"] / u["bytes_on_disk"] - 1) <= BYTES_TOLERANCE}
    if {"baq-2.5", "gptq-w2", "gptq-w3"} <= by.keys():
        b = by["baq-2.5"]
        ref = interpolate_bytes(by["gptq-w2"], by["gptq-w3"], b["bytes_on_disk"])
        out["2.5"] = {"interpolated_ppl": ref, "ppl_ratio": b["ppl"] / ref, "beats": b["ppl"] < ref}
    if {"baq-4.0", "gptq-w4"} <= by.keys():
        b, u = by["baq-4.0"], by["gptq-w4"]
        out["4.0"] = {"ppl_ratio": b["ppl"] / u["ppl"], "le_uniform": b["ppl"] <= u["ppl"],
                      "bytes_ratio": b["bytes_on_disk"] / u["bytes_on_disk"]}
    out["budgets_met"] = all(abs(r["allocation"]["realized"] - r["allocation"]["budget"]) <= BUDGET_TOLERANCE
                             for r in rows if "allocation" in r)
    return out


def kernel_split(repeats: int = 7) -> dict:
    """CPU (torch twin) latency of one mixed-width linear — a sum of per-width quantised matmuls,
    one range per width — against one single-width linear of the same shape and average bits
    (SmolLM2's down_proj, 576 × 1536, g64): what splitting the columns by width costs."""
    import time

    from benchmarks.common import median
    from compress.algos.gptq import gptq_quantize, gptq_quantize_mixed
    from compress.algos.quant import QuantSpec
    from compress.modules import MixedQuantLinear, QuantLinear

    g = torch.Generator().manual_seed(0)
    out_f, in_f = 576, 1536
    W = torch.randn(out_f, in_f, generator=g) * 0.02
    X = torch.randn(2048, in_f, generator=g, dtype=torch.float64)
    H = X.T @ X / 2048
    widths = [8] * 2 + [4] * 4 + [3] * 10 + [2] * 8  # 24 groups of 64, average 3.0
    mixed, _ = gptq_quantize_mixed(W, H, QuantSpec(3, 64), widths, act_order=True)
    lin_mixed = MixedQuantLinear.from_quantized(mixed.parts, None, mixed.perm)
    lin_one = QuantLinear.from_quantized(gptq_quantize(W, H, QuantSpec(3, 64), act_order=True)[0], None)

    def latency(mod: torch.nn.Module, m: int) -> float:
        x = torch.randn(m, in_f, generator=g)
        with torch.no_grad():
            mod(x)  # warm-up (decoded-weight caches, allocator)
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                mod(x)
                ts.append(time.perf_counter() - t0)
        return median(ts)

    rows = []
    for m in (1, 512):
        a, b = latency(lin_mixed, m), latency(lin_one, m)
        rows.append({"m": m, "mixed_s": a, "single_s": b, "ratio": a / b})
    return {"shape": [out_f, in_f], "group_size": 64, "widths": {"8": 2, "4": 4, "3": 10, "2": 8},
            "served_by": "CPU, torch twin", "threads": torch.get_num_threads(), "repeats": repeats,
            "rows": rows, "machine": machine()}


def store(res: dict) -> Path:
    return merge_save("baq", res, nested={"rows": ("name",), "commands": None})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--only", default=None, help="comma-separated row names to (re)measure (e.g. baq-3.0)")
    a = ap.parse_args()
    src = materialize("smollm2-135m")
    work = a.work or cache_dir() / "bench" / "baq"
    work.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "baq.json"
    res: dict = json.loads(path.read_text()) if path.is_file() else {}
    res.update({"machine": machine(), "protocol": PROTOCOL, "model": SMOLLM2_LABEL, "default_scope": DEFAULT_SCOPE,
                "targets": {"w3_ppl_ratio": W3_TARGET, "bytes_tolerance": BYTES_TOLERANCE,
                            "budget_tolerance": BUDGET_TOLERANCE}})
    res.setdefault("commands", {})["run"] = "python benchmarks/baq.py"
    dense = load(src)
    windows = eval_token_windows(src, PROTOCOL, None)
    if "dense" not in res:
        with torch.no_grad():
            s = score(dense, windows)
        res["dense"] = {"ppl": math.exp(s["nll"] / s["tokens"]), "bytes_on_disk": CheckpointReader(src).total_bytes()}
        store(res)
    rows = res.setdefault("rows", [])
    only = set(a.only.split(",")) if a.only else None
    for name, opts in ROWS.items():
        if only is not None:
            if name not in only:
                continue
            rows[:] = [r for r in rows if r["name"] != name]
        elif any(r["name"] == name for r in rows):
            continue
        rows.append(run_row(src, work, name, opts, dense, windows))
        store(res)
        print(json.dumps(rows[-1]), flush=True)
    res["rows"] = rows
    res["acceptance"] = acceptance(rows)
    if only is None or "kernel" in only:
        res["kernel_split"] = kernel_split()
    print(store(res))


if __name__ == "__main__":
    main()
