"""SliceGPT on SmolLM2 under protocol brown-512 (JSON in benchmarks/results/slicegpt.json).

Sections (``--sections``, default all; rows already in the JSON are kept and skipped, and the
JSON is written after every row, so an interrupted run resumes):

* ``invariance`` — norm fusion + a PCA rotation at every residual point with nothing sliced
  (``rotate_unsliced``): max relative logit difference vs the dense model on held-out windows,
  max orthonormality error of every stored rotation (the shortcuts), and save → load →
  identical logits (two independent loads of the output);
* ``sweep`` — PPL, parameter count (shortcuts and the head map included, a tied table counted
  once), bytes on disk and wall time / peak RSS of the run at 0, 10, 20, 25, 30 % slicing, and
  the ``recipes/slice-then-gptq.yaml`` chain; PPL must be monotone in the fraction;
* ``depth`` — peak RSS of the 25 % run on a 60-block variant of SmolLM2 vs the 30-block run.

The reference (microsoft/TransformerCompression, figures given in issue 5, measured on this kind
of machine with the same calibration windows) is copied into the JSON for the comparison table.

Usage: python benchmarks/slicegpt.py [--sections invariance,sweep,depth]
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
    RESULTS, ROOT, SMOLLM2_LABEL, compress_cmd, machine, measured, merge_save)
from benchmarks.quant import deep_variant  # noqa: E402
from compress.algos.slicegpt import orthonormality_error  # noqa: E402
from compress.api import load  # noqa: E402
from compress.assets import cache_dir, materialize  # noqa: E402
from compress.checkpoint import CheckpointReader  # noqa: E402
from compress.eval import eval_token_windows, score  # noqa: E402

PROTOCOL = "brown-512"
FRACTIONS = (0.0, 0.1, 0.2, 0.25, 0.3)
REFERENCE = {
    "source": "microsoft/TransformerCompression (LLaMA adapter, transformers 4.47.1, final orientation "
              "pca, round interval 8), brown-512 calibration windows 128x512; figures from issue 5",
    "dense": {"ppl": 57.19, "params": 134.5e6},
    "points": [{"fraction": 0.0, "ppl": 57.25, "params": 182.7e6},
               {"fraction": 0.2, "ppl": 134.9, "params": 147.5e6}],
}


def params_of(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied table once


def ppl_of(out: Path) -> tuple[float, int]:
    model = load(out)
    s = score(model, eval_token_windows(out, PROTOCOL, None))
    return math.exp(s["nll"] / s["tokens"]), params_of(model)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=b, use_cache=False).logits for b in ids.split(2)])


def invariance(dense: Path, work: Path) -> dict:
    out = work / "rotate-0"
    shutil.rmtree(out, ignore_errors=True)
    run = measured(compress_cmd("slice", str(dense), "--sparsity", "0", "--rotate-unsliced",
                                "--protocol", "brown-512-smoke", "-o", str(out)), log=work / "rotate-0.log")
    ids = eval_token_windows(dense, PROTOCOL, None)[:4, :256]
    want = logits(load(dense), ids)
    a, b = load(out), load(out)
    got, again = logits(a, ids), logits(b, ids)
    ortho = max(orthonormality_error(sc.weight.detach()) for layer in a.model.layers
                for sc in (layer.attn_shortcut, layer.mlp_shortcut) if sc is not None)
    n_rot = sum(sc is not None for layer in a.model.layers for sc in (layer.attn_shortcut, layer.mlp_shortcut))
    return {"command": "compress slice smollm2-135m --sparsity 0 --rotate-unsliced --protocol brown-512-smoke",
            "max_rel_logit_diff": float((got - want).abs().max() / want.abs().max()),
            "rotations_checked": n_rot, "max_orthonormality_error": ortho,
            "reload_identical": bool(torch.equal(got, again)), "run": run,
            "eval_ids": list(ids.shape)}


def sweep_row(dense: Path, work: Path, name: str, cmd: list[str]) -> dict:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    run = measured(compress_cmd(*cmd, "-o", str(out)), log=work / f"{name}.log")
    ppl, n = ppl_of(out)
    return {"name": name, "command": "compress " + " ".join(cmd).replace(str(dense), "smollm2-135m"),
            "ppl": ppl, "params": n, "bytes_on_disk": CheckpointReader(out).total_bytes(), **run}


def store(res: dict) -> Path:
    """Save ``res`` merged with what is on disk (another process of this script may have saved
    meanwhile): sweep rows by name, commands by key, other sections ours where we have them."""
    return merge_save("slicegpt", res, nested={"sweep": ("name",), "commands": None})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="invariance,sweep,depth")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--only", default=None, help="comma-separated sweep row names (e.g. slice-20,slice-25)")
    a = ap.parse_args()
    sections = set(a.sections.split(","))
    dense = materialize("smollm2-135m")
    work = a.work or cache_dir() / "bench" / "slicegpt"
    work.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "slicegpt.json"
    res: dict = json.loads(path.read_text()) if path.is_file() else {}
    res.pop("monotone", None)
    res.update({"machine": machine(), "protocol": PROTOCOL, "model": SMOLLM2_LABEL,
                "reference": REFERENCE})
    res.setdefault("commands", {})["slicegpt"] = "python benchmarks/slicegpt.py " + " ".join(sys.argv[1:])

    if "dense" not in res:
        ppl, n = ppl_of(dense)
        res["dense"] = {"ppl": ppl, "params": n, "bytes_on_disk": CheckpointReader(dense).total_bytes()}
        store(res)
    if "invariance" in sections and "invariance" not in res:
        res["invariance"] = invariance(dense, work)
        store(res)
        print("invariance", res["invariance"], flush=True)
    if "sweep" in sections:
        rows = res.setdefault("sweep", [])
        jobs = [(f"slice-{int(f * 100)}", ["slice", str(dense), "--sparsity", str(f)]) for f in FRACTIONS]
        jobs.append(("slice-25-then-gptq-w4g64", ["run", str(ROOT / "recipes/slice-then-gptq.yaml"), str(dense)]))
        for name, cmd in jobs:
            if any(r["name"] == name for r in rows) or (a.only and name not in a.only.split(",")):
                continue
            rows.append(sweep_row(dense, work, name, cmd))
            store(res)
            print(rows[-1], flush=True)
        rows = res["sweep"] = json.loads((RESULTS / "slicegpt.json").read_text()).get("sweep", rows)
        plain = [r for r in rows if not r["name"].endswith("gptq-w4g64")]
        plain.sort(key=lambda r: float(r["name"].split("-")[1]))
        res["monotone"] = all(x["ppl"] <= y["ppl"] for x, y in zip(plain, plain[1:], strict=False))
        store(res)
    if "depth" in sections and "depth" not in res:
        deep = deep_variant(dense, cache_dir() / "models" / "smollm2-135m-x2")
        runs = {}
        for label, src in (("layers_30", dense), ("layers_60", deep)):
            out = work / f"depth-{label}"
            shutil.rmtree(out, ignore_errors=True)
            runs[label] = measured(compress_cmd("slice", str(src), "--sparsity", "0.25", "-o", str(out)),
                                   log=work / f"depth-{label}.log")
            shutil.rmtree(out, ignore_errors=True)
        res["depth"] = {**runs, "calibration": "brown-512", "command": res["commands"]["slicegpt"],
                        "rss_ratio": runs["layers_60"]["peak_rss_bytes"] / runs["layers_30"]["peak_rss_bytes"]}
        store(res)
        print("depth", res["depth"], flush=True)
    print(store(res))


if __name__ == "__main__":
    main()
