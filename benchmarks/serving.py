"""Serving on CPU (issue 18): decode and prefill of quantised SmolLM2 against dense fp32, the
kernel path each module takes, the roofline, the quality of the served path, greedy tokens.

Models (every one built through the CLI from the SmolLM2 asset; ``--reuse`` keeps built ones):

* ``gptq-w4g64`` — ``compress gptq smollm2-135m --bits 4 --group-size 64`` (the defaults:
  act-order with static groups, MSE grids);
* ``gptq-w4g64-head8`` — that output with its tied head quantised to int8 per channel
  (``compress rtn W4 --quantize-head int8``: a head-only stage, the blocks are quantised already;
  the embedding lookup reads the same codes);
* ``gptq-w4g64-head4`` — the same with an int4 g64 head by GPTQ on the final-norm outputs
  (``compress gptq W4 --quantize-head int4``);
* ``rtn-w8`` — ``compress rtn smollm2-135m --bits 8 --group-size 0`` (int8 per channel).

Per model: ``compress bench MODEL --against DENSE --seq 512 --decode-tokens 64`` (default threads,
a fresh process per measurement): decode tokens/s, prefill-512 latency, both against dense fp32
in the same command, the paths, the weight bytes a decoded token reads and the achieved
bandwidth against the copy bandwidth measured in the same run. Quality: brown-512 PPL of the
served (native) path and of the exact fp32 twin (``COMPRESS_KERNELS=torch``). Greedy: the first
64 generated tokens of 5 corpus prompts, native vs twin; where they part, the twin's logit gap
between the two tokens.

``ceiling``: the native ops alone on the head-sized matrix at M = 1 (bytes / time vs the copy).

Usage: python benchmarks/serving.py [--only NAME,...] [--sections build,bench,quality,greedy,ceiling] [--work DIR] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the checkout, not benchmarks/ (its kernels.py would shadow the PyPI package transformers imports)

import torch  # noqa: E402

from benchmarks.common import RESULTS, SMOLLM2_LABEL, compress_cmd, kernels, machine, measured, merge_save  # noqa: E402
from compress.assets import cache_dir, materialize  # noqa: E402

PROTOCOL = "brown-512"
W4 = ["--bits", "4", "--group-size", "64"]
MODELS: dict[str, tuple[str, list[str]]] = {
    "gptq-w4g64": ("dense", ["gptq", *W4]),
    "gptq-w4g64-head8": ("gptq-w4g64", ["rtn", "--bits", "8", "--quantize-head", "int8"]),
    "gptq-w4g64-head4": ("gptq-w4g64", ["gptq", *W4, "--quantize-head", "int4"]),
    "rtn-w8": ("dense", ["rtn", "--bits", "8", "--group-size", "0"]),
}
"""name → (input: ``dense`` or another row, the ``compress`` command and options)."""
TARGETS = {"gptq-w4g64": 1.8, "gptq-w4g64-head8": 2.5, "rtn-w8": 1.5}
"""Decode speed-up over dense fp32 each row must reach (issue 18)."""
GREEDY = ("gptq-w4g64", "gptq-w4g64-head8")
PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 5, 32, 64


def build(name: str, dense: Path, work: Path, reuse: bool) -> dict:
    src_name, args = MODELS[name]
    src = dense if src_name == "dense" else work / src_name
    out = work / name
    if reuse and (out / "compression.json").is_file():
        return {"command": _cmd_text(name), "reused": True}
    shutil.rmtree(out, ignore_errors=True)
    run = measured(compress_cmd(args[0], str(src), *args[1:], "-o", str(out)), log=work / f"{name}.log")
    return {"command": _cmd_text(name), **run}


def _cmd_text(name: str) -> str:
    src, args = MODELS[name]
    return " ".join(["compress", args[0], "smollm2-135m" if src == "dense" else src, *args[1:]])


def bench(name: str, dense: Path, work: Path) -> dict:
    js = work / f"{name}-bench.json"
    cmd = ["bench", str(work / name), "--against", str(dense), "--seq", "512", "--decode-tokens", "64"]
    measured(compress_cmd(*cmd, "--json", str(js)), log=work / f"{name}-bench.log")
    rep = json.loads(js.read_text())
    ph = {p["phase"]: p for p in rep["phases"]}
    dec, pre = ph["decode"], ph["prefill"]
    bw = rep["copy_bandwidth_Bps"]
    c, d = dec["compressed"], dec["dense"]
    achieved = c["bytes_per_step"] / c["latency_s"]
    return {"command": f"compress bench {name} --against smollm2-135m --seq 512 --decode-tokens 64",
            "decode_tokens_per_s": c["tokens_per_s"], "dense_decode_tokens_per_s": d["tokens_per_s"],
            "decode_speedup": c["tokens_per_s"] / d["tokens_per_s"], "target": TARGETS.get(name),
            "prefill512_s": pre["compressed"]["latency_s"], "dense_prefill512_s": pre["dense"]["latency_s"],
            "prefill512_ratio": pre["latency_ratio"], "decode_paths": c["paths"], "prefill_paths": pre["compressed"]["paths"],
            "bytes_per_token": c["bytes_per_step"], "dense_bytes_per_token": d["bytes_per_step"],
            "achieved_Bps": achieved, "copy_bandwidth_Bps": bw, "bandwidth_share": achieved / bw,
            "dense_bandwidth_share": d["bytes_per_step"] / d["latency_s"] / bw,
            "loaded_bytes": c["loaded_bytes"], "dense_loaded_bytes": d["loaded_bytes"],
            "decode_peak_bytes": c["peak_bytes"], "dense_decode_peak_bytes": d["peak_bytes"],
            "threads": c["threads"], "repeats": rep["repeats"], "machine": rep["machine"]}


def quality(name: str, dense: Path, work: Path) -> dict:
    """brown-512 PPL / KL / top-1 of the served (native) path and of the exact twin."""
    from compress.eval import evaluate

    out = {}
    for label, mode in (("native", None), ("twin", "torch")):
        with kernels(mode):
            r = evaluate(work / name, dense, protocol=PROTOCOL)
        out[label] = {"ppl": r.ppl, "dense_ppl": r.dense_ppl, "kl": r.kl_mean, "top1": r.top1_agreement,
                      "bytes_on_disk": r.bytes_on_disk}
    out["ppl_ratio_native_vs_twin"] = out["native"]["ppl"] / out["twin"]["ppl"]
    return out


def _prompts(tokenizer_dir: Path) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    from compress.assets import brown_corpus_path  # the corpus every test and benchmark reads

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    lines = [ln for ln in brown_corpus_path().read_text().splitlines() if len(ln.split()) > 40]
    step = len(lines) // PROMPTS
    return [tok(lines[i * step], return_tensors="pt").input_ids[:, :PROMPT_TOKENS] for i in range(PROMPTS)]


def _greedy(model: torch.nn.Module, ids: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    with torch.no_grad():
        g = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                           output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    return g.sequences[0, ids.shape[1]:].tolist(), torch.stack(g.scores)[:, 0]  # [steps, vocab] logits


def greedy(name: str, work: Path) -> dict:
    """Native vs twin greedy tokens; where they first differ, the twin's logit gap between the two."""
    from compress.api import load

    runs = {}
    for label, mode in (("native", None), ("twin", "torch")):
        with kernels(mode):
            model = load(work / name)
            runs[label] = [_greedy(model, p) for p in _prompts(work / name)]
    prompts = []
    for (nat, _), (twin, logits) in zip(runs["native"], runs["twin"], strict=True):
        first = next((i for i, (a, b) in enumerate(zip(nat, twin, strict=True)) if a != b), None)
        gap = None if first is None else float(logits[first, twin[first]] - logits[first, nat[first]])
        prompts.append({"identical": first is None, "first_difference": first, "twin_logit_gap": gap,
                        "tie_within_1e-4": gap is not None and abs(gap) <= 1e-4})
    return {"prompts": prompts, "identical": sum(p["identical"] for p in prompts), "of": len(prompts),
            "tokens": NEW_TOKENS, "prompt_tokens": PROMPT_TOKENS}


