"""Low-rank (plain vs whitened SVD) and FlashSVD serving: exactness, quality, activation memory.

Writes benchmarks/results/lowrank.json (summarised in BENCHMARKS.md). Sections:

* ``exactness``: (a) every linear of the first and last block of SmolLM2-135M and
  all-MiniLM-L6-v2 factored at full rank, plain and whitened (Gram of real calibration inputs,
  brown-128-smoke windows), applied in fp32 to those inputs: max relative error vs the float64
  dense layer; (b) fused FlashSVD model vs the same model unfused, fp32, on the ratio-0.5
  whitened checkpoints of the quality section (SmolLM2: logits of 2×300 tokens, one sequence
  right-padded; MiniLM: last hidden states of 32 padded brown test sentences).
* ``quality``: SmolLM2 token PPL (protocol brown-512) and MiniLM mean-pooled embedding cosine
  (protocol brown-sentences-512) at parameter ratios 0.9, 0.8, 0.6, 0.5, plain vs whitened;
  compression wall time and peak RSS of each run (subprocess).
* ``memory``: one block (SmolLM2 decoder layer / MiniLM encoder layer, random weights, linears
  factored at ratio 0.5 with random factors, fp32) at batch 8 and sequence 512, 2048, 8192:
  dense vs unfused low-rank vs FlashSVD. Each configuration runs in a fresh subprocess with one
  thread: inputs are built and a short warm-up forward runs, the kernel's peak-RSS mark is reset
  (``/proc/self/clear_refs`` ← 5), then one timed forward; transient memory = ``VmHWM`` after the
  forward − ``VmRSS`` before it (everything the forward allocated, output included).

* ``ablation``: MiniLM whitened with Gram matrices from the calibration windows vs from
  calibration sentences encoded as served (see :func:`encoder_calibration_ablation`).

Usage: python benchmarks/lowrank.py [--sections quality,exactness,ablation,memory] [--resume]
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the checkout, not benchmarks/ (its kernels.py would shadow the PyPI package transformers imports)

import torch  # noqa: E402

from benchmarks.common import RESULTS, compress_cmd, machine, measured, merge_save  # noqa: E402

NAME = "lowrank"
RATIOS = (0.9, 0.8, 0.6, 0.5)
MODELS = {"smollm2": "smollm2-135m", "minilm": "minilm-l6"}
SEQ_LENS = (512, 2048, 8192)
BATCH = 8
MEM_RATIO = 0.5


# -- memory (child process) -----------------------------------------------------------------------
def _status_kb(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _factor_randomly(block: torch.nn.Module, names: list[str], ratio: float) -> None:
    """Replace each named linear by a LowRankLinear of the ratio's rank (random factors)."""
    from compress.algos.svd import rank_for_ratio
    from compress.modules.lowrank import LowRankLinear

    g = torch.Generator().manual_seed(0)
    for name in names:
        lin = block.get_submodule(name)
        r = rank_for_ratio(lin.in_features, lin.out_features, ratio)
        U = torch.randn(lin.in_features, r, generator=g) / lin.in_features ** 0.5
        V = torch.randn(r, lin.out_features, generator=g) / r ** 0.5
        parent, _, leaf = name.rpartition(".")
        setattr(block.get_submodule(parent), leaf, LowRankLinear.from_factors(U, V, lin.bias, torch.float32))


def _block(model: str, variant: str):  # noqa: ANN202
    """(block, family, config) with random weights; linears factored unless ``dense``."""
    import transformers

    from compress.arch import BERT, LLAMA
    from compress.assets import materialize
    from compress.modules.flashsvd import enable_flashsvd_block

    cfg = transformers.AutoConfig.from_pretrained(materialize(MODELS[model]))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    if model == "smollm2":
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer
        block, adapter = LlamaDecoderLayer(cfg, 0), LLAMA
    else:
        from transformers.models.bert.modeling_bert import BertLayer
        block, adapter = BertLayer(cfg, 0), BERT
    block.eval()
    if variant != "dense":
        _factor_randomly(block, list(adapter.linears), MEM_RATIO)
    if variant == "flashsvd":
        rep = enable_flashsvd_block(block, adapter.name)
        assert rep.total == 2, rep
    return block, adapter.name, cfg


