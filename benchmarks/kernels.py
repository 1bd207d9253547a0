"""Shared kernels: correctness of every path, GPU speed (when a GPU is lent), CPU twin speed, and
the end-to-end check that the kernel-served int4 SmolLM2 has the perplexity of its reference.

Sections (JSON in benchmarks/results/kernels.json; summarised in BENCHMARKS.md):

* ``correctness`` — relative error ``‖y − y_ref‖_F / ‖y_ref‖_F`` against a float64 reference
  built from the drawn codes, for every Triton path (gemv / fused / dequant) × bits (2, 3, 4, 8) ×
  sym / asym × fp32 / bf16 on odd shapes (N = 37, K = 300, groups of 64 with a ragged last
  group; plus per-channel and g128 rows), the lookup-table variant, low-rank and shared-basis,
  and the torch twins. On CPU the Triton kernels run under ``TRITON_INTERPRET=1``. Targets:
  ≤ 1e-5 (fp32), ≤ 1e-2 (bf16).
* ``gpu`` — :mod:`benchmarks.kernels_gpu` when CUDA is available, else "GPU: not measured".
* ``cpu`` — the torch twin (int4 g64, what CPU serving runs) vs dense fp32 ``F.linear`` on
  SmolLM2's linear shapes at M = 1, 16, 512, 2048: interleaved repeats, medians, ratio.
* ``e2e`` — protocol brown-512 token PPL of the GPTQ W4 g64 SmolLM2 served through the
  dispatcher (QuantLinear → twin), the same with the twin forced onto its plane-by-plane path
  (the one decode uses), and a dense model carrying the weights decoded by the independent
  float64 reference; they must agree within 0.1%. Also the dense source's PPL.

* ``bench`` — ``compress bench`` of that int4 model against the dense source (prefill M = 512,
  2048 and decode M = 1; latency and peak memory, a fresh process per measurement; on CPU the
  honest torch path).

Each section is written into the JSON as soon as it finishes and merged with what is there, so
sections can be run separately (``--sections e2e`` then ``--sections bench``) without clobbering.

Usage: python benchmarks/kernels.py [--sections correctness,gpu,cpu,e2e,bench] [--repeats 7]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the checkout, not benchmarks/ (its kernels.py would shadow the PyPI package transformers imports)

import torch  # noqa: E402

if not torch.cuda.is_available():  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from benchmarks.common import (  # noqa: E402
    HEADLINE_W4, RESULTS, SMOLLM2_LABEL, compress_cmd, machine, measured, merge_save)
from benchmarks.kernel_cases import (  # noqa: E402
    DTYPES, TOLERANCE, lowrank_reference, make_factors, make_quant_case, quant_reference, rel_err,
    triton_lowrank, triton_quant, twin_quant,
)

BITS = (2, 3, 4, 8)
N_OUT, K_IN, GROUP = 37, 300, 64  # odd: no tile divides them; the last group has 44 columns
PATH_M = {"gemv": 1, "fused": 17, "dequant": 67}  # rows sent to each forced path
TWIN_M = (1, 17, 300)  # the twin's plane path (≤ PLANES_MAX_M rows) and its dequant+matmul path
SMOLLM2_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # (K, N): q/o, k/v, gate/up, down
CPU_M = (1, 16, 512, 2048)
NO_GPU = "GPU: not measured (no GPU lent to this session)"


# -- correctness --------------------------------------------------------------------------------
def _row(kind: str, backend: str, path: str, dtype: str, m: int, err: float, **extra) -> dict:  # noqa: ANN003
    return {"kind": kind, "backend": backend, "path": path, "dtype": dtype, "m": m, **extra,
            "rel_err": err, "tolerance": TOLERANCE[dtype], "ok": bool(err <= TOLERANCE[dtype])}


def quant_correctness(device: str) -> list[dict]:
    """Every path × bits × mode × dtype (Triton), the twin, and extra group layouts."""
    backend = "triton" if device == "cuda" else "triton-interpreter"
    rows = []
    layouts = [(b, mode, GROUP) for b in BITS for mode in ("sym", "asym", "lut")]
    layouts += [(4, "sym", K_IN), (4, "asym", 128)]  # per-channel; g128 with a ragged last group
    for i, (bits, mode, group) in enumerate(layouts):
        case = make_quant_case(mode, bits, N_OUT, K_IN, group, seed=i).to(device)
        for dt in ("fp32", "bf16"):
            gen = torch.Generator().manual_seed(100 + i)
            bias = torch.randn(N_OUT, generator=gen).to(device)
            meta = {"bits": bits, "mode": mode, "group_size": group, "n": N_OUT, "k": K_IN}
            for path, m in PATH_M.items():
                x = torch.randn(m, K_IN, generator=gen).to(device=device, dtype=DTYPES[dt])
                err = rel_err(triton_quant(case, x, bias, path), quant_reference(case, x, bias))
                rows.append(_row("lut" if mode == "lut" else "quant", backend, path, dt, m, err, **meta))
            for m in TWIN_M:
                x = torch.randn(m, K_IN, generator=gen).to(dtype=DTYPES[dt])
                cpu_case = case.to("cpu")
                err = rel_err(twin_quant(cpu_case, x, bias.cpu()), quant_reference(cpu_case, x, bias.cpu()))
                rows.append(_row("lut" if mode == "lut" else "quant", "torch twin",
                                 "planes" if m <= 256 else "dequant+matmul", dt, m, err, **meta))
    return rows


def lowrank_correctness(device: str) -> list[dict]:
    """Low-rank (hoisted kernel at rank 37, chunked at rank 70) and shared-basis, Triton and twin.

    The single-V Triton call writes into a NaN-poisoned output; shared-basis runs the same launch
    on the concatenated Vs.
    """
    from compress.kernels import lowrank_torch, lowrank_triton

    tri = "triton" if device == "cuda" else "triton-interpreter"
    rows = []
    for rank, dt, m in itertools.product((37, 70), ("fp32", "bf16"), (1, 17, 67)):
        x, U, Vs, bs = make_factors(m, K_IN, rank, (101, 37, 53), DTYPES[dt], seed=rank + m)
        refs = [lowrank_reference(x, U, V, b) for V, b in zip(Vs, bs)]
        dx, dU, dVs, dbs = (_move(t, device) for t in (x, U, Vs, bs))
        meta = {"rank": rank, "k": K_IN}
        single = {tri: triton_lowrank(dx, dU, dVs[0], dbs[0]),
                  "torch twin": lowrank_torch.lowrank_matmul(x, U, Vs[0], bs[0])}
        shared = {tri: lowrank_triton.shared_basis_matmul(dx, dU, dVs, dbs),
                  "torch twin": lowrank_torch.shared_basis_matmul(x, U, Vs, bs)}
        for backend in (tri, "torch twin"):
            rows.append(_row("lowrank", backend, "lowrank", dt, m, rel_err(single[backend], refs[0]), n=101, **meta))
            err = max(rel_err(y, r) for y, r in zip(shared[backend], refs))
            rows.append(_row("shared_basis", backend, "shared-basis", dt, m, err, n=[101, 37, 53], **meta))
    return rows


def _move(t, device: str):  # noqa: ANN001, ANN202
    """A tensor, None, or a list of them, on ``device``."""
    if isinstance(t, list):
        return [_move(v, device) for v in t]
    return None if t is None else t.to(device)


def correctness() -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    rows = quant_correctness(device) + lowrank_correctness(device)
    worst: dict[str, dict[str, float]] = {}
    for r in rows:
        key = f"{r['backend']} · {r['kind']} · {r['path']}"
        worst.setdefault(key, {})
        worst[key][r["dtype"]] = max(worst[key].get(r["dtype"], 0.0), r["rel_err"])
    return {"device": device, "rows": rows, "worst_rel_err": worst, "checks": len(rows),
            "failed": [r for r in rows if not r["ok"]], "pass": all(r["ok"] for r in rows),
            "seconds": time.perf_counter() - t0}


# -- CPU timings ------------------------------------------------------------------------------
def _median_ms(fn, repeats: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def cpu_timings(repeats: int) -> dict:
    """int4 g64 torch twin vs dense fp32 F.linear, interleaved, on SmolLM2 shapes."""
    rows = []
    for k, n in SMOLLM2_SHAPES:
        case = make_quant_case("sym", 4, n, k, 64, seed=k * n)
        dense = case.dense64.to(torch.float32)
        for m in CPU_M:
            x = torch.randn(m, k)
            twin = (lambda: twin_quant(case, x, None))
            lin = (lambda: F.linear(x, dense))
            twin(), lin()  # warm-up
            t_twin, t_dense = [], []
            for _ in range(repeats):  # interleaved, so both see the same machine load
                t_twin.append(_median_ms(twin, 1))
                t_dense.append(_median_ms(lin, 1))
            a, b = statistics.median(t_twin), statistics.median(t_dense)
            rows.append({"k": k, "n": n, "m": m, "twin_ms": a, "dense_fp32_ms": b, "ratio": a / b,
                         "twin_path": "planes" if m <= 256 else "dequant+matmul"})
    return {"label": "CPU, torch twins (no GPU)", "threads": torch.get_num_threads(), "repeats": repeats,
            "rows": rows}


# -- end to end -------------------------------------------------------------------------------
@contextlib.contextmanager
def twin_planes_always():
    """Force the twin onto its plane-by-plane path for every M (the path decode takes)."""
    from compress.kernels import quant_matmul_torch

    saved = quant_matmul_torch.PLANES_MAX_M
    quant_matmul_torch.PLANES_MAX_M = 1 << 62
    try:
        yield
    finally:
        quant_matmul_torch.PLANES_MAX_M = saved


def _is_headline(out: Path) -> bool:
    """Whether ``out`` is a finished GPTQ W4 g64 act-order + MSE output in today's format."""
    from compress.provenance import FORMAT_VERSION

    path = out / "compression.json"
    if not path.is_file():
        return False
    manifest = json.loads(path.read_text())
    stages = manifest.get("recipe", {}).get("stages", [])
    cfg = stages[0].get("config", {}) if len(stages) == 1 and stages[0].get("pass") == "gptq" else {}
    want = {"bits": 4, "group_size": 64, "act_order": True, "mse": True, "symmetric": True}
    return manifest.get("format_version") == FORMAT_VERSION and all(cfg.get(k) == v for k, v in want.items()) \
        and (manifest.get("calibration") or {}).get("protocol") == "brown-512"


