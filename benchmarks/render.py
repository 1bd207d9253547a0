"""Markdown tables for BENCHMARKS.md, printed from the results JSON (never typed in by hand).

Usage: python benchmarks/render.py quant-quality | quant-cost | kernels-e2e | depth | cache-reuse |
       resume | port-regression | plan-truth | device-map | structprune | baq
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _footer(d: dict) -> str:
    """Protocol, model, commands, date and machine of a results file (no GPU was lent for these)."""
    m = d["machine"]
    cmds = "; ".join(f"`{c}`" for c in d.get("commands", {}).values())
    return (f"{d['protocol']}, {d['model']}; {cmds}; {m['date']}, {m['cpu']}, {m['cores']} cores. "
            "GPU: not measured (no device lent).")


def quant_cost() -> str:
    """The interleaved GPTQ W4 g64 timing runs: ours vs llm-compressor, per repeat and medians."""
    t = json.loads((RESULTS / "quant.json").read_text())["gptq_w4g64_timing"]
    ours, peer = t["runs"]["ours"], t["runs"]["llm_compressor"]
    lines = ["| run | ours wall | ours peak RSS | llm-compressor wall | llm-compressor peak RSS |",
             "|---|---|---|---|---|"]
    for i, (o, p) in enumerate(zip(ours, peer, strict=False)):
        lines.append(f"| repeat {i + 1} | {o['wall_s']:.0f} s | {_gb(o['peak_rss_bytes'])} | "
                     f"{p['wall_s']:.0f} s | {_gb(p['peak_rss_bytes'])} |")
    lines.append(f"| **median** | **{t['ours_wall_s']:.0f} s** | **{_gb(t['ours_peak_rss_bytes'])}** | "
                 f"**{t['llmc_wall_s']:.0f} s** | **{_gb(t['llmc_peak_rss_bytes'])}** |")
    lines.append(f"\nRatio ours / llm-compressor: wall **{t['wall_ratio']:.2f}×**, peak RSS "
                 f"**{t['rss_ratio']:.2f}×** ({t['machine']['date']}, {t['machine']['cpu']}, "
                 f"{t['machine']['cores']} cores; `{t['command']}`).")
    return "\n".join(lines)


QUALITY_ROWS = {"gptq_w4g64": "**ours GPTQ W4 g64**", "llmc_gptq_w4g64": "llm-compressor GPTQ W4 g64",
                "rtn_w4g64": "ours RTN W4 g64", "gptq_w3g64": "ours GPTQ W3 g64",
                "gptq_w8_per_channel": "ours GPTQ W8 per-channel"}


def quant_quality() -> str:
    """The quality rows of quant.json (brown-512), with the date of rows re-measured on their own."""
    q = json.loads((RESULTS / "quant.json").read_text())["quality"]
    lines = ["| scheme | PPL | dense PPL | KL(dense‖q) | top-1 | bytes on disk | bits/param |",
             "|---|---|---|---|---|---|---|"]
    for key, label in QUALITY_ROWS.items():
        r = q[key]
        bits = "—" if r.get("effective_bits") is None else f"{r['effective_bits']:.2f}"
        when = f" ({r['date']})" if "date" in r else ""
        lines.append(f"| {label}{when} | {r['ppl']:.2f} | {r['dense_ppl']:.2f} | {r['kl']:.3f} | {r['top1']:.3f} | "
                     f"{r['bytes_on_disk']:,} | {bits} |")
    return "\n".join(lines)


def kernels_e2e() -> str:
    """Served int4 (dispatcher) vs the float64-decoded reference, brown-512."""
    e = json.loads((RESULTS / "kernels.json").read_text())["e2e"]
    stage = e["recipe"][0]
    cfg = ", ".join(f"{k}={stage['config'][k]}" for k in ("bits", "group_size", "act_order", "mse"))
    rows = [("dequantized reference (dense linears, fp32)", e["ppl_dequant_reference"], "—"),
            ("int4 via dispatcher (512-row windows → twin dequant + matmul)", e["ppl_dispatcher"],
             f"{e['rel_diff_dispatcher']:.1e} (KL {e['kl_reference_vs_dispatcher']:.1e}, top-1 "
             f"{e['top1_agreement_reference_vs_dispatcher']:.4f})"),
            ("int4 via dispatcher, twin forced to its plane-by-plane (decode) path",
             e["ppl_dispatcher_planes"], f"{e['rel_diff_planes']:.1e}"),
            (f"dense source ({e.get('dense_source', 'fp32')})", e["ppl_dense_source"],
             "(quantization cost, not a kernel error)")]
    lines = [f"Model: `{stage['pass']}` {cfg}; {e['quantized_modules']} QuantLinear modules, "
             f"{e['effective_bits']:.2f} effective bits, {e['bytes_on_disk']:,} bytes on disk; protocol "
             f"`{e['protocol']}`, {e['eval_tokens']:,} tokens.", "",
             "| model | PPL | rel. diff vs reference |", "|---|---|---|"]
    lines += [f"| {name} | {ppl:.4f} | {diff} |" for name, ppl, diff in rows]
    return "\n".join(lines)


def depth() -> str:
    """Peak RSS on the 60-block variant of SmolLM2 (blocks repeated) vs the 30-block model."""
    rows = [("GPTQ W4 g64", "quant.json", "depth_memory"), ("SliceGPT 25 %", "slicegpt.json", "depth")]
    lines = ["| pass | calibration | 30 blocks: peak RSS (wall) | 60 blocks: peak RSS (wall) | RSS ratio | command |",
             "|---|---|---|---|---|---|"]
    for label, file, key in rows:
        d = json.loads((RESULTS / file).read_text()).get(key)
        if not d or "layers_60" not in d:
            lines.append(f"| {label} | — | not measured | not measured | — | — |")
            continue
        a, b = d["layers_30"], d["layers_60"]
        lines.append(f"| {label} | {d.get('calibration', 'brown-512')} | {_gb(a['peak_rss_bytes'])} "
                     f"({a['wall_s']:.0f} s) | {_gb(b['peak_rss_bytes'])} ({b['wall_s']:.0f} s) | "
                     f"**{d['rss_ratio']:.3f}×** | `{d.get('command', '')}` |")
    return "\n".join(lines)


def _foundation(key: str) -> dict | None:
    path = RESULTS / "foundation.json"
    return json.loads(path.read_text()).get(key) if path.is_file() else None


def _same(d: dict) -> str:
    if d["differing"] == 0 and d["same_names"]:
        return f"identical ({d['tensors']} tensors)"
    return f"{d['differing']} of {d['tensors']} tensors differ (max rel. {d['max_rel_diff']:.2e})"


def cache_reuse() -> str:
    """GPTQ W3 with the Hessians the W4 run stored, vs that W4 run; tensors vs --no-cache."""
    d = _foundation("cache_reuse")
    head = ["| run | wall | peak RSS |", "|---|---|---|"]
    if d is None:
        return "\n".join([*head, "| — | not measured | — |"])
    rows = [("W4, empty store", d["w4_cold"]), ("W3, Hessians from the store", d["w3_cached"]),
            ("W3, --no-cache", d["w3_no_cache"])]
    lines = [*head, *(f"| {label} | {r['wall_s']:.0f} s | {_gb(r['peak_rss_bytes'])} |" for label, r in rows)]
    m = d["machine"]
    lines.append("")
    lines.append(f"W3 cached / W4: **{d['ratio_w3_cached_over_w4']:.3f}×** (goal ≤ {d['goal']}); W3 cached vs "
                 f"--no-cache: {_same(d['w3_vs_no_cache'])}. {d['protocol']}, {m['date']}, {m['cpu']}, "
                 f"{m['cores']} cores.")
    return "\n".join(lines)


def resume() -> str:
    """SIGKILL after block 15 of 30, then --resume: wall vs an uninterrupted run, tensors."""
    d = _foundation("resume")
    head = ["| pass | full run | killed after | resumed run | resumed / full | tensors vs full |",
            "|---|---|---|---|---|---|"]
    if d is None:
        return "\n".join([*head, "| — | not measured | — | — | — | — |"])
    lines = list(head)
    for r in d["rows"]:
        lines.append(f"| {r['pass']} | {r['full']['wall_s']:.0f} s | block {r['killed']['blocks_done_at_kill']} "
                     f"({r['killed']['wall_s']:.0f} s) | {r['resumed']['wall_s']:.0f} s | "
                     f"**{r['ratio_resumed_over_full']:.3f}×** | {_same(r['resumed_vs_full'])} |")
    m = d["machine"]
    lines += ["", f"{d['protocol']}, {m['date']}, {m['cpu']}, {m['cores']} cores; goal ≤ 0.6×."]
    return "\n".join(lines)


def port_regression() -> str:
    """Every existing pass, this tree vs the reference commit, per tensor."""
    d = _foundation("port_regression")
    head = ["| model | case | goal | result | met |", "|---|---|---|---|---|"]
    if d is None:
        return "\n".join([*head, "| — | — | — | not measured | — |"])
    lines = list(head)
    for r in d["rows"]:
        lines.append(f"| {r['model']} | {r['case']} | {r['goal']} | {_same(r)} | {'yes' if r['met'] else '**no**'} |")
    m = d["machine"]
    lines += ["", f"Reference: commit {d['reference']}; {m['date']}, {m['cpu']}, {m['cores']} cores."]
    return "\n".join(lines)


def plan_truth() -> str:
    """``compress plan``'s bytes and peak RSS vs one real run of the same recipe."""
    d = _foundation("plan_truth")
    head = ["| recipe | planned bytes | real bytes | ratio | planned peak RSS (phase) | real peak RSS | ratio |",
            "|---|---|---|---|---|---|---|"]
    if d is None:
        return "\n".join([*head, "| — | not measured | — | — | — | — | — |"])
    lines = list(head)
    for r in d["rows"]:
        lines.append(f"| {r['case']} | {_gb(r['planned_bytes'])} | {_gb(r['real_bytes'])} | **{r['bytes_ratio']:.3f}** | "
                     f"{_gb(r['planned_peak_rss_bytes'])} ({r['planned_phase']}) | {_gb(r['real_peak_rss_bytes'])} | "
                     f"**{r['rss_ratio']:.3f}** |")
    m, g = d["machine"], d["goals"]
    lines += ["", f"Goals: bytes within {g['bytes']:.0%}, peak RSS within {g['peak_rss']:.0%}. "
                  f"{d['rows'][0]['protocol']}, {m['date']}, {m['cpu']}, {m['cores']} cores."]
    return "\n".join(lines)