def _inputs(model: str, cfg, L: int, batch: int) -> dict:  # noqa: ANN001
    hidden = torch.randn(batch, L, cfg.hidden_size)
    if model == "smollm2":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        pos = torch.arange(L)[None]
        return {"hidden_states": hidden, "position_embeddings": LlamaRotaryEmbedding(cfg)(hidden, pos),
                "use_cache": False}
    return {"hidden_states": hidden}


def memory_child(model: str, variant: str, L: int, batch: int) -> dict:
    """One configuration, measured in this (fresh) process."""
    import ctypes

    torch.set_num_threads(1)
    block, _, cfg = _block(model, variant)
    with torch.no_grad():
        block(**_inputs(model, cfg, 64, 1))  # warm-up: lazy initialisation outside the window
        inputs = _inputs(model, cfg, L, batch)
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _status_kb("VmRSS")
        t0 = time.perf_counter()
        out = block(**inputs)
        dt = time.perf_counter() - t0
        peak = _status_kb("VmHWM")
        for _ in range(1 if L > 2048 else 2):  # latency: best of a few where they are cheap
            del out
            t0 = time.perf_counter()
            out = block(**inputs)
            dt = min(dt, time.perf_counter() - t0)
    out = out[0] if isinstance(out, tuple) else out
    assert torch.isfinite(out).all()
    return {"model": model, "variant": variant, "seq_len": L, "batch": batch,
            "transient_bytes": (peak - base) * 1024, "latency_s": round(dt, 3),
            "baseline_rss_bytes": base * 1024}


def run_memory() -> list[dict]:
    rows = []
    for model in MODELS:
        for L in SEQ_LENS:
            for variant in ("dense", "lowrank", "flashsvd"):
                cmd = [sys.executable, __file__, "--memory-child", f"{model},{variant},{L}"]
                res = subprocess.run(cmd, capture_output=True, text=True, env=_one_thread_env(), check=False)
                if res.returncode != 0:
                    raise RuntimeError(f"memory child {model},{variant},{L} failed:\n{res.stderr[-3000:]}")
                row = json.loads(res.stdout.strip().splitlines()[-1])
                print(f"memory {model:8s} L={L:5d} {variant:9s} transient {row['transient_bytes'] / 2**20:8.1f} MiB"
                      f"  {row['latency_s']:.2f} s", flush=True)
                rows.append(row)
    return rows


def memory_summary(rows: list[dict]) -> list[dict]:
    """FlashSVD / unfused low-rank ratios of transient memory and latency (same run)."""
    out = []
    for model in MODELS:
        for L in SEQ_LENS:
            get = {r["variant"]: r for r in rows if r["model"] == model and r["seq_len"] == L}
            if {"lowrank", "flashsvd"} <= set(get):
                f, u = get["flashsvd"], get["lowrank"]
                out.append({"model": model, "seq_len": L, "batch": BATCH,
                            "memory_ratio_vs_lowrank": f["transient_bytes"] / u["transient_bytes"],
                            "latency_ratio_vs_lowrank": f["latency_s"] / u["latency_s"],
                            "memory_ratio_vs_dense": f["transient_bytes"] / get["dense"]["transient_bytes"]
                            if "dense" in get else None})
    return out


def _one_thread_env() -> dict:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# -- quality --------------------------------------------------------------------------------------
def _out_dir(model: str, ratio: float, whiten: bool) -> Path:
    from compress.assets import cache_dir

    return cache_dir() / "bench" / "lowrank" / f"{model}-r{ratio}-{'white' if whiten else 'plain'}"