def op_ceiling(repeats: int = 20, span: float = 512e6) -> dict:
    """The bandwidth torch's native int4/int8 ops reach alone at M = 1 on the largest SmolLM2
    matrix (the 49152 × 576 head; random codes), against the copy bandwidth: the ceiling a
    decode made of these ops can approach. Each call reads another copy of the matrix, cycling
    through ``span`` bytes of copies, so the figure is memory's, not the last-level cache's."""
    import dataclasses
    import math
    import time

    from compress.algos.quant import QuantSpec, rtn_quantize
    from compress.bench import copy_bandwidth
    from compress.kernels import native_cpu
    from compress.modules.quant_linear import QuantLinear

    w = torch.randn(49152, 576, generator=torch.Generator().manual_seed(0)) * 0.02
    x = torch.randn(1, 576)
    out: dict = {"copy_bandwidth_Bps": copy_bandwidth(torch.device("cpu")), "shape": [49152, 576],
                 "threads": torch.get_num_threads(), "span_bytes": span}

    def timed(label: str, fns: list, size: int) -> None:
        with torch.no_grad():
            for fn in fns:
                fn()
            t0 = time.perf_counter()
            for r in range(repeats * len(fns)):
                fns[r % len(fns)]()
            dt = (time.perf_counter() - t0) / (repeats * len(fns))
        out[label] = {"ms": 1000 * dt, "bytes": size, "Bps": size / dt, "copies": len(fns),
                      "share_of_copy": size / dt / out["copy_bandwidth_Bps"]}

    for name, spec in {"int4_g64": QuantSpec(4, 64, True), "int8_channel": QuantSpec(8, None, True)}.items():
        nw = QuantLinear.from_quantized(rtn_quantize(w, spec), None)._native(x)
        assert nw is not None
        nbytes = nw.packed.numel() * nw.packed.element_size() + nw.table.numel() * nw.table.element_size()
        copies = [dataclasses.replace(nw, packed=nw.packed.clone(), table=nw.table.clone())
                  for _ in range(math.ceil(span / nbytes))]
        timed(name, [lambda c=c: native_cpu.native_linear(x, c, None) for c in copies], nbytes)
        del copies
    dense = [w.clone() for _ in range(math.ceil(span / (w.numel() * 4)))]
    timed("fp32_dense", [lambda d=d: torch.nn.functional.linear(x, d) for d in dense], w.numel() * 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None, help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--sections", default="build,bench,quality,greedy,ceiling")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--reuse", action="store_true", help="keep models already built in --work")
    a = ap.parse_args()
    names = [n for n in MODELS if a.only is None or n in a.only.split(",")]
    sections = set(a.sections.split(","))
    dense = materialize("smollm2-135m")
    work = a.work or cache_dir() / "bench" / "serving"
    work.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/serving.py " + " ".join(sys.argv[1:])
    res: dict = {"model": SMOLLM2_LABEL, "protocol": PROTOCOL, "machine": machine(), "commands": {}}
    path = RESULTS / "serving.json"
    earlier = json.loads(path.read_text()).get("rows", {}) if path.is_file() else {}
    for name in names:
        row: dict = {**earlier.get(name, {}), "date": machine()["date"], "run": command}  # sections not rerun stay
        if "build" in sections:
            row["build"] = build(name, dense, work, a.reuse)
        if "bench" in sections:
            row["bench"] = bench(name, dense, work)
        if "quality" in sections:
            row["quality"] = quality(name, dense, work)
        if "greedy" in sections and name in GREEDY:
            row["greedy"] = greedy(name, work)
        print(name, json.dumps(row, default=str)[:2000], flush=True)
        merge_save("serving", {**res, "rows": {name: row}}, nested={"rows": None, "commands": None})
    if "ceiling" in sections:
        res["op_ceiling"] = op_ceiling()
        print("op_ceiling", res["op_ceiling"], flush=True)
    key = "all" if sections == {"build", "bench", "quality", "greedy", "ceiling"} else ",".join(sorted(sections))
    print(merge_save("serving", {**res, "commands": {key: command}}, nested={"rows": None, "commands": None}))


if __name__ == "__main__":
    main()