def device_map() -> str:
    """``compress eval`` of one GPTQ W4 g64 output on one device, with ``--device-map auto`` and
    with every other block offloaded to disk: the PPLs and whether they are equal."""
    path = RESULTS / "devices.json"
    d = json.loads(path.read_text()).get("device_map") if path.is_file() else None
    head = ["| placement | PPL | dense PPL | eval tokens | command |", "|---|---|---|---|---|"]
    if d is None:
        return "\n".join([*head, "| — | not measured | — | — | — |"])
    lines = list(head)
    for r in d["rows"]:
        lines.append(f"| {r['case']} | {r['ppl']:.4f} | {r['dense_ppl']:.4f} | {r['eval_tokens']:,} | "
                     f"`{r['command']}` |")
    m = d["machine"]
    auto = ", ".join(f"`{k or '(all)'}` → {v}" for k, v in d["auto_map"].items())
    same = {True: "**equal**", False: "**not equal**"}
    lines += ["", f"{d['scheme']} (`{d['quantize_command']}`). PPL with `--device-map auto` vs `--device cpu`: "
                  f"{same[d['ppl_equal_auto']]}; with the even blocks on disk: {same[d['ppl_equal_disk']]} (max rel. "
                  f"diff {d['max_rel_diff']:.1e}). The map `auto` chose here: {auto}. {d['protocol']}, {m['date']}, "
                  f"{m['cpu']}, {m['cores']} cores."]
    return "\n".join(lines)


