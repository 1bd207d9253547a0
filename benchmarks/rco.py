"""RCO (``compress allocate``) vs BAQ, uniform GPTQ and a greedy knapsack on SmolLM2-135M (brown-512).

Rows (every one a CLI command, every output scored through ``compress.load``):

* ``rco-B`` — ``compress allocate --budget Bbits --options gptq:2,3,4,8`` (g64), the KL objective;
* ``greedy-B`` — ``--search greedy`` on the same candidate database (error-per-bit upgrades);
* ``uniform-W`` — ``--search uniform``: every group at W bits from the same database (GPTQ on the
  dense Hessians); at 2.5 and 3.5 the byte-matched interpolation of the neighbours (log PPL linear
  in bytes) stands in;
* ``baq-B`` — ``compress quantize --bits 3 --allocate baq --average-bits B`` (g64; true-sequential
  GPTQ, widths per group of 64 columns);
* ``mixed-3.0`` — options gptq:2,3,4,8 plus lowrank:0.1,0.2 at the byte budget of ``uniform-3``.

The candidate database is scanned once (the first allocate row; later rows read it from the work
store): its per-option solve seconds are summed from the database itself. Per RCO row: realised
average bits, |avg − B|, seconds per optimisation step and in total, and the final KL on the
objective's windows. Acceptance: ``acceptance``.

Usage: python benchmarks/rco.py [--only ROW,...] [--work DIR]
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

from benchmarks.common import RESULTS, SMOLLM2_LABEL, compress_cmd, machine, measured, merge_save, scored  # noqa: E402
from compress.api import load  # noqa: E402
from compress.assets import cache_dir, materialize  # noqa: E402
from compress.checkpoint import CheckpointReader  # noqa: E402
from compress.eval import eval_token_windows, score  # noqa: E402

PROTOCOL = "brown-512"
BITS_TOLERANCE = 1e-3
GROUP = ["--group-size", "64"]
OPTIONS = ["--options", "gptq:2,3,4,8"]
STEPS = ["--steps", "60"]  # 60 steps × ~5 s on this 2-core CPU (the default is 100)
BUDGETS = ("2.5", "3.0", "3.5")


def _rows() -> dict[str, tuple[str, list[str]]]:
    rows: dict[str, tuple[str, list[str]]] = {}
    for b in ("3.0", "2.5", "3.5"):
        rows[f"rco-{b}"] = ("allocate", ["--budget", f"{b}bits", *OPTIONS, *STEPS])
        if b == "3.0":
            rows["uniform-3"] = ("allocate", ["--budget", "3bits", *OPTIONS, "--search", "uniform"])
        rows[f"greedy-{b}"] = ("allocate", ["--budget", f"{b}bits", *OPTIONS, "--search", "greedy"])
        rows[f"baq-{b}"] = ("quantize", ["--bits", "3", "--allocate", "baq", "--average-bits", b])
        if b == "2.5":
            rows["uniform-2"] = ("allocate", ["--budget", "2bits", *OPTIONS, "--search", "uniform"])
        if b == "3.5":
            rows["uniform-4"] = ("allocate", ["--budget", "4bits", *OPTIONS, "--search", "uniform"])
    rows["rco-3.0-lr0.3"] = ("allocate", ["--budget", "3.0bits", *OPTIONS, *STEPS, "--lr", "0.3"])  # ablation
    rows["mixed-3.0"] = ("allocate", ["--budget", "MIXED", *OPTIONS, "--options", "lowrank:0.1,0.2", *STEPS])
    return rows


def assignment(out: Path) -> dict:
    a = json.loads((out / "assignment.json").read_text())
    keep = ("search", "budget", "target", "realized_average_bits", "realized_stored_bits", "realized_bytes", "exact",
            "steps", "seconds_per_step", "optimize_seconds", "objective_setup_seconds", "final_loss")
    row = {k: a.get(k) for k in keep}
    total = sum(g["weights"] for g in a["groups"])
    shares: dict[str, float] = {}
    for g in a["groups"]:
        shares[g["option"]] = shares.get(g["option"], 0.0) + g["weights"] / total
    row["shares"] = dict(sorted(shares.items()))
    if a.get("history"):
        row["first_loss"] = a["history"][0]["loss"]
        row["max_cost_error"] = max(h["cost_error"] for h in a["history"])
    return row


def database_seconds(out: Path) -> dict | None:
    """The candidate database's per-option solve seconds (summed over groups), read from the
    work store entry the run used."""
    from compress.passes.rco import RCOConfig, RCOPass
    from compress.pipeline.stats import stats_key
    from compress.store import WorkStore
    from compress.recipe import load_recipe

    recipe = load_recipe(out / "recipe.yaml")
    cfg = recipe.stages[0].config
    assert isinstance(cfg, RCOConfig)
    p = RCOPass(cfg)
    store = WorkStore()
    calib = (json.loads((out / "compression.json").read_text()).get("calibration") or {}).get("fingerprint")
    if calib is None:
        return None
    key, _ = stats_key(p.statistic(), store.checkpoint_hash(materialize("smollm2-135m")), calib)
    per: dict[str, float] = {}
    for i in range(10_000):
        block = store.get(key, f"block-{i:04d}")
        if block is None:
            break
        for k, v in block.items():
            if k.endswith(".seconds"):
                for opt, s in zip([o.label for o in cfg.parsed_options()], v.tolist(), strict=True):
                    per[opt] = per.get(opt, 0.0) + s
    return {"per_option_s": per, "total_s": sum(per.values())} if per else None


def run_row(src: Path, work: Path, name: str, command: str, opts: list[str], dense: torch.nn.Module,
            windows: torch.Tensor, rows: list[dict]) -> dict:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    if "MIXED" in opts:
        u3 = next(r for r in rows if r["name"] == "uniform-3")
        opts = [f"{u3['assignment']['realized_bytes']}B" if o == "MIXED" else o for o in opts]
    cmd = [command, str(src), *opts, *GROUP]
    run = measured(compress_cmd(*cmd, "-o", str(out)), log=work / f"{name}.log")
    row = {"name": name, "command": "compress " + " ".join(cmd).replace(str(src), "smollm2-135m"),
           **scored(load(out), windows, dense), "bytes_on_disk": CheckpointReader(out).total_bytes(), **run}
    if command == "allocate":
        row["assignment"] = assignment(out)
        if name == "rco-3.0" or not any("database" in r for r in rows):
            db = database_seconds(out)
            if db is not None:
                row["database"] = db
    shutil.rmtree(out, ignore_errors=True)
    return row


def interpolate_bytes(a: dict, b: dict, nbytes: int) -> float:
    t = (nbytes - a["bytes_on_disk"]) / (b["bytes_on_disk"] - a["bytes_on_disk"])
    return math.exp((1 - t) * math.log(a["ppl"]) + t * math.log(b["ppl"]))


def acceptance(rows: list[dict]) -> dict:
    by = {r["name"]: r for r in rows}
    out: dict = {}
    for b in BUDGETS:
        r = by.get(f"rco-{b}")
        if r is None:
            continue
        peers: dict[str, float] = {}
        for peer in (f"baq-{b}", f"greedy-{b}"):
            if peer in by:
                peers[peer] = by[peer]["ppl"]
        if b == "3.0" and "uniform-3" in by:
            peers["uniform-3"] = by["uniform-3"]["ppl"]
        lo, hi = {"2.5": ("uniform-2", "uniform-3"), "3.5": ("uniform-3", "uniform-4")}.get(b, (None, None))
        if lo in by and hi in by:
            peers["uniform (byte-matched)"] = interpolate_bytes(by[lo], by[hi], r["bytes_on_disk"])
        avg = r["assignment"]["realized_average_bits"]
        out[b] = {"rco_ppl": r["ppl"], "peers": peers,
                  "ratio_to_best_peer": r["ppl"] / min(peers.values()) if peers else None,
                  "le_every_peer": all(r["ppl"] <= v for v in peers.values()) if peers else None,
                  "budget_error_bits": abs(avg - float(b)), "budget_met": abs(avg - float(b)) <= BITS_TOLERANCE}
    if "mixed-3.0" in by and "rco-3.0" in by:
        out["mixed"] = {"mixed_ppl": by["mixed-3.0"]["ppl"], "bits_only_ppl": by["rco-3.0"]["ppl"],
                        "beats_bits_only": by["mixed-3.0"]["ppl"] < by["rco-3.0"]["ppl"]}
    return out


def store(res: dict) -> Path:
    return merge_save("rco", res, nested={"rows": ("name",), "commands": None})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--only", default=None, help="comma-separated row names to (re)measure (e.g. rco-3.0)")
    a = ap.parse_args()
    src = materialize("smollm2-135m")
    work = a.work or cache_dir() / "bench" / "rco"
    work.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "rco.json"
    res: dict = json.loads(path.read_text()) if path.is_file() else {}
    res.update({"machine": machine(), "protocol": PROTOCOL, "model": SMOLLM2_LABEL,
                "targets": {"budget_tolerance_bits": BITS_TOLERANCE}})
    res.setdefault("commands", {})["run"] = "python benchmarks/rco.py"
    dense = load(src)
    windows = eval_token_windows(src, PROTOCOL, None)
    if "dense" not in res:
        with torch.no_grad():
            s = score(dense, windows)
        res["dense"] = {"ppl": math.exp(s["nll"] / s["tokens"]), "bytes_on_disk": CheckpointReader(src).total_bytes()}
        store(res)
    rows = res.setdefault("rows", [])
    only = set(a.only.split(",")) if a.only else None
    for name, (command, opts) in _rows().items():
        if only is not None:
            if name not in only:
                continue
            rows[:] = [r for r in rows if r["name"] != name]
        elif any(r["name"] == name for r in rows):
            continue
        rows.append(run_row(src, work, name, command, opts, dense, windows, rows))
        res["acceptance"] = acceptance(rows)
        store(res)
        print(json.dumps(rows[-1]), flush=True)
    res["acceptance"] = acceptance(rows)
    print(store(res))


if __name__ == "__main__":
    main()
