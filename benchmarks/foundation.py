"""Foundation v2 figures (issue 10), every run a fresh ``compress`` CLI process on SmolLM2-135M:

* ``cache``: ``gptq --bits 4 --group-size 64 --propagate dense`` into an empty work store, then
  the same at ``--bits 3`` (its Hessians come from the store), then ``--bits 3 --no-cache``;
  wall-time ratio W3 / W4 and whether the W3 tensors equal the ``--no-cache`` ones.
* ``resume``: a full run, then the same command killed with SIGKILL from outside once its
  ``OUT.partial/resume.json`` says 15 of 30 blocks are done, then ``--resume``; the ratio of the
  resumed run's wall time to the full run's, and whether the tensors are identical.
* ``regression``: each existing pass run by this tree and by the reference commit (the main of
  2026-12-01 before the port, a ``git worktree``), on SmolLM2 and MiniLM; per tensor the max
  relative difference ‖a−b‖∞ / ‖b‖∞ (0 = bitwise). GPTQ on SmolLM2 runs without the MSE grid
  search (``--no-mse``: the port changed the pipeline around the solver, not the solver, and
  the grid search triples the run time); MiniLM runs the defaults.

* ``plan``: ``compress plan``'s estimates (bytes on disk, peak RSS) against real runs of GPTQ
  W4 g64, lowrank 0.8 (whitened), SliceGPT 25 % and SliceGPT 25 % → GPTQ W4 g64 on the brown-512
  calibration; real bytes are the output's tensors, real peak the process's VmHWM.

    python benchmarks/foundation.py --sections cache resume regression plan
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the checkout, not benchmarks/ (its kernels.py would shadow the PyPI package transformers imports)
from benchmarks.common import ROOT, SMOLLM2_LABEL, compress_cmd, machine, measured, merge_save  # noqa: E402
from compress.assets import resolve_model  # noqa: E402
from compress.checkpoint import CheckpointReader  # noqa: E402

REFERENCE = "111c395"  # main before the v2 port (2026-12-01)
GPTQ_W4 = ["gptq", "--bits", "4", "--group-size", "64"]


def tensor_diff(a: Path, b: Path) -> dict:
    """Max over tensors of ‖a−b‖∞/‖b‖∞, how many tensors differ at all, and whether the sets match."""
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    ka, kb = set(ra.keys()), set(rb.keys())
    worst, differing = 0.0, 0
    for k in sorted(ka & kb):
        x, y = ra.get(k), rb.get(k)
        if x.shape != y.shape or x.dtype != y.dtype:
            differing += 1
            worst = float("inf")
            continue
        if torch.equal(x, y):
            continue
        differing += 1
        if x.is_floating_point():
            d = float((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-30))
        else:
            d = float("inf")  # packed codes: any change counts
        worst = max(worst, d)
    return {"same_names": ka == kb, "tensors": len(ka & kb), "differing": differing,
            "max_rel_diff": worst}


def _run(args: list[str], env: dict, log: Path, cwd: Path | None = None) -> dict:
    cmd = compress_cmd(*args)
    if cwd is None:
        return measured(cmd, env=env, log=log)
    here = os.getcwd()
    os.chdir(cwd)  # `import cli` resolves from the working directory first: the reference tree
    try:
        return measured(cmd, env={**env, "PYTHONPATH": str(cwd)}, log=log)
    finally:
        os.chdir(here)


# -- cache -------------------------------------------------------------------------------------
def cache_section(model: Path, work: Path) -> dict:
    env = {"COMPRESS_CACHE": str(work / "cache")}
    shutil.rmtree(work / "cache", ignore_errors=True)
    base = [*GPTQ_W4[:1], str(model), "--group-size", "64", "--propagate", "dense", "--overwrite"]
    w4 = _run([*base, "--bits", "4", "-o", str(work / "w4")], env, work / "w4.log")
    w3 = _run([*base, "--bits", "3", "-o", str(work / "w3")], env, work / "w3.log")
    w3n = _run([*base, "--bits", "3", "--no-cache", "-o", str(work / "w3-nocache")], env, work / "w3n.log")
    return {"model": SMOLLM2_LABEL, "protocol": "brown-512",
            "command": "compress gptq smollm2-135m --bits {4,3} --group-size 64 --propagate dense",
            "w4_cold": w4, "w3_cached": w3, "w3_no_cache": w3n,
            "ratio_w3_cached_over_w4": round(w3["wall_s"] / w4["wall_s"], 3),
            "w3_vs_no_cache": tensor_diff(work / "w3", work / "w3-nocache"), "goal": 0.6}


# -- resume ------------------------------------------------------------------------------------
def _kill_at(cmd: list[str], env: dict, out: Path, blocks: int, log: Path) -> dict:
    """Start ``cmd``, SIGKILL it once its resume state says ``blocks`` blocks are committed."""
    state = out.with_name(out.name + ".partial") / "resume.json"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **env})
        done = 0
        while proc.poll() is None:
            try:
                done = int(json.loads(state.read_text())["blocks_done"])
            except (OSError, ValueError, KeyError):
                done = 0
            if done >= blocks:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait()
    if done < blocks:
        raise RuntimeError(f"{cmd[3:6]} ended (rc {proc.returncode}) before block {blocks}")
    done = int(json.loads(state.read_text())["blocks_done"])
    return {"wall_s": round(time.perf_counter() - t0, 2), "blocks_done_at_kill": done, "rc": proc.returncode}


def resume_section(model: Path, work: Path) -> dict:
    env = {"COMPRESS_CACHE": str(work / "cache")}
    rows = []
    for label, args in (("GPTQ W4 g64", GPTQ_W4), ("SliceGPT 25 %", ["slice", "--sparsity", "0.25"])):
        tag = args[0]
        full_out, res_out = work / f"{tag}-full", work / f"{tag}-resumed"
        shutil.rmtree(res_out, ignore_errors=True)
        full = _run([args[0], str(model), *args[1:], "--overwrite", "-o", str(full_out)], env,
                    work / f"{tag}-full.log")
        cmd = compress_cmd(args[0], str(model), *args[1:], "-o", str(res_out))
        killed = _kill_at(cmd, env, res_out, 15, work / f"{tag}-killed.log")
        resumed = _run([args[0], str(model), *args[1:], "--resume", "-o", str(res_out)], env,
                       work / f"{tag}-resumed.log")
        rows.append({"pass": label, "command": f"compress {' '.join(args)} smollm2-135m [--resume]",
                     "full": full, "killed": killed, "resumed": resumed,
                     "ratio_resumed_over_full": round(resumed["wall_s"] / full["wall_s"], 3),
                     "resumed_vs_full": tensor_diff(res_out, full_out), "goal": 0.6})
    return {"model": SMOLLM2_LABEL, "protocol": "brown-512", "rows": rows}


# -- regression against the reference commit ------------------------------------------------------
REGRESSION = {
    "smollm2-135m": [("rtn W4 g64", ["rtn", "--bits", "4", "--group-size", "64"], "bitwise"),
                     ("lowrank 0.8 plain", ["lowrank", "--ratio", "0.8", "--no-whiten"], "bitwise"),
                     ("gptq W4 g64 no-mse", [*GPTQ_W4, "--no-mse", "--protocol", "brown-512-smoke"], "1e-6"),
                     ("gptq W4 g64 no-mse dense", [*GPTQ_W4, "--no-mse", "--propagate", "dense",
                                                   "--protocol", "brown-512-smoke"], "1e-6"),
                     ("lowrank 0.8 whitened", ["lowrank", "--ratio", "0.8", "--protocol", "brown-512-smoke"], "1e-6"),
                     ("lowrank 0.8 whitened dense", ["lowrank", "--ratio", "0.8", "--propagate", "dense",
                                                     "--protocol", "brown-512-smoke"], "1e-6"),
                     ("slicegpt 25 %", ["slice", "--sparsity", "0.25", "--protocol", "brown-512-smoke"], "1e-6")],
    "minilm-l6": [("rtn W4 g64", ["rtn", "--bits", "4", "--group-size", "64"], "bitwise"),
                  ("lowrank 0.8 plain", ["lowrank", "--ratio", "0.8", "--no-whiten"], "bitwise"),
                  ("gptq W4 g64", [*GPTQ_W4, "--protocol", "brown-512-smoke"], "1e-6"),
                  ("gptq W4 g64 dense", [*GPTQ_W4, "--propagate", "dense", "--protocol", "brown-512-smoke"], "1e-6"),
                  ("lowrank 0.8 whitened", ["lowrank", "--ratio", "0.8", "--protocol", "brown-512-smoke"], "1e-6")],
}


def regression_section(work: Path) -> dict:
    ref_tree = work / "reference-tree"
    if not ref_tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(ref_tree), REFERENCE], check=True,
                       capture_output=True)
    shared = ref_tree.parent / "shared"
    if not shared.exists():
        shared.symlink_to(ROOT.parent / "shared")
    env = {"COMPRESS_CACHE": str(work / "cache")}
    rows = []
    for asset, cases in REGRESSION.items():
        model = resolve_model(asset)
        for label, args, goal in cases:
            tag = f"{asset}-{label.replace(' ', '_').replace('%', 'pct')}"
            ref, new = work / f"{tag}-ref", work / f"{tag}-new"
            walls = {}
            for out, cwd in ((ref, ref_tree), (new, None)):
                walls[out.name[-3:]] = _run([args[0], str(model), *args[1:], "--overwrite", "-o", str(out)], env,
                                            work / f"{out.name}.log", cwd=cwd)
            d = tensor_diff(new, ref)
            ok = d["same_names"] and (d["differing"] == 0 if goal == "bitwise" else d["max_rel_diff"] <= 1e-6)
            rows.append({"model": asset, "case": label, "command": f"compress {' '.join(args)}", "goal": goal,
                         **d, "met": ok, "ref_wall_s": walls["ref"]["wall_s"], "new_wall_s": walls["new"]["wall_s"],
                         "ref_peak_rss_bytes": walls["ref"]["peak_rss_bytes"],
                         "new_peak_rss_bytes": walls["new"]["peak_rss_bytes"]})
            print(json.dumps(rows[-1]), flush=True)
    return {"reference": REFERENCE, "rows": rows}


# -- plan --------------------------------------------------------------------------------------
PLAN_CASES = {
    "gptq W4 g64": [{"pass": "gptq", "config": {"bits": 4, "group_size": 64}}],
    "lowrank 0.8": [{"pass": "lowrank", "config": {"ratio": 0.8}}],
    "slicegpt 25 %": [{"pass": "slicegpt", "config": {"sparsity": 0.25}}],
    "slicegpt 25 % → gptq W4 g64": [{"pass": "slicegpt", "config": {"sparsity": 0.25}},
                                    {"pass": "gptq", "config": {"bits": 4, "group_size": 64}}],
}


def plan_section(model: Path, work: Path) -> dict:
    """Per case: the plan's estimates (library call, as ``compress plan`` prints them) and one
    real ``compress run`` of the same recipe in a fresh process."""
    import yaml

    from compress.arch import get_adapter
    from compress.recipe import parse_recipe
    from compress.summary import stage_estimates

    env = {"COMPRESS_CACHE": str(work / "cache-plan")}
    reader = CheckpointReader(model)
    rows = []
    for name, stages in PLAN_CASES.items():
        raw = {"calibration": {"protocol": "brown-512"}, "stages": stages}
        recipe_file = work / f"plan-{len(rows)}.yaml"
        recipe_file.write_text(yaml.safe_dump(raw, sort_keys=False))
        est = stage_estimates(parse_recipe(raw), reader, get_adapter(reader.config))
        top = max(est, key=lambda e: e.peak.peak)
        out = work / f"plan-out-{len(rows)}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(work / "cache-plan", ignore_errors=True)  # every case computes its statistics
        real = _run(["run", str(recipe_file), str(model), "-o", str(out)], env, work / f"plan-{len(rows)}.log")
        real_bytes = CheckpointReader(out).total_bytes()
        rows.append({"case": name, "protocol": "brown-512",
                     "planned_bytes": est[-1].bytes, "real_bytes": real_bytes,
                     "bytes_ratio": round(est[-1].bytes / real_bytes, 4),
                     "planned_peak_rss_bytes": top.peak.peak, "planned_phase": top.peak.phase,
                     "planned_terms": top.peak.terms, "real_peak_rss_bytes": real["peak_rss_bytes"],
                     "rss_ratio": round(top.peak.peak / real["peak_rss_bytes"], 4), "wall_s": real["wall_s"]})
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return {"model": SMOLLM2_LABEL, "goals": {"bytes": 0.05, "peak_rss": 0.25}, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", nargs="+", default=["cache", "resume", "regression", "plan"],
                    choices=["cache", "resume", "regression", "plan"])
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="compress-foundation-"))
    work.mkdir(parents=True, exist_ok=True)
    model = resolve_model("smollm2-135m")
    out: dict = {}
    for section in args.sections:
        t0 = time.perf_counter()
        if section == "cache":
            out["cache_reuse"] = cache_section(model, work)
        elif section == "resume":
            out["resume"] = resume_section(model, work)
        elif section == "plan":
            out["plan_truth"] = plan_section(model, work)
        else:
            out["port_regression"] = regression_section(work)
        key = {"cache": "cache_reuse", "resume": "resume", "regression": "port_regression",
               "plan": "plan_truth"}[section]
        out[key]["machine"] = machine()
        out[key]["section_wall_s"] = round(time.perf_counter() - t0, 1)
        out.setdefault("commands", {})[key] = f"python benchmarks/foundation.py --sections {section}"
        print(json.dumps(out[key], indent=1), flush=True)
        merge_save("foundation", {k: v for k, v in out.items() if k != "commands"} | {"commands": out["commands"]},
                   nested={"commands": None})


if __name__ == "__main__":
    main()