def structprune() -> str:
    """The StructPrune sweep (brown-512): PPL, KL, top-1, parameters, wall and peak RSS of each
    allocation at each ratio; the acceptance ratios; the bench row; SliceGPT at equal params."""
    path = RESULTS / "structprune.json"
    d = json.loads(path.read_text()) if path.is_file() else {}
    head = ["| row | PPL | KL | top-1 | block linear params removed | params | bytes on disk | wall s | peak RSS | "
            "command |", "|---|---|---|---|---|---|---|---|---|---|"]
    if not d.get("sweep"):
        return "\n".join([*head, "| — | not measured | — | — | — | — | — | — | — | — |"])
    dense = d["dense"]
    lines = list(head)
    lines.append(f"| dense | {dense['ppl']:.2f} | — | — | 0 % | {dense['params'] / 1e6:.1f} M | "
                 f"{_gb(dense['bytes_on_disk'])} | — | — | — |")
    order = {m: i for i, m in enumerate(("structprune", "uniform-admm", "uniform-none", "global-admm"))}
    rows = sorted(d["sweep"], key=lambda r: (int(r["name"].rsplit("-", 1)[1]), order.get(r["name"].rsplit("-", 1)[0], 9)))
    for r in rows:
        lines.append(f"| {r['name']} | {r['ppl']:.2f} | {r['kl']:.3f} | {r['top1']:.3f} | "
                     f"{r['removed_fraction']:.2%} | {r['params'] / 1e6:.1f} M | {_gb(r['bytes_on_disk'])} | "
                     f"{r['wall_s']:.0f} | {_gb(r['peak_rss_bytes'])} | `{r['command']}` |")
    lines += ["", "| ratio | StructPrune ≤ uniform+ADMM | StructPrune / global | ≤ "
                  f"{d.get('global_tolerance', 1.05)}× global | peak RSS vs global | wall vs global |",
              "|---|---|---|---|---|---|"]
    yes = {True: "yes", False: "**no**"}
    for tag, a in sorted(d.get("acceptance", {}).items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {tag} % | {yes[a['le_uniform']]} | {a['vs_global']:.3f} | {yes[a['le_global_tol']]} | "
                     f"{a['rss_vs_global']:.2f} | {a['wall_vs_global']:.2f} |")
    b = d.get("bench")
    lines.append("")
    if b:
        lines.append(f"Prefill M = {b['tokens']} (`{b['command']}`, median of {b['repeats']}, {b['device']}): "
                     f"pruned {b['pruned_s'] * 1e3:.0f} ms vs dense {b['dense_s'] * 1e3:.0f} ms, ratio "
                     f"**{b['latency_ratio']:.2f}**; peak memory ratio {b['peak_ratio']:.2f}.")
    else:
        lines.append("Prefill bench of the 30 % model: not measured.")
    sg = d.get("slicegpt")
    if sg:
        lines += ["", "| StructPrune row | params | StructPrune PPL | SliceGPT PPL at equal params | ratio | better |",
                  "|---|---|---|---|---|---|"]
        for r in sg["rows"]:
            if r["slicegpt_ppl"] is None:
                # Below SliceGPT's smallest model: no interpolation, but when StructPrune has fewer parameters
                # *and* a lower PPL than that smallest SliceGPT model, it is better without any interpolation.
                p_min, ppl_min = min(sg["slicegpt_points"])
                dominates = r["params"] <= p_min and r["structprune_ppl"] < ppl_min
                verdict = "structprune (fewer params and lower PPL than SliceGPT's smallest)" if dominates else "—"
                lines.append(f"| {r['name']} | {r['params'] / 1e6:.1f} M | {r['structprune_ppl']:.2f} | outside the "
                             f"SliceGPT curve (its fewest: {p_min / 1e6:.1f} M at PPL {ppl_min:.2f}) | — | {verdict} |")
            else:
                lines.append(f"| {r['name']} | {r['params'] / 1e6:.1f} M | {r['structprune_ppl']:.2f} | "
                             f"{r['slicegpt_ppl']:.2f} | {r['ratio']:.2f} | {r['better']} |")
    m = d["machine"]
    lines += ["", f"{d['protocol']}, {d['model']}; `{d['commands'].get('sweep', '').strip()}`; {m['date']}, {m['cpu']}, "
                  f"{m['cores']} cores."]
    return "\n".join(lines)