def int4_model(dense: Path, given: Path | None = None) -> tuple[Path, dict | None]:
    """The headline GPTQ W4 g64 SmolLM2 (``HEADLINE_W4``, brown-512 calibration): ``given`` when it is
    one (e.g. quant.py's output), else the cached one if it still matches the headline recipe and
    today's format, else made now with the CLI (its wall time and peak RSS returned)."""
    from compress.assets import cache_dir

    if given is not None:
        if not _is_headline(given):
            raise SystemExit(f"{given} is not a GPTQ W4 g64 act-order MSE brown-512 output in today's format")
        return given, None
    out = cache_dir() / "bench" / "smollm2-135m-gptq-w4g64"
    if _is_headline(out):
        return out, None
    out.parent.mkdir(parents=True, exist_ok=True)
    run = measured(compress_cmd("gptq", str(dense), *HEADLINE_W4, "-o", str(out), "--overwrite"),
                   log=RESULTS / "kernels_quantize.log")
    return out, run


def e2e(protocol: str = "brown-512", given: Path | None = None) -> dict:
    """PPL served by the dispatcher (auto, forced planes) vs the float64-decoded dense reference."""
    import math

    from compress import load
    from compress.assets import materialize
    from compress.eval import compressed_size, eval_token_windows, score
    from compress.checkpoint import CheckpointReader
    from compress.validate import dense_reference

    dense_dir = materialize("smollm2-135m")
    out, made = int4_model(dense_dir, given)
    windows = eval_token_windows(out, protocol, None)
    served = load(out)
    reference = load(out)
    swapped = dense_reference(reference)
    ppl = (lambda s: math.exp(s["nll"] / s["tokens"]))
    t0 = time.perf_counter()
    s_auto = score(served, windows, dense=reference)  # KL(reference ‖ served), top-1 agreement
    s_ref = score(reference, windows)
    with twin_planes_always():
        s_planes = score(served, windows)
    s_dense = score(load(dense_dir), windows)
    reader = CheckpointReader(out)
    bits, params = compressed_size(reader, reader.manifest() or {})
    p_auto, p_ref, p_planes = ppl(s_auto), ppl(s_ref), ppl(s_planes)
    return {
        "protocol": protocol, "model": str(out), "made_now": made, "quantized_modules": swapped,
        "recipe": json.loads((out / "compression.json").read_text())["recipe"]["stages"],
        "eval_tokens": s_auto["tokens"], "ppl_dispatcher": p_auto, "ppl_dispatcher_planes": p_planes,
        "ppl_dequant_reference": p_ref, "ppl_dense_source": ppl(s_dense), "dense_source": SMOLLM2_LABEL,
        "rel_diff_dispatcher": abs(p_auto - p_ref) / p_ref, "rel_diff_planes": abs(p_planes - p_ref) / p_ref,
        "kl_reference_vs_dispatcher": s_auto["kl"] / s_auto["tokens"],
        "top1_agreement_reference_vs_dispatcher": s_auto["agree"] / s_auto["tokens"],
        "bytes_on_disk": reader.total_bytes(), "effective_bits": bits, "compressed_params": params,
        "pass_0.1%": max(abs(p_auto - p_ref), abs(p_planes - p_ref)) / p_ref <= 1e-3,
        "served_by": "CPU, torch twins (dispatcher)", "seconds": time.perf_counter() - t0,
    }


