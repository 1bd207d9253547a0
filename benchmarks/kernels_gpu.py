"""The GPU figures of issue 3 (run by ``benchmarks/kernels.py`` when ``torch.cuda.is_available()``).

* int4 g128 GEMV at M = 1 on LLaMA-7B shapes against fp16 ``torch.matmul`` on the dense weight
  (target: ≥ 3.0× faster; the bandwidth bound is about 4×);
* int4 at M = 2048 (target: ≤ 1.15× the fp16 matmul's time);
* the path crossover sweep that should replace the provisional thresholds in
  ``compress/kernels/quant_matmul.py`` (each forced path timed over M);
* low-rank (rank = 25% of min(N, K)) at M = 2048 against two separate matmuls, with the extra
  memory each allocates (``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``):
  the fused kernel must not allocate the ``M × rank`` intermediate.

Times are ``triton.testing.do_bench`` medians (it warms up and clears the L2 cache before every
run); inputs are random, never zeros. Every figure carries the GPU name.
"""

from __future__ import annotations

import torch

from benchmarks.kernel_cases import make_quant_case, rel_err, quant_reference

LLAMA_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
"""(K = in_features, N = out_features) of LLaMA-2-7B's linears (q/o, gate/up, down)."""
SWEEP_M = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


def _bench(fn) -> float:  # noqa: ANN001
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))  # ms


def _int4(k: int, n: int, group: int = 128):  # noqa: ANN202
    case = make_quant_case("sym", 4, n, k, group, seed=k + n, scale_dtype=torch.float16).to("cuda")
    dense16 = case.dense64.to(device="cuda", dtype=torch.float16)  # [N, K]
    return case, dense16


def _qmm(case, x: torch.Tensor, path: str = "auto") -> torch.Tensor:  # noqa: ANN001
    from compress.kernels.quant_matmul import quant_matmul

    return quant_matmul(x, case.packed, case.scale, case.zero_point, bits=case.bits,
                        group_size=case.group_size, in_features=case.k, path=path)


def quant_rows(m: int) -> list[dict]:
    """int4 g128 (dispatcher, path auto) vs fp16 torch.matmul at ``m`` rows on the LLaMA shapes."""
    from compress.kernels.quant_matmul import choose_path

    rows = []
    for k, n in LLAMA_SHAPES:
        case, dense16 = _int4(k, n)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        err = rel_err(_qmm(case, x), quant_reference(case, x, None))
        t_q = _bench(lambda: _qmm(case, x))
        t_d = _bench(lambda: torch.matmul(x, dense16.t()))
        weight_bytes = case.packed.numel() * 4 + case.scale.numel() * 2
        rows.append({"m": m, "k": k, "n": n, "path": choose_path(m, n, k), "int4_ms": t_q, "fp16_ms": t_d,
                     "speedup": t_d / t_q, "time_ratio": t_q / t_d, "rel_err": err,
                     "int4_weight_GBps": weight_bytes / (t_q * 1e-3) / 1e9,
                     "fp16_weight_GBps": dense16.numel() * 2 / (t_d * 1e-3) / 1e9})
    return rows


def crossover_sweep(k: int = 4096, n: int = 11008) -> dict:
    """Each forced path (and the fp16 matmul) over M; the fastest path per M."""
    case, dense16 = _int4(k, n)
    rows = []
    for m in SWEEP_M:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        times = {p: _bench(lambda p=p: _qmm(case, x, p)) for p in ("gemv", "fused", "dequant")}
        times["fp16"] = _bench(lambda: torch.matmul(x, dense16.t()))
        best = min(("gemv", "fused", "dequant"), key=times.__getitem__)
        rows.append({"m": m, **{f"{p}_ms": t for p, t in times.items()}, "fastest": best})
    gemv_max = max((r["m"] for r in rows if r["fastest"] == "gemv"), default=0)
    fused_max = max((r["m"] for r in rows if r["fastest"] in ("gemv", "fused")), default=gemv_max)
    return {"k": k, "n": n, "rows": rows, "measured_gemv_max_m": gemv_max, "measured_fused_max_m": fused_max}


def lowrank_row(m: int = 2048, k: int = 4096, n: int = 4096) -> dict:
    """Fused low-rank kernel vs two matmuls: time and the extra memory each allocates."""
    from compress.kernels.lowrank import lowrank_matmul

    rank = min(n, k) // 4
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    U = torch.randn(k, rank, device="cuda", dtype=torch.float16) / k**0.5
    V = torch.randn(rank, n, device="cuda", dtype=torch.float16) / rank**0.5
    ref = (x.double() @ U.double()) @ V.double()
    err = rel_err(lowrank_matmul(x, U, V), ref.cpu())

    def extra_bytes(fn) -> int:  # noqa: ANN001
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        y = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base - y.numel() * y.element_size()
        del y
        return int(peak)

    two = (lambda: torch.matmul(torch.matmul(x, U), V))
    fused = (lambda: lowrank_matmul(x, U, V))
    return {"m": m, "k": k, "n": n, "rank": rank, "rel_err": err,
            "fused_ms": _bench(fused), "two_matmuls_ms": _bench(two),
            "intermediate_bytes": m * rank * 2,
            "fused_extra_bytes": extra_bytes(fused), "two_matmuls_extra_bytes": extra_bytes(two)}


def gpu_figures() -> dict:
    """Every GPU figure, with the GPU name and the pass/fail of each target."""
    name = torch.cuda.get_device_name()
    decode, prefill = quant_rows(1), quant_rows(2048)
    lr = lowrank_row()
    lr["speedup"] = lr["two_matmuls_ms"] / lr["fused_ms"]
    return {
        "status": "measured", "gpu": name, "timer": "triton.testing.do_bench median (ms)",
        "int4_g128_gemv_m1": decode, "int4_g128_m2048": prefill, "crossover": crossover_sweep(),
        "lowrank_m2048": lr,
        "targets": {
            "gemv_m1_speedup_ge_3": all(r["speedup"] >= 3.0 for r in decode),
            "m2048_time_ratio_le_1.15": all(r["time_ratio"] <= 1.15 for r in prefill),
            "lowrank_faster_than_two_matmuls": lr["speedup"] > 1.0,
            "lowrank_no_intermediate": lr["fused_extra_bytes"] < lr["intermediate_bytes"],
        },
    }