def baq() -> str:
    """BAQ vs uniform GPTQ at average 2.5 / 3 / 4 bits (benchmarks/baq.py)."""
    path = RESULTS / "baq.json"
    if not path.is_file():
        return "| row | PPL |\n|---|---|\n| — | not measured |"
    d = json.loads(path.read_text())
    lines = ["| row | PPL | KL | top-1 | realised bits | weights at 2/3/4/8 bits | bytes on disk | "
             "peak RSS | log-loss corr. | command |", "|---|---|---|---|---|---|---|---|---|---|",
             f"| dense | {d['dense']['ppl']:.2f} | — | — | — | — | {_gb(d['dense']['bytes_on_disk'])} | — | — | — |"]
    for r in d.get("rows", []):
        a = r.get("allocation")
        if a:
            total = sum(a["weights_per_width"].values())
            mix = " / ".join(f"{100 * a['weights_per_width'].get(str(b), 0) / total:.1f} %" for b in (2, 3, 4, 8)) \
                if total else "—"  # (rows granularity: not counted by the 2026-12-03 script)
            corr = "—" if a["loss_log_correlation"] is None else f"{a['loss_log_correlation']:.3f}"
            bits = f"{a['realized']:.4f}"
        else:
            mix, corr, bits = "—", "—", "—"
        lines.append(f"| {r['name']} | {r['ppl']:.2f} | {r['kl']:.3f} | {r['top1']:.3f} | {bits} | {mix} | "
                     f"{_gb(r['bytes_on_disk'])} | {_gb(r['peak_rss_bytes'])} | {corr} | "
                     f"`{r['command']}` |")
    acc = d.get("acceptance", {})
    lines += ["", "| budget | check | value | met |", "|---|---|---|---|"]
    if "3.0" in acc:
        a = acc["3.0"]
        lines.append(f"| 3.0 | BAQ PPL / uniform W3 PPL (≤ {d['targets']['w3_ppl_ratio']}) | {a['ppl_ratio']:.3f} | "
                     f"{'yes' if a['le_target'] else 'no'} |")
        lines.append(f"| 3.0 | bytes / uniform W3 bytes (within ±{d['targets']['bytes_tolerance']:.0%}) | "
                     f"{a['bytes_ratio']:.4f} | {'yes' if a['bytes_within'] else 'no'} |")
    if "2.5" in acc:
        a = acc["2.5"]
        lines.append(f"| 2.5 | BAQ PPL / W2–W3 byte-matched interpolation ({a['interpolated_ppl']:.2f}) | "
                     f"{a['ppl_ratio']:.3f} | {'yes' if a['beats'] else 'no'} |")
    if "4.0" in acc:
        a = acc["4.0"]
        lines.append(f"| 4.0 | BAQ PPL / uniform W4 PPL (≤ 1) | {a['ppl_ratio']:.3f} | "
                     f"{'yes' if a['le_uniform'] else 'no'} |")
    if "budgets_met" in acc:
        lines.append(f"| all | realised average within ±{d['targets']['budget_tolerance']} of the budget | — | "
                     f"{'yes' if acc['budgets_met'] else 'no'} |")
    k = d.get("kernel_split")
    if k:
        parts = ", ".join(f"M = {r['m']}: {r['mixed_s'] * 1e3:.2f} ms vs {r['single_s'] * 1e3:.2f} ms "
                          f"(**{r['ratio']:.2f}×**)" for r in k["rows"])
        lines += ["", f"Mixed-width linear ({k['shape'][0]} × {k['shape'][1]}, g{k['group_size']}, widths "
                      f"{', '.join(f'{n}×{b}-bit' for b, n in k['widths'].items())} groups) vs one 3-bit linear, "
                      f"{k['served_by']}, {k['threads']} threads, median of {k['repeats']}: {parts}."]
    m = d["machine"]
    lines += ["", f"{d['protocol']}, {d['model']}; `{d['commands']['run']}`; {m['date']}, {m['cpu']}, "
                  f"{m['cores']} cores."]
    return "\n".join(lines)


