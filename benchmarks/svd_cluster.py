"""Concatenated-SVD clustering vs per-layer whitened SVD vs fixed pairs on SmolLM2-135M (brown-512).

Rows (every command through the CLI, every output scored by ``compress.load``), at parameter
ratios 0.9 and 0.8 of the targeted linears (q, k, v, gate, up of every layer; o and down dense):

* ``lowrank-R`` — per-layer whitened SVD, ``compress lowrank --ratio R`` on the same linears;
* ``pairs-R`` — fixed contiguous pairs of layers sharing a basis (Basis Sharing's default
  grouping), ``compress share --ratio R --grouping pairs``;
* ``share-R`` — the clustered shared bases, ``compress share --ratio R`` (no cap on a cluster's
  size, the default);
* ``share-unbounded-0.8`` — the same with an explicit cap of 30 layers (none binds: the first
  run, when the default cap was 2); ``share-max2-0.8`` — clusters of at most two layers.

Every row runs with ``--propagate dense``: factors and coefficients are fitted on the dense
model's calibration statistics (scanned once per statistic and kept in the work store).

Per row: PPL, KL and top-1 agreement to the dense model on the brown-512 evaluation windows,
parameters stored for the targeted linears (bases counted once) against their dense count,
bytes on disk, wall time and peak RSS.

``estimators``: the plan step of ``compress share --ratio 0.8`` with each estimator (approx,
residual, maxnorm) on the stored scan of the 150 blocks (30 layers × 5 roles): clustering wall
time, candidate evaluations, exact SVDs run and avoided, clusters found, and for every final
cluster the estimator's error against the exact one. Acceptance: ``acceptance``.

Usage: python benchmarks/svd_cluster.py [--only ROW,...] [--sections rows,estimators] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
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
RATIOS = (0.9, 0.8)
TARGETS = "q_proj|k_proj|v_proj|gate_proj|up_proj"
ESTIMATORS = ("approx", "residual", "maxnorm")
# every row fits its factors on the dense model's calibration statistics (one scan per statistic,
# kept in the work store), so the comparison is on equal terms and fits this machine's time
DENSE = ["--propagate", "dense"]


def row_commands() -> dict[str, list[str]]:
    """name → CLI arguments after the model (run in this order)."""
    rows = {}
    for r in RATIOS:
        rows[f"share-{r}"] = ["share", "--ratio", str(r), *DENSE]
        rows[f"lowrank-{r}"] = ["lowrank", "--ratio", str(r), "--target", TARGETS, *DENSE]
        rows[f"pairs-{r}"] = ["share", "--ratio", str(r), "--grouping", "pairs", *DENSE]
    rows["share-unbounded-0.8"] = ["share", "--ratio", "0.8", "--max-size", "30", *DENSE]
    rows["share-max2-0.8"] = ["share", "--ratio", "0.8", "--max-size", "2", *DENSE]
    return rows


def targeted_params(out: Path) -> dict:
    """Stored parameters of the targeted linears (factors, coefficients, biases and shared bases
    once) against their dense count, from the per-module report and the checkpoint."""
    rows = json.loads((out / "reports" / "report.json").read_text())
    rows = rows["layers"] if isinstance(rows, dict) else rows
    reader = CheckpointReader(out)
    shared = sum(reader.get(k).numel() for k in reader.keys() if k.startswith("compress_shared."))
    stored = sum(r["params"] for r in rows) + shared
    manifest = json.loads((out / "compression.json").read_text())
    dense = sum(e["in_features"] * e["out_features"] for e in manifest["modules"].values())
    kinds: dict[str, int] = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    return {"targeted_params": stored, "targeted_dense_params": dense, "param_ratio": stored / dense,
            "modules_by_kind": kinds, "shared_groups": len(manifest.get("shared", {}))}


def run_row(src: Path, work: Path, name: str, args: list[str], dense: torch.nn.Module,
            windows: torch.Tensor) -> dict:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [args[0], str(src), *args[1:], "--protocol", PROTOCOL]
    run = measured(compress_cmd(*cmd, "-o", str(out)), log=work / f"{name}.log")
    if not (out / "config.json").is_file():
        raise SystemExit(f"{name} failed: see {work / f'{name}.log'}")
    row = {"name": name, "command": "compress " + " ".join(cmd).replace(str(src), "smollm2-135m"),
           **scored(load(out), windows, dense), "bytes_on_disk": CheckpointReader(out).total_bytes(),
           **targeted_params(out), **run}
    plan = out / "plan.json"
    if plan.is_file():
        p = json.loads(plan.read_text())
        row["clusters"] = [{"role": u["role"], "layers": u["layers"], "rank": u["rank"]}
                           for u in p["units"] if u["kind"] == "shared"]
        row["thresholds"] = {r["role"]: r["threshold"] for r in p["roles"]}
    shutil.rmtree(out, ignore_errors=True)
    return row


def estimators(src: Path) -> dict:
    """The plan step with each estimator on the stored scan (run a ``share`` row first)."""
    from compress.recipe import parse_recipe
    from compress.runner import stored_plan

    out = {}
    for est in ESTIMATORS:
        recipe = parse_recipe({"calibration": {"protocol": PROTOCOL},
                               "stages": [{"pass": "svd_cluster", "config": {"ratio": 0.8, "estimator": est,
                                                                             "propagate": "dense"}}]})
        t0 = time.perf_counter()
        plan = stored_plan(recipe, src)
        wall = time.perf_counter() - t0
        if plan is None:
            raise SystemExit("the scan statistics are not stored: run --only share-0.8 first")
        p = plan.model_dump(mode="json")
        clusters = [{"role": u["role"], "layers": u["layers"], "estimated_error": u["estimated_error"],
                     "exact_error": u["exact_error"], "own_metric_error": u["own_metric_error"]}
                    for u in p["units"] if len(u["layers"]) > 1]
        gaps = [abs(c["estimated_error"] - c["exact_error"]) for c in clusters]
        out[est] = {"blocks": sum(len(u["layers"]) for u in p["units"]),
                    "clustering_s": sum(r["seconds"] for r in p["roles"]), "plan_wall_s": wall,
                    "evaluations": sum(r["evaluations"] for r in p["roles"]),
                    "exact_svds": sum(r["exact_svds"] for r in p["roles"]),
                    "svds_avoided": sum(r["svds_avoided"] for r in p["roles"]),
                    "clusters": len(clusters), "clustered_layers": sum(len(c["layers"]) for c in clusters),
                    "max_abs_error_gap": max(gaps, default=0.0), "final_clusters": clusters}
        print(est, {k: v for k, v in out[est].items() if k != "final_clusters"}, flush=True)
    return out


def acceptance(rows: list[dict]) -> dict:
    by = {r["name"]: r for r in rows}
    out: dict = {}
    for r in RATIOS:
        names = (f"share-{r}", f"lowrank-{r}", f"pairs-{r}")
        if set(names) <= by.keys():
            s, lr, pa = (by[n] for n in names)
            out[f"ratio_{r}"] = {"ppl_ratio_vs_lowrank": s["ppl"] / lr["ppl"], "ppl_ratio_vs_pairs": s["ppl"] / pa["ppl"],
                                 "params_ratio_vs_lowrank": s["targeted_params"] / lr["targeted_params"],
                                 "met": s["ppl"] <= lr["ppl"] and s["ppl"] <= pa["ppl"]
                                 and s["param_ratio"] <= r + 1e-9}
    return out


def store(res: dict) -> Path:
    return merge_save("svd_cluster", res, nested={"rows": ("name",), "commands": None})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--only", default=None, help="comma-separated row names to (re)measure")
    ap.add_argument("--sections", default="rows,estimators")
    a = ap.parse_args()
    sections = set(a.sections.split(","))
    src = materialize("smollm2-135m")
    work = a.work or cache_dir() / "bench" / "svd_cluster"
    work.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "svd_cluster.json"
    res: dict = json.loads(path.read_text()) if path.is_file() else {}
    res.update({"machine": machine(), "protocol": PROTOCOL, "model": SMOLLM2_LABEL, "ratios": list(RATIOS),
                "targets": TARGETS})
    res.setdefault("commands", {})
    if "rows" in sections:
        res["commands"]["rows"] = "python benchmarks/svd_cluster.py --sections rows"
        dense = load(src)
        windows = eval_token_windows(src, PROTOCOL, None)
        if "dense" not in res:
            with torch.no_grad():
                s = score(dense, windows)
            res["dense"] = {"ppl": math.exp(s["nll"] / s["tokens"]),
                            "bytes_on_disk": CheckpointReader(src).total_bytes()}
            store(res)
        rows = {r["name"]: r for r in res.get("rows", [])}
        commands = row_commands()
        only = set(a.only.split(",")) if a.only else set(commands)
        for name, args in commands.items():
            if name not in only:
                continue
            rows[name] = run_row(src, work, name, args, dense, windows)
            print(name, {k: rows[name][k] for k in ("ppl", "kl", "param_ratio", "wall_s")}, flush=True)
            res["rows"] = [rows[n] for n in commands if n in rows]
            res["acceptance"] = acceptance(res["rows"])
            store(res)
    if "estimators" in sections:
        res["commands"]["estimators"] = "python benchmarks/svd_cluster.py --sections estimators"
        res["estimators"] = estimators(src)
        store(res)
    print(json.dumps(res.get("acceptance", {}), indent=2))


if __name__ == "__main__":
    main()