def quality_row(model: str, ratio: float, whiten: bool, protocol: str, calib_samples: int | None = None) -> dict:
    """Compress (subprocess, measured) and evaluate one configuration. ``calib_samples``
    overrides the number of calibration windows of ``protocol`` (``--n-samples``); plain SVD
    reads no calibration data, so it only changes the whitened runs."""
    from compress.assets import materialize
    from compress.eval import evaluate

    src = materialize(MODELS[model])
    out = _out_dir(model, ratio, whiten)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    args = ["lowrank", str(src), "--ratio", str(ratio), "--whiten" if whiten else "--no-whiten",
            "-o", str(out), "--overwrite"]
    if whiten:  # plain SVD is data-free: the CLI refuses calibration options for it
        args += ["--protocol", protocol]
        if calib_samples is not None:
            args += ["--n-samples", str(calib_samples)]
    run = measured(compress_cmd(*args), env=_one_thread_env(), log=log)
    res = evaluate(out, src, protocol=protocol)
    # the calibration protocol as the run recorded it: a reduced one has its own name
    # (brown-512 on 32 windows is brown-512-c32); None when nothing was calibrated
    cal = json.loads((out / "compression.json").read_text()).get("calibration") or {}
    calib_name = cal.get("protocol")
    row = {"model": model, "ratio": ratio, "whiten": whiten, "compress_wall_s": run["wall_s"],
           "compress_peak_rss_bytes": run["peak_rss_bytes"], "command": "compress " + " ".join(args),
           "calibration_protocol": calib_name,
           "calibration": (f"{calib_name}: {cal.get('windows', ['?'])[0]} windows of the {protocol} "
                           "calibration split" if calib_name else "none (plain SVD reads no data)"),
           **{k: v for k, v in vars(res).items() if k not in ("model",)}}
    print(f"quality {model} ratio {ratio} {'white' if whiten else 'plain'}: "
          + (f"PPL {res.ppl:.3f} (dense {res.dense_ppl:.3f})" if hasattr(res, "ppl")
             else f"cosine {res.cosine_mean:.5f} (min {res.cosine_min:.5f})"), flush=True)
    return row


def run_quality(previous: list[dict], protocol: str, calib_samples: dict[str, int] | None = None) -> list[dict]:
    """Every (model, ratio, plain/whitened) not already in ``previous``; the JSON is written
    after each row, so an interrupted run resumes where it stopped."""
    calib_samples = calib_samples or {}
    rows = list(previous)
    done = {(r["model"], r["ratio"], r["whiten"]) for r in rows}
    for model in ("minilm", "smollm2"):
        for ratio in RATIOS:
            for whiten in (False, True):
                if (model, ratio, whiten) in done:
                    continue
                rows.append(quality_row(model, ratio, whiten, protocol, calib_samples.get(model)))
                _checkpoint("quality", rows)
    return rows


def whitened_wins(rows: list[dict]) -> dict[str, bool]:
    """Per model: whitened strictly better than plain at every ratio measured."""
    out = {}
    for model in MODELS:
        verdicts = []
        for ratio in RATIOS:
            get = {r["whiten"]: r for r in rows if r["model"] == model and r["ratio"] == ratio}
            if len(get) == 2:
                key, better = ("ppl", min) if model == "smollm2" else ("cosine_mean", max)
                verdicts.append(better(get[True][key], get[False][key]) == get[True][key]
                                and get[True][key] != get[False][key])
        out[model] = bool(verdicts) and all(verdicts)
    return out