def nupes() -> str:
    """NUPES vs uniform RTN and GPTQ at 3 / 4 bits, g64 (benchmarks/nupes.py)."""
    path = RESULTS / "nupes.json"
    if not path.is_file():
        return "| row | PPL |\n|---|---|\n| — | not measured |"
    d = json.loads(path.read_text())
    lines = ["| row | PPL | KL | top-1 | bytes on disk | exponents (min..max) | wall | s per block | peak RSS | "
             "command |", "|---|---|---|---|---|---|---|---|---|---|",
             f"| dense | {d['dense']['ppl']:.2f} | — | — | {_gb(d['dense']['bytes_on_disk'])} | — | — | — | — | — |"]
    for r in d.get("rows", []):
        t = r.get("timing", {})
        exps = f"{t['exponent_min']:.2f}..{t['exponent_max']:.2f}" if "exponent_min" in t else "—"
        lines.append(f"| {r['name']} | {r['ppl']:.2f} | {r['kl']:.3f} | {r['top1']:.3f} | {_gb(r['bytes_on_disk'])} | "
                     f"{exps} | {r['wall_s']:.0f} s | {t.get('block_s_mean', float('nan')):.1f} | "
                     f"{_gb(r['peak_rss_bytes'])} | `{r['command']}` |")
    acc = d.get("acceptance", {})
    lines += ["", "| check | value | bytes ratio | met |", "|---|---|---|---|"]
    for b in (3, 4):
        a = acc.get(f"data_free_w{b}")
        if a:
            lines.append(f"| data-free NUPES W{b} PPL / RTN W{b} PPL (< 1) | {a['ppl_ratio_vs_rtn']:.3f} | "
                         f"{a['bytes_ratio']:.4f} | {'yes' if a['beats_rtn'] else 'no'} |")
    for b in (3, 4):
        a = acc.get(f"learned_w{b}")
        if a:
            lines.append(f"| learned NUPES W{b} PPL / GPTQ W{b} PPL (≤ {a['target']}) | {a['ppl_ratio_vs_gptq']:.3f} | "
                         f"{a['bytes_ratio']:.4f} | {'yes' if a['met'] else 'no'} |")
    bench = d.get("bench")
    if bench:
        parts = ", ".join(f"{p['phase']} {p['tokens']}: {p['nupes_s'] * 1e3:.1f} ms vs {p['uniform_s'] * 1e3:.1f} ms "
                          f"(**{p['latency_ratio']:.2f}×**)" for p in bench["phases"])
        lines += ["", f"Serving, NUPES W4 (lut) vs GPTQ W4 (quant), {bench['served_by']}: {parts}; "
                      f"`{bench['command']}`; {bench['machine']['date']}."]
    lines += ["", _footer(d)]
    return "\n".join(lines)


