"""GPTQ/RTN on SmolLM2 under protocol brown-512, against llm-compressor 0.14 in the same run.

Measures (JSON in benchmarks/results/quant.json; summarised in BENCHMARKS.md):
* PPL / dense PPL / KL / top-1 / size for GPTQ W4 g64 (ours and llm-compressor's GPTQModifier,
  same scheme, same calibration windows, same dampening), RTN W4 g64, GPTQ W3 g64, W8 per channel;
* wall time and peak RSS of the W4 g64 GPTQ run, ours vs llm-compressor, interleaved repeats,
  medians and their ratio;
* peak RSS of the W4 g64 run on a 60-block variant of SmolLM2 (blocks repeated) vs the 30-block
  model, both calibrated on brown-512-smoke (the ratio is what is checked);
* the int4 output loaded by plain ``transformers`` + ``compressed-tensors``: its PPL vs ours;
* determinism: identical tensors from two runs of the same recipe (the two W4 g64 runs when
  ``--repeats`` ≥ 2, else two brown-512-smoke runs).

Usage: python benchmarks/quant.py [--repeats 2] [--skip-llmc] [--skip-deep] [--timing-only | --depth-only | --rows R1,R2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the checkout, not benchmarks/ (its kernels.py would shadow the PyPI package transformers imports)

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from benchmarks.common import (  # noqa: E402
    HEADLINE_W4,
    ROOT, SMOLLM2_LABEL, compress_cmd, kernels, machine, measured, median, merge_save)
from compress.assets import cache_dir, materialize  # noqa: E402
from compress.checkpoint import CheckpointReader, CheckpointWriter  # noqa: E402
from compress.eval import eval_token_windows, evaluate, score  # noqa: E402
from compress.recipe import CalibrationConfig  # noqa: E402
from compress.runner import load_calibration  # noqa: E402

PROTOCOL = "brown-512"
W4 = HEADLINE_W4
SMOKE = ["--protocol", "brown-512-smoke"]


def tensor_hash(path: Path) -> str:
    r = CheckpointReader(path)
    h = hashlib.sha256()
    for k in r.keys():
        h.update(k.encode())
        h.update(r.get(k).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def eval_row(out: Path, dense: Path) -> dict:
    """brown-512 quality through the exact fp32 twin: the figure is the quantiser's, not the
    serving kernel's (benchmarks/serving.py scores the native bf16 path beside it)."""
    with kernels("torch"):
        r = evaluate(out, dense, protocol=PROTOCOL)
    return {"ppl": r.ppl, "dense_ppl": r.dense_ppl, "kl": r.kl_mean, "top1": r.top1_agreement,
            "bytes_on_disk": r.bytes_on_disk, "effective_bits": r.effective_bits, "kernels": "fp32 twin"}


def deep_variant(src: Path, dst: Path, factor: int = 2) -> Path:
    """The same model with its block list repeated ``factor`` times (for the memory check)."""
    if (dst / "config.json").is_file():
        return dst
    reader = CheckpointReader(src)
    n = int(reader.config["num_hidden_layers"])
    with CheckpointWriter(dst, overwrite=True) as w:
        for k in reader.keys():
            if k.startswith("model.layers."):
                i, rest = k[len("model.layers."):].split(".", 1)
                for rep in range(factor):
                    w.add(f"model.layers.{int(i) + rep * n}.{rest}", reader.get(k))
            else:
                w.add(k, reader.get(k))
        cfg = dict(reader.config, num_hidden_layers=n * factor)
        w.write_json("config.json", cfg)
        for f in src.iterdir():
            if f.suffix in (".json", ".jinja") and f.name not in ("config.json",):
                w.copy_file(f)
        w.commit()
    return dst