# -- exactness ------------------------------------------------------------------------------------
def _captured_inputs(model, adapter, windows: torch.Tensor, layer_ids: list[int]) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Inputs of every linear of the chosen blocks on the calibration windows, ``[rows, in]``."""
    caught: dict[str, list[torch.Tensor]] = {}
    hooks = []
    layers = model.get_submodule(adapter.layers)
    for i in layer_ids:
        for rel in adapter.linears:
            name = f"{adapter.layer_prefix(i)}{rel}"
            caught[name] = []
            hooks.append(layers[i].get_submodule(rel).register_forward_pre_hook(
                lambda _m, a, n=name: caught[n].append(a[0].reshape(-1, a[0].shape[-1]).detach())))
    with torch.no_grad():
        for b in windows.split(4):
            model(input_ids=b)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in caught.items()}


def layer_exactness(model_key: str) -> dict:
    """Full-rank plain and whitened factors of the first and last block, fp32 vs float64."""
    from compress.algos import svd
    from compress.api import load
    from compress.assets import materialize
    from compress.checkpoint import CheckpointReader
    from compress.recipe import CalibrationConfig
    from compress.runner import load_calibration

    src = materialize(MODELS[model_key])
    model = load(src)
    adapter = model.compress_adapter
    n = len(model.get_submodule(adapter.layers))
    calib = load_calibration(src, CalibrationConfig(protocol="brown-128-smoke"), CheckpointReader(src).config)
    X = _captured_inputs(model, adapter, calib.windows, [0, n - 1])
    worst = {"plain": 0.0, "whitened": 0.0}
    for name, x in X.items():
        lin = model.get_submodule(name)
        W = lin.weight.detach()
        ref = x.double() @ W.double().T + (0 if lin.bias is None else lin.bias.double())
        G = x.double().T @ x.double() / x.shape[0]
        for kind, gram in (("plain", None), ("whitened", G)):
            f = svd.truncated_svd(W, min(W.shape), gram, damp=0.0)
            y = x @ f.U.float() @ f.V.float() + (0 if lin.bias is None else lin.bias)
            worst[kind] = max(worst[kind], float((y.double() - ref).abs().max() / ref.abs().max()))
    return {"linears": len(X), "blocks": [0, n - 1], "max_rel_err_fp32": worst}


def fused_exactness() -> dict:
    """FlashSVD model vs the same model unfused (fp32) on the ratio-0.5 whitened checkpoints."""
    from transformers import AutoTokenizer

    from compress.api import load
    from compress.calib.corpus import load_corpus
    from compress.calib.protocol import get_protocol, split_lines
    from compress.modules.flashsvd import enable_flashsvd

    out = {}
    path = _out_dir("smollm2", 0.5, True)
    if path.is_dir():
        model = load(path)
        ids = torch.randint(0, 49152, (2, 300), generator=torch.Generator().manual_seed(0))
        am = torch.ones_like(ids)
        am[1, 250:] = 0
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=am, use_cache=False).logits
            enable_flashsvd(model)
            got = model(input_ids=ids, attention_mask=am, use_cache=False).logits
        keep = am.bool()[..., None]
        out["smollm2"] = float(((got - ref).abs() * keep).max() / (ref.abs() * keep).max())
    path = _out_dir("minilm", 0.5, True)
    if path.is_dir():
        model = load(path)
        lines, _ = load_corpus(None)
        sentences = split_lines(lines, get_protocol("brown-512"))[1][:32]
        enc = AutoTokenizer.from_pretrained(path)(sentences, padding=True, return_tensors="pt")
        with torch.no_grad():
            ref = model(**enc).last_hidden_state
            enable_flashsvd(model)
            got = model(**enc).last_hidden_state
        keep = enc["attention_mask"].bool()[..., None]
        out["minilm"] = float(((got - ref).abs() * keep).max() / (ref.abs() * keep).max())
    return {"max_rel_err_fp32": out, "tolerance": 1e-4}


# -- encoder calibration ablation -----------------------------------------------------------------
def _dense_grams(model, adapter, feed) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Mean ``XᵀX`` (float64) of every group's input in the *dense* model, rows where the
    current ``feed.mask`` is 1 (all rows when it is None)."""
    sums: dict[str, list] = {}
    hooks = []
    layers = model.get_submodule(adapter.layers)
    for i, layer in enumerate(layers):
        for g in adapter.groups:
            name = f"{adapter.layer_prefix(i)}{g[0]}"
            sums[name] = [0.0, 0]

            def hook(_m, a, name=name):  # noqa: ANN001, ANN202
                x = a[0].reshape(-1, a[0].shape[-1]).double()  # [rows, in]
                if feed.mask is not None:
                    x = x[feed.mask.reshape(-1).bool()]
                sums[name][0] = sums[name][0] + x.T @ x
                sums[name][1] += x.shape[0]
            hooks.append(layer.get_submodule(g[0]).register_forward_pre_hook(hook))
    with torch.no_grad():
        feed()
    for h in hooks:
        h.remove()
    return {k: v[0] / v[1] for k, v in sums.items()}