def svd_cluster() -> str:
    """Clustered shared bases vs per-layer whitened SVD vs fixed pairs (benchmarks/svd_cluster.py)."""
    path = RESULTS / "svd_cluster.json"
    if not path.is_file():
        return "| row | PPL |\n|---|---|\n| — | not measured |"
    d = json.loads(path.read_text())
    lines = ["| row | PPL | KL | top-1 | targeted params (ratio) | shared bases | bytes on disk | wall | peak RSS | "
             "command |", "|---|---|---|---|---|---|---|---|---|---|",
             f"| dense | {d['dense']['ppl']:.2f} | — | — | — | — | {_gb(d['dense']['bytes_on_disk'])} | — | — | — |"]
    for r in d.get("rows", []):
        lines.append(f"| {r['name']} | {r['ppl']:.2f} | {r['kl']:.3f} | {r['top1']:.3f} | "
                     f"{r['targeted_params']:,} ({r['param_ratio']:.4f}) | {r['shared_groups']} | "
                     f"{_gb(r['bytes_on_disk'])} | {r['wall_s']:.0f} s | {_gb(r['peak_rss_bytes'])} | "
                     f"`{r['command']}` |".replace("q_proj|", "q_proj\\|").replace("v_proj|", "v_proj\\|")
                     .replace("k_proj|", "k_proj\\|").replace("gate_proj|", "gate_proj\\|"))
    acc = d.get("acceptance", {})
    if acc:
        lines += ["", "| ratio | share PPL / lowrank PPL | share PPL / pairs PPL | share params / lowrank params | "
                      "met (≤ both) |", "|---|---|---|---|---|"]
        for key, a in acc.items():
            lines.append(f"| {key.split('_', 1)[1]} | {a['ppl_ratio_vs_lowrank']:.4f} | {a['ppl_ratio_vs_pairs']:.4f} | "
                         f"{a['params_ratio_vs_lowrank']:.4f} | {'yes' if a['met'] else 'no'} |")
    est = d.get("estimators")
    if est:
        lines += ["", "| estimator | blocks | clustering s | candidate evaluations | exact SVDs run | avoided | "
                      "clusters (layers) | max abs(estimated − exact) |", "|---|---|---|---|---|---|---|---|"]
        for name, e in est.items():
            lines.append(f"| {name} | {e['blocks']} | {e['clustering_s']:.1f} | {e['evaluations']} | {e['exact_svds']} | "
                         f"{e['svds_avoided']} | {e['clusters']} ({e['clustered_layers']}) | "
                         f"{e['max_abs_error_gap']:.2e} |")
    lines += ["", _footer(d)]
    return "\n".join(lines)


def rco() -> str:
    """RCO vs BAQ, uniform GPTQ and greedy at 2.5 / 3 / 3.5 average bits (benchmarks/rco.py)."""
    path = RESULTS / "rco.json"
    if not path.is_file():
        return "| row | PPL |\n|---|---|\n| — | not measured |"
    d = json.loads(path.read_text())
    lines = ["| row | PPL | KL | top-1 | realised bits | options (share of weights) | s/step | optimise s | "
             "bytes on disk | wall | peak RSS | command |", "|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| dense | {d['dense']['ppl']:.2f} | — | — | — | — | — | — | {_gb(d['dense']['bytes_on_disk'])} | — | — | — |"]
    for r in d.get("rows", []):
        a = r.get("assignment") or {}
        shares = " ".join(f"{k}:{100 * v:.0f}%" for k, v in a.get("shares", {}).items()) or "—"
        bits = f"{a['realized_average_bits']:.4f}" if a else "—"
        sps = f"{a['seconds_per_step']:.2f}" if a.get("seconds_per_step") else "—"
        opt = f"{a['optimize_seconds']:.0f}" if a.get("optimize_seconds") else "—"
        lines.append(f"| {r['name']} | {r['ppl']:.2f} | {r['kl']:.3f} | {r['top1']:.3f} | {bits} | {shares} | {sps} | "
                     f"{opt} | {_gb(r['bytes_on_disk'])} | {r['wall_s']:.0f} s | {_gb(r['peak_rss_bytes'])} | "
                     f"`{r['command']}` |")
    acc = d.get("acceptance", {})
    budgets = [k for k in acc if k != "mixed"]
    if budgets:
        lines += ["", "| budget | RCO PPL | peers (PPL) | RCO / best peer | ≤ every peer | abs(avg − B) bits | met |",
                  "|---|---|---|---|---|---|---|"]
        for b in budgets:
            a = acc[b]
            peers = ", ".join(f"{k} {v:.2f}" for k, v in a["peers"].items()) or "—"
            ratio = "—" if a["ratio_to_best_peer"] is None else f"{a['ratio_to_best_peer']:.4f}"
            met = a["le_every_peer"] and a["budget_met"]
            lines.append(f"| {b} | {a['rco_ppl']:.2f} | {peers} | {ratio} | {'yes' if a['le_every_peer'] else 'no'} | "
                         f"{a['budget_error_bits']:.1e} | {'yes' if met else 'no'} |")
    if "mixed" in acc:
        m = acc["mixed"]
        lines += ["", f"Mixed methods (gptq + lowrank at the uniform-3 byte budget): PPL {m['mixed_ppl']:.2f} vs "
                      f"bits-only RCO {m['bits_only_ppl']:.2f} ({'beats' if m['beats_bits_only'] else 'does not beat'} it)."]
    db = next((r["database"] for r in d.get("rows", []) if "database" in r), None)
    if db:
        per = ", ".join(f"{k} {v:.0f} s" for k, v in db["per_option_s"].items())
        lines += ["", f"Candidate database solves (summed from the database): {per}; total {db['total_s']:.0f} s."]
    lines += ["", _footer(d)]
    return "\n".join(lines)