def cli_bench(repeats: int) -> dict:
    """``compress bench`` of the int4 SmolLM2 against its dense source (the honest torch path on CPU).

    Prefill M = 512 and 2048, decode (M = 1 with a KV cache); a fresh process per (model, phase).
    """
    from compress.assets import materialize

    dense_dir = materialize("smollm2-135m")
    out, made = int4_model(dense_dir)
    tmp = RESULTS / "kernels_bench_cli.json"
    args = ["bench", str(out), "--against", str(dense_dir), "--seq", "512", "--seq", "2048",
            "--decode-tokens", "32", "--prompt", "32", "--repeats", str(repeats), "--device", "cpu",
            "--json", str(tmp)]
    run = measured(compress_cmd(*args), log=RESULTS / "kernels_bench_cli.log")
    report = json.loads(tmp.read_text())
    tmp.unlink()
    summary = [{"phase": r["phase"], "tokens": r["tokens"],
                "int4_latency_s": r["compressed"]["latency_s"], "dense_latency_s": r["dense"]["latency_s"],
                "latency_ratio": r["latency_ratio"],
                "int4_peak_bytes": r["compressed"]["peak_bytes"], "dense_peak_bytes": r["dense"]["peak_bytes"],
                "peak_ratio": r["peak_ratio"],
                "int4_transient_bytes": r["compressed"]["transient_bytes"],
                "dense_transient_bytes": r["dense"]["transient_bytes"],
                "int4_loaded_bytes": r["compressed"]["loaded_bytes"], "dense_loaded_bytes": r["dense"]["loaded_bytes"],
                "int4_weight_bytes": r["compressed"]["weight_bytes"], "dense_weight_bytes": r["dense"]["weight_bytes"]}
               for r in report["phases"]]
    return {"command": "compress " + " ".join(args[:-2]).replace(str(out), "INT4").replace(str(dense_dir), "DENSE"),
            "model": str(out), "against": str(dense_dir), "made_now": made, "wall": run,
            "summary": summary, "report": report}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", default="correctness,gpu,cpu,e2e,bench")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--int4-model", type=Path, default=None,
                    help="the headline GPTQ W4 g64 output to serve in the e2e/bench sections (e.g. quant.py's)")
    args = ap.parse_args()
    path = RESULTS / "kernels.json"
    for section in args.sections.split(","):
        data: dict = {}
        if section == "correctness":
            data["correctness"] = correctness()
            print(f"correctness: {data['correctness']['checks']} checks, pass={data['correctness']['pass']}")
        elif section == "gpu":
            if torch.cuda.is_available():
                from benchmarks.kernels_gpu import gpu_figures

                data["gpu"] = gpu_figures()
            else:
                data["gpu"] = {"status": NO_GPU}
            print("gpu:", data["gpu"].get("status"))
        elif section == "cpu":
            data["cpu"] = cpu_timings(args.repeats)
            print("cpu:", [(r["k"], r["n"], r["m"], round(r["ratio"], 2)) for r in data["cpu"]["rows"]])
        elif section == "bench":
            data["bench"] = cli_bench(min(args.repeats, 3))
            print("bench:", [(r["phase"], r["tokens"], round(r["latency_ratio"], 2), round(r["peak_ratio"], 2))
                             for r in data["bench"]["summary"]])
        elif section == "e2e":
            data["e2e"] = e2e(given=args.int4_model)
            print("e2e:", {k: v for k, v in data["e2e"].items() if k.startswith(("ppl", "rel", "pass"))})
        else:
            raise SystemExit(f"unknown section {section!r}")
        # merged into what is on disk, so sections run separately never clobber each other
        command = (f"python benchmarks/kernels.py --sections {section}"
                   + (f" --int4-model {args.int4_model}" if section == "e2e" and args.int4_model else "")
                   + (f" --repeats {args.repeats}" if section in ("cpu", "bench") else ""))
        merge_save("kernels", {**data, "machine": machine(), "commands": {section: command}},
                   nested={"commands": None})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