def encoder_calibration_ablation() -> dict:
    """MiniLM whitened at ratios 0.8 / 0.5 with Gram matrices from (a) the pass's calibration
    windows (brown-512: 128 × 512 tokens of joined text, one [CLS] per document) and (b) 4096
    calibration *sentences* encoded as the model serves them ([CLS] s [SEP], padded, padded rows
    excluded). Both factor every linear from the dense model's Grams (no propagation), damp
    1e-4; cosine under brown-sentences-512. Isolates the effect of the calibration inputs."""
    import copy

    from transformers import AutoTokenizer

    from compress.algos import svd
    from compress.api import load
    from compress.assets import materialize
    from compress.calib.corpus import load_corpus
    from compress.calib.protocol import get_protocol, split_lines
    from compress.checkpoint import CheckpointReader
    from compress.eval_encoder import SENTENCE_PROTOCOLS, cosine_stats, embed, eval_sentences
    from compress.recipe import CalibrationConfig
    from compress.runner import load_calibration

    src = materialize(MODELS["minilm"])
    tok = AutoTokenizer.from_pretrained(src)
    dense = load(src)
    adapter = dense.compress_adapter
    proto = SENTENCE_PROTOCOLS["brown-sentences-512"]
    ref = embed(dense, tok, eval_sentences(proto, None), proto)
    calib_lines = split_lines(load_corpus(None)[0], get_protocol("brown-512"))[0][:4096]

    class Windows:
        mask = None

        def __call__(self) -> None:
            cal = load_calibration(src, CalibrationConfig(), CheckpointReader(src).config)
            for b in cal.windows.split(8):
                dense(input_ids=b)

    class Sentences:
        mask = None

        def __call__(self) -> None:
            for i in range(0, len(calib_lines), 32):
                enc = tok(calib_lines[i:i + 32], padding=True, truncation=True, max_length=256,
                          return_tensors="pt")
                self.mask = enc["attention_mask"]
                dense(**enc)

    grams = {"windows": _dense_grams(dense, adapter, Windows()),
             "sentences": _dense_grams(dense, adapter, Sentences())}
    rows = []
    for ratio in (0.8, 0.5):
        for source, G in grams.items():
            model = copy.deepcopy(dense)
            layers = model.get_submodule(adapter.layers)
            for i, layer in enumerate(layers):
                for g in adapter.groups:
                    for n in g:
                        lin = layer.get_submodule(n)
                        W = lin.weight.detach()
                        r = svd.rank_for_ratio(W.shape[1], W.shape[0], ratio)
                        gram = G[f"{adapter.layer_prefix(i)}{g[0]}"]
                        lin.weight.data = svd.truncated_svd(W, r, gram, 1e-4).weight().float()
            stats = cosine_stats(embed(model, tok, eval_sentences(proto, None), proto), ref)
            print(f"ablation ratio {ratio} grams from {source}: cosine {stats['mean']:.5f}", flush=True)
            rows.append({"ratio": ratio, "gram_source": source, "protocol": proto.name, **stats})
    return {"rows": rows, "note": encoder_calibration_ablation.__doc__}


# -- driver ---------------------------------------------------------------------------------------
def _checkpoint(section: str, value: object) -> None:
    """Merge one section into the JSON (quality rows by model/ratio/whiten, commands by section);
    every other key on disk is kept."""
    merge_save(NAME, {section: value, "machine": machine()},
               nested={"quality": ("model", "ratio", "whiten"), "commands": None})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="quality,exactness,ablation,memory")
    ap.add_argument("--resume", action="store_true", help="keep quality rows already in the JSON")
    ap.add_argument("--protocol", default="brown-512")
    ap.add_argument("--calib-samples", default="",
                    help="MODEL=N[,MODEL=N]: calibration windows per model (default: the protocol's)")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        model, variant, L = args.memory_child.split(",")
        print(json.dumps(memory_child(model, variant, int(L), BATCH)))
        return
    torch.set_num_threads(1)
    sections = args.sections.split(",")
    path = RESULTS / f"{NAME}.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    commands = {k: v for k, v in old.get("commands", {}).items() if k not in sections}
    commands.update({sec: "python benchmarks/lowrank.py " + " ".join(sys.argv[1:]) for sec in sections})
    _checkpoint("commands", commands)
    if "quality" in sections:
        calib = {k: int(v) for k, v in (kv.split("=") for kv in args.calib_samples.split(",") if kv)}
        rows = run_quality(old.get("quality", []) if args.resume else [], args.protocol, calib)
        _checkpoint("quality", rows)
        rows = json.loads(path.read_text())["quality"]  # merged: this run's rows and earlier ones
        _checkpoint("whitened_better_at_every_ratio", whitened_wins(rows))
    if "exactness" in sections:
        ex = {"per_layer_full_rank": {m: layer_exactness(m) for m in MODELS}, "fused_vs_unfused": fused_exactness()}
        print("exactness", json.dumps(ex), flush=True)
        _checkpoint("exactness", ex)
    if "ablation" in sections:
        _checkpoint("encoder_calibration_ablation", encoder_calibration_ablation())
    if "memory" in sections:
        rows = run_memory()
        _checkpoint("memory", {"rows": rows, "summary": memory_summary(rows),
                               "gpu": "not measured (no GPU in this session)"})


if __name__ == "__main__":
    main()