def flatquant() -> str:
    """FlatQuant W4A4 KV4 vs RTN, Hadamard and SmoothQuant baselines, W4A8 and W4A16 (benchmarks/flatquant.py)."""
    path = RESULTS / "flatquant.json"
    if not path.is_file():
        return "| row | PPL |\n|---|---|\n| — | not measured |"
    d = json.loads(path.read_text())
    dense = d["dense"]["ppl"]
    lines = ["| row | calibration | PPL | PPL / dense | KL | top-1 | bytes on disk | wall | peak RSS | command |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| dense | — | {dense:.2f} | 1.00 | — | — | {_gb(d['dense']['bytes_on_disk'])} | — | — | — |"]
    for r in d.get("rows", []):
        lines.append(f"| {r['name']} | {r.get('calibration') or '—'} | {r['ppl']:.2f} | {r['ppl'] / dense:.2f} | "
                     f"{r['kl']:.3f} | {r['top1']:.3f} | {_gb(r['bytes_on_disk'])} | {r['wall_s']:.0f} s | "
                     f"{_gb(r['peak_rss_bytes'])} | `{r['command']}` |")
    acc = d.get("acceptance", {})
    if acc:
        lines += ["", "| FlatQuant row (calibration) | vs | peer PPL | ratio | limit | met |", "|---|---|---|---|---|---|"]
        for name, a in acc.items():
            for peer, p in a["peers"].items():
                lines.append(f"| {name} ({a['calibration']}) | {peer} | {p['ppl']:.2f} | {p['ratio']:.3f} | "
                             f"≤ {p['limit']} | {'yes' if p['met'] else 'no'} |")
    fq = next((r for r in d.get("rows", []) if "training" in r and r["training"]["train_s_total"] > 0), None)
    if fq:
        t = fq["training"]
        b = t["blocks"]
        lines += ["", f"Calibration ({fq['name']}, CPU): {t['block_s_median']:.0f} s per block (median), "
                      f"{t['block_s_total']:.0f} s over {len(b)} blocks ({t['train_s_total']:.0f} s training); "
                      f"block-output MSE after / before training: median "
                      f"{statistics.median(x['mse_after'] / x['mse_before'] for x in b):.3f}."]
    bench = (d.get("bench") or {}).get("result")
    if bench:
        lines += ["", "| phase | W4A4 KV4 latency | dense latency | ratio | W4A4 peak | dense peak |",
                  "|---|---|---|---|---|---|"]
        for ph in bench["phases"]:
            c, n = ph["compressed"], ph["dense"]
            what = f"{ph['phase']} {ph['tokens']}"
            lines.append(f"| {what} | {1000 * c['latency_s']:.1f} ms | {1000 * n['latency_s']:.1f} ms | "
                         f"{c['latency_s'] / n['latency_s']:.2f}× | {_gb(c['peak_bytes'])} | {_gb(n['peak_bytes'])} |")
        lines += ["", f"`{d['bench']['command']}` ({bench['device']}, per-token decode latency)."]
    lines += ["", _footer(d)]
    return "\n".join(lines)


SERVING_LABELS = {"gptq-w4g64": "GPTQ W4 g64 (blocks)", "gptq-w4g64-head8": "+ int8 head (shared codes)",
                  "gptq-w4g64-head4": "+ int4 g64 head (GPTQ, shared codes)", "rtn-w8": "RTN W8 per channel"}