def transformers_ppl(out: Path) -> float:
    """PPL of our int4 output loaded by plain transformers + compressed-tensors."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    s = score(model, eval_token_windows(out, PROTOCOL, None))
    return math.exp(s["nll"] / s["tokens"])


def done(out: Path) -> bool:
    """A finished output directory (ours writes compression.json last, llm-compressor config.json)."""
    return (out / "compression.json").is_file() or (out / "config.json").is_file()


def timed_runs(dense: Path, work: Path, windows: Path, llmc_py: str | None, repeats: int,
               prefix: str, reuse: bool = False) -> tuple[list[dict], list[dict]]:
    """Interleaved W4 g64 runs, ours then llm-compressor's, ``repeats`` times each (with
    ``reuse``, finished outputs in ``work`` are kept and not timed again)."""
    ours, peer = [], []
    for rep in range(repeats):
        out = work / f"{prefix}ours-w4g64-{rep}"
        if reuse and done(out) and (not llmc_py or done(work / f"{prefix}llmc-w4g64-{rep}")):
            continue
        shutil.rmtree(out, ignore_errors=True)
        ours.append(measured(compress_cmd("gptq", str(dense), *W4, "-o", str(out)), log=work / f"{prefix}ours-{rep}.log"))
        print("ours", rep, ours[-1], flush=True)
        if llmc_py:
            pout = work / f"{prefix}llmc-w4g64-{rep}"
            shutil.rmtree(pout, ignore_errors=True)
            peer.append(measured([llmc_py, str(ROOT / "benchmarks/peers/llmc_gptq.py"), str(dense),
                                  "--windows", str(windows), "--out", str(pout), "--bits", "4",
                                  "--group-size", "64", "--damp", "0.01", "--actorder", "static"],
                                 log=work / f"{prefix}llmc-{rep}.log"))
            print("llm-compressor", rep, peer[-1], flush=True)
    return ours, peer


def cost(ours: list[dict], peer: list[dict]) -> dict:
    """Medians of wall time and peak RSS, and ours / llm-compressor ratios."""
    if not ours:
        return {"note": "outputs reused; timed by --timing-only (gptq_w4g64_timing)"}
    t_o, m_o = median([r["wall_s"] for r in ours]), median([r["peak_rss_bytes"] for r in ours])
    out = {"ours_wall_s": t_o, "ours_peak_rss_bytes": m_o}
    if peer:
        t_p, m_p = median([r["wall_s"] for r in peer]), median([r["peak_rss_bytes"] for r in peer])
        out.update({"llmc_wall_s": t_p, "llmc_peak_rss_bytes": m_p, "wall_ratio": t_o / t_p, "rss_ratio": m_o / m_p})
    return out


def timed_quality(work: Path, dense: Path, with_peer: bool, command: str) -> dict:
    """The W4 g64 quality rows re-scored from the first timed outputs; each keeps the row it
    replaces under ``earlier`` (run-to-run variation is visible beside the new figure)."""
    path = ROOT / "benchmarks/results/quant.json"
    old = json.loads(path.read_text()).get("quality", {}) if path.is_file() else {}
    names = {"gptq_w4g64": "t-ours-w4g64-0", **({"llmc_gptq_w4g64": "t-llmc-w4g64-0"} if with_peer else {})}
    rows = {}
    for name, out in names.items():
        prev = {k: v for k, v in old.get(name, {}).items() if k not in ("earlier",)}
        rows[name] = {**eval_row(work / out, dense), "date": machine()["date"], "run": command,
                      **({"earlier": prev} if prev else {})}
        print(name, rows[name], flush=True)
    return rows


def depth_memory(dense: Path, work: Path) -> dict:
    """Peak RSS of W4 g64 GPTQ on 30 vs 60 blocks (the blocks repeated), brown-512-smoke calibration."""
    deep = deep_variant(dense, cache_dir() / "models" / "smollm2-135m-x2")
    runs = {}
    for label, src in (("layers_30", dense), ("layers_60", deep)):
        out = work / f"depth-{label}"
        shutil.rmtree(out, ignore_errors=True)
        runs[label] = measured(compress_cmd("gptq", str(src), *W4, *SMOKE, "-o", str(out)),
                               log=work / f"depth-{label}.log")
        shutil.rmtree(out, ignore_errors=True)
    return {**runs, "calibration": "brown-512-smoke",
            "rss_ratio": runs["layers_60"]["peak_rss_bytes"] / runs["layers_30"]["peak_rss_bytes"]}


OTHER_ROWS = {"rtn_w4g64": ["rtn", "--bits", "4", "--group-size", "64"],
              "gptq_w3g64": ["gptq", "--bits", "3", "--group-size", "64", "--act-order", "--mse"],
              "gptq_w8_per_channel": ["gptq", "--bits", "8", "--group-size", "0", "--act-order", "--mse"]}
"""Quality rows beside the headline W4 pair: name → ``compress`` command and options."""


def other_row(name: str, dense: Path, work: Path, reuse: bool) -> dict:
    """Compress with row ``name``'s command (unless ``reuse`` finds it done), then evaluate it."""
    args = OTHER_ROWS[name]
    out = work / name
    if not (reuse and done(out)):
        shutil.rmtree(out, ignore_errors=True)
        measured(compress_cmd(*args[:1], str(dense), *args[1:], "-o", str(out)), log=work / f"{name}.log")
    manifest = json.loads((out / "compression.json").read_text())
    return {**eval_row(out, dense), "command": " ".join(["compress", args[0], "smollm2-135m", *args[1:]]),
            "format_version": manifest["format_version"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-llmc", action="store_true")
    ap.add_argument("--skip-deep", action="store_true")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--reuse", action="store_true", help="keep finished outputs in --work instead of recomputing")
    ap.add_argument("--depth-only", action="store_true", help="only the 30 vs 60 block memory check, merged into quant.json")
    ap.add_argument("--timing-only", action="store_true",
                    help="only the interleaved ours / llm-compressor runs, merged into quant.json as "
                         "gptq_w4g64_timing (run on an otherwise idle machine)")
    ap.add_argument("--rows", default=None,
                    help=f"only these quality rows (comma-separated, of {', '.join(OTHER_ROWS)}), merged into quant.json")
    a = ap.parse_args()
    dense = materialize("smollm2-135m")
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-quant-", dir=cache_dir()))
    work.mkdir(parents=True, exist_ok=True)
    if a.rows:
        for name in a.rows.split(","):
            if name not in OTHER_ROWS:
                raise SystemExit(f"unknown row {name!r}; one of {', '.join(OTHER_ROWS)}")
            row = {**other_row(name, dense, work, a.reuse), "date": machine()["date"],
                   "run": "python benchmarks/quant.py " + " ".join(sys.argv[1:])}
            print(name, row, flush=True)
            print(merge_save("quant", {"quality": {name: row}}, nested={"quality": None}))
        return
    if a.depth_only:
        print(merge_save("quant", {"depth_memory": {
            **depth_memory(dense, work), "command": "python benchmarks/quant.py " + " ".join(sys.argv[1:])}}))
        return
    res: dict = {"machine": machine(), "protocol": PROTOCOL, "model": SMOLLM2_LABEL,
                 "command": "python benchmarks/quant.py " + " ".join(sys.argv[1:])}

    # the exact calibration windows our protocol draws, handed to llm-compressor too
    calib = load_calibration(dense, CalibrationConfig(protocol=PROTOCOL), CheckpointReader(dense).config)
    windows = work / "windows.safetensors"
    save_file({"input_ids": calib.windows.contiguous()}, str(windows))
    res["calibration_fingerprint"] = calib.fingerprint

    llmc_py = None
    if not a.skip_llmc:
        venv = subprocess.run(["bash", str(ROOT / "benchmarks/peers/setup_llmc.sh")], check=True,
                              capture_output=True, text=True).stdout.strip().splitlines()[-1]
        llmc_py = str(Path(venv) / "bin" / "python")

    ours, peer = timed_runs(dense, work, windows, llmc_py, a.repeats, "t-" if a.timing_only else "", a.reuse)
    if a.timing_only:
        print(merge_save("quant", {"gptq_w4g64_timing": {
            "command": res["command"], "machine": res["machine"],
            "runs": {"ours": ours, "llm_compressor": peer}, **cost(ours, peer)}}))
        if ours:  # the timed outputs are scored too: a faster run must not cost quality
            print(merge_save("quant", {"quality": timed_quality(work, dense, llmc_py is not None, res["command"])},
                             nested={"quality": None}))
        return
    res["gptq_w4g64_runs"] = {"ours": ours, "llm_compressor": peer}
    res["gptq_w4g64_cost"] = cost(ours, peer)
    if a.repeats >= 2:
        h = [tensor_hash(work / f"ours-w4g64-{i}") for i in range(2)]
        res["determinism"] = {"recipe": "gptq w4 g64 act-order, brown-512", "identical": h[0] == h[1], "sha256": h}
    else:  # two runs of the same recipe on the smoke calibration (cheaper, same code path)
        h = []
        for i in range(2):
            out = work / f"det-{i}"
            shutil.rmtree(out, ignore_errors=True)
            measured(compress_cmd("gptq", str(dense), *W4, *SMOKE, "-o", str(out)), log=work / f"det-{i}.log")
            h.append(tensor_hash(out))
        res["determinism"] = {"recipe": "gptq w4 g64 act-order, brown-512-smoke", "identical": h[0] == h[1], "sha256": h}

    quality = {"gptq_w4g64": eval_row(work / "ours-w4g64-0", dense)}
    print("gptq_w4g64", quality["gptq_w4g64"], flush=True)
    if llmc_py:
        quality["llmc_gptq_w4g64"] = eval_row(work / "llmc-w4g64-0", dense)
        print("llmc_gptq_w4g64", quality["llmc_gptq_w4g64"], flush=True)
    for name in OTHER_ROWS:
        quality[name] = other_row(name, dense, work, a.reuse)
        res["quality"] = quality
        merge_save("quant", res, nested={"quality": None})  # earlier rows and sections stay
        print(name, quality[name], flush=True)
    res["quality"] = quality

    tf = transformers_ppl(work / "ours-w4g64-0")
    res["transformers_interop"] = {"transformers_ppl": tf, "compress_ppl": quality["gptq_w4g64"]["ppl"],
                                   "rel_diff": abs(tf - quality["gptq_w4g64"]["ppl"]) / quality["gptq_w4g64"]["ppl"]}
    print("interop", res["transformers_interop"], flush=True)

    if not a.skip_deep:
        res["depth_memory"] = depth_memory(dense, work)
        print("deep", res["depth_memory"], flush=True)
    print(merge_save("quant", res, nested={"quality": None}))


if __name__ == "__main__":
    main()