def serving() -> str:
    """CPU serving vs dense fp32 (benchmarks/serving.py): decode, prefill, roofline, quality, greedy."""
    d = json.loads((RESULTS / "serving.json").read_text())
    rows = [(k, d["rows"][k]) for k in SERVING_LABELS if k in d["rows"]]
    lines = ["| model | decode tok/s | dense tok/s | speed-up (target) | prefill 512 vs dense | MB / token | "
             "bandwidth (share of copy) | resident after load vs dense | PPL served | PPL twin | dense PPL |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in rows:
        b, q = r["bench"], r.get("quality", {})
        target = "" if b.get("target") is None else f" (≥ {b['target']}×)"
        nat, twin = q.get("native", {}), q.get("twin", {})
        lines.append(f"| {SERVING_LABELS[k]} | {b['decode_tokens_per_s']:.1f} | {b['dense_decode_tokens_per_s']:.1f} | "
                     f"**{b['decode_speedup']:.2f}×**{target} | {b['prefill512_ratio']:.2f}× "
                     f"({1000 * b['prefill512_s']:.0f} vs {1000 * b['dense_prefill512_s']:.0f} ms) | "
                     f"{b['bytes_per_token'] / 1e6:.1f} | {b['achieved_Bps'] / 1e9:.2f} GB/s "
                     f"({100 * b['bandwidth_share']:.0f} %) | {_gb(b['loaded_bytes'])} vs {_gb(b['dense_loaded_bytes'])} | "
                     f"{nat.get('ppl', float('nan')):.2f} | "
                     f"{twin.get('ppl', float('nan')):.2f} | {nat.get('dense_ppl', float('nan')):.2f} |")
    first = rows[0][1]["bench"] if rows else None
    if first:
        lines += ["", f"Copy bandwidth (same run): {first['copy_bandwidth_Bps'] / 1e9:.1f} GB/s; dense fp32 decode "
                      f"reaches {100 * first['dense_bandwidth_share']:.0f} % of it. Threads: {first['threads']}; "
                      f"medians of {first['repeats']} runs, a fresh process per measurement."]
    for k, r in rows:
        paths = "; ".join(f"{n}× {p}" for p, n in sorted(r["bench"]["decode_paths"].items(), key=lambda kv: -kv[1]))
        lines.append(f"- {SERVING_LABELS[k]} (`{r['build']['command']}`), paths at M = 1: {paths}")
    for k, r in rows:
        g = r.get("greedy")
        if g:
            parts = [("identical" if p["identical"] else
                      f"differs from token {p['first_difference']} (twin logit gap {p['twin_logit_gap']:.2g})")
                     for p in g["prompts"]]
            lines.append(f"- greedy, {SERVING_LABELS[k]}: native = twin on {g['identical']} of {g['of']} prompts "
                         f"({g['tokens']} tokens after {g['prompt_tokens']}): " + "; ".join(parts))
    lines += ["", "Targets of issue 18 (computed from the JSON):"]
    for k, r in rows:
        b = r["bench"]
        if b.get("target") is not None:
            ok = "met" if b["decode_speedup"] >= b["target"] else "**not met**"
            lines.append(f"- decode, {SERVING_LABELS[k]}: {b['decode_speedup']:.2f}× dense, target ≥ {b['target']}× — {ok}")
    worst = max(r["bench"]["prefill512_ratio"] for _, r in rows)
    lines.append(f"- prefill 512 ≤ 1.0× dense's time: worst row {worst:.2f}× — {'met' if worst <= 1.0 else '**not met**'}")
    if "gptq-w4g64" in d["rows"]:
        share = d["rows"]["gptq-w4g64"]["bench"]["bandwidth_share"]
        lines.append(f"- W4 decode bandwidth ≥ 50 % of copy: {100 * share:.0f} % — {'met' if share >= 0.5 else '**not met**'}")
    for k, r in rows:
        g = r.get("greedy")
        if g:
            ties = all(p["identical"] or p["tie_within_1e-4"] for p in g["prompts"])
            lines.append(f"- greedy native = twin (or ties within 1e-4), {SERVING_LABELS[k]}: "
                         f"{'met' if ties else '**not met**'}")
    c = d.get("op_ceiling")
    if c:
        ops = "; ".join(f"{k.replace('_', ' ')} {c[k]['ms']:.2f} ms = {c[k]['Bps'] / 1e9:.1f} GB/s "
                        f"({100 * c[k]['share_of_copy']:.0f} % of copy)" for k in ("int4_g64", "int8_channel", "fp32_dense"))
        lines.append(f"\nOp ceiling — the ops alone at M = 1 on the {c['shape'][0]} × {c['shape'][1]} head matrix "
                     f"(copy {c['copy_bandwidth_Bps'] / 1e9:.1f} GB/s, {c['threads']} threads, each call reading another "
                     f"copy of the matrix out of {c.get('span_bytes', 0) / 1e6:.0f} MB, so not from cache): {ops}")
    m = d["machine"]
    cmds = "; ".join(f"`{c}`" for c in d["commands"].values())
    lines += ["", f"{d['protocol']} (PPL), {d['model']}; {cmds}; {m['date']}, {m['cpu']}, "
                  f"{m['cores']} cores. GPU: not measured (no device lent)."]
    return "\n".join(lines)


if __name__ == "__main__":
    table = {"quant-quality": quant_quality, "quant-cost": quant_cost, "kernels-e2e": kernels_e2e,
             "depth": depth, "cache-reuse": cache_reuse, "resume": resume, "port-regression": port_regression,
             "plan-truth": plan_truth, "device-map": device_map,
             "structprune": structprune, "baq": baq, "nupes": nupes, "svd-cluster": svd_cluster,
             "rco": rco, "flatquant": flatquant, "serving": serving}
    if len(sys.argv) != 2 or sys.argv[1] not in table:
        raise SystemExit(f"usage: python benchmarks/render.py {{{'|'.join(table)}}}")
    print(table[sys.argv[1]]())
