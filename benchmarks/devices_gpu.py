"""The GPU figures of issue 11, in one script for a lent GPU (about 10 minutes of device time).

* **agreement**: a tiny random LLaMA quantised GPTQ W4 g32 (act-order) with ``--device cuda`` and
  ``--device cpu`` on the same machine: the block-0/1 input Hessians (relative Frobenius
  difference), and the codes (share identical; share more than one step apart must be 0 and
  the share off by one ≤ 0.1 %);
* **timing**: GPTQ W4 g64 on a model built from SmolLM2-135M's real config with random weights
  (the asset is over the 64 MiB transfer limit), ``--device cuda`` vs ``--device cpu`` on that
  machine: wall time, peak GPU memory (``torch.cuda.max_memory_allocated``), ratio; and the same
  run with the activations kept on the host (``--activations host``) for the cost of moving them
  per batch;
* **llm-compressor** on the same GPU and model when ``llmcompressor`` imports there (its wheels
  must be carried), ratio reported; else the row says why not.

The device machine has torch, triton, transformers and accelerate but not pydantic (nor the
peer): carry their wheels (``pip download pydantic llmcompressor --no-deps -d wheels/`` plus
pydantic-core, annotated-types, typing-inspection) and ``pip install --no-index wheels/*``
first, in the same call.

Usage (on the device machine, from the repository root):
``python benchmarks/devices_gpu.py --out $OUT`` writes ``$OUT/devices_gpu.json`` and prints a
table; copy the JSON's sections into ``benchmarks/results/devices.json`` under ``gpu``.
``--dry-run`` runs every step on the CPU at toy sizes (to check the script, not to measure).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not benchmarks/: its kernels.py would shadow the PyPI package transformers imports

# SmolLM2-135M's config.json (the fields that fix the shapes and the block)
SMOLLM2 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
           "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
           "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True,
           "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 0}
CAL = {"protocol": "brown-512", "n_samples": 128}


def _random_model(path: Path, config: dict, seed: int = 0) -> Path:
    """A random-init model of ``config`` with a tiny trained tokenizer (ids stay below its vocab)."""
    import transformers

    from tests.conftest import train_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    train_tokenizer(path)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    model.save_pretrained(path)
    return path


def _gptq(src: Path, out: Path, device: str, calibration: dict, group: int, **kw: object) -> tuple[float, int]:
    """(wall seconds, peak device bytes) of one GPTQ W4 run through ``compress.run``."""
    import compress
    from compress.device import resolve_device, synchronize

    dev = resolve_device(device)
    recipe = {"calibration": calibration,
              "stages": [{"pass": "gptq", "config": {"bits": 4, "group_size": group, "act_order": True}}]}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    compress.run(recipe, src, out, overwrite=True, cache=False, device=device, **kw)
    synchronize(dev)
    wall = time.perf_counter() - t0
    return wall, int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else 0


def _codes(out: Path) -> dict[str, torch.Tensor]:
    import compress

    model = compress.load(out)
    return {n: m.weight_codes() if hasattr(m, "weight_codes") else _unpack(m)
            for n, m in model.named_modules() if hasattr(m, "weight_packed")}


def _unpack(m: torch.nn.Module) -> torch.Tensor:
    from compress.kernels.packing import unpack_int32

    return unpack_int32(m.weight_packed, m.bits, m.in_features, dim=1)


def _hessians(src: Path, device: str, n: int) -> list[torch.Tensor]:
    """Mean input Gram of q_proj in blocks 0 and 1 (dense propagation), on ``device``."""
    from compress.api import load
    from compress.calib.pipeline import LayerContext, capture_block_inputs
    from compress.recipe import CalibrationConfig
    from compress.runner import load_calibration

    model = load(src, device=device)
    cal = load_calibration(src, CalibrationConfig(protocol="brown-128-smoke", n_samples=n), model.config.to_dict())
    adapter = model.compress_adapter
    state = capture_block_inputs(model, adapter, cal.windows, 4, torch.device(device))
    out = []
    for i, layer in enumerate(model.model.layers[:2]):
        ctx = LayerContext(i, f"model.layers.{i}.", layer, adapter, state)
        out.append(ctx.collect(["self_attn.q_proj"], propagate=True)["self_attn.q_proj"].cpu())
    return out


def agreement(work: Path, cuda: str) -> dict:
    from tests.conftest import make_llama

    src = make_llama(work / "tiny", layers=2, seed=7)
    cal = {"protocol": "brown-128-smoke", "n_samples": 16}
    _gptq(src, work / "tiny-cpu", "cpu", cal, 32)
    _gptq(src, work / "tiny-cuda", cuda, cal, 32)
    a, b = _codes(work / "tiny-cpu"), _codes(work / "tiny-cuda")
    total = sum(t.numel() for t in a.values())
    diff = {k: (a[k].long() - b[k].long()).abs() for k in a}
    one = sum(int((d == 1).sum()) for d in diff.values())
    more = sum(int((d > 1).sum()) for d in diff.values())
    h_cpu, h_dev = _hessians(src, "cpu", 16), _hessians(src, cuda, 16)
    rel = [float((x - y).norm() / x.norm()) for x, y in zip(h_cpu, h_dev, strict=True)]
    return {"codes": total, "identical_share": 1 - (one + more) / total, "one_step_share": one / total,
            "more_than_one_step": more, "hessian_rel_diff": rel}


def timing(work: Path, cuda: str, config: dict, calibration: dict) -> dict:
    src = _random_model(work / "smollm2-random", config)
    res = {}
    for label, device, kw in (("cuda", cuda, {}), ("cuda_host_activations", cuda, {"activations": "host"}),
                              ("cpu", "cpu", {})):
        wall, peak = _gptq(src, work / f"o-{label}", device, calibration, 64, **kw)
        res[label] = {"wall_s": wall, "peak_gpu_bytes": peak}
    res["cpu_over_cuda"] = res["cpu"]["wall_s"] / res["cuda"]["wall_s"]
    res["host_activations_cost"] = res["cuda_host_activations"]["wall_s"] / res["cuda"]["wall_s"]
    return res


def llm_compressor(work: Path) -> dict:
    try:
        import llmcompressor  # noqa: F401
    except ImportError as e:
        return {"measured": False, "why": f"llmcompressor does not import on this machine ({e})"}
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = work / "smollm2-random"
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).cuda()
    tok = AutoTokenizer.from_pretrained(src)
    text = (ROOT.parent / "shared" / "data" / "corpus" / "brown.txt").read_text().splitlines()[:4000]
    from datasets import Dataset

    ds = Dataset.from_dict({"text": [" ".join(text[i:i + 40]) for i in range(0, 4000, 40)][:128]})
    ds = ds.map(lambda r: tok(r["text"], truncation=True, max_length=512), remove_columns=["text"])
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]),
            max_seq_length=512, num_calibration_samples=128)
    torch.cuda.synchronize()
    return {"measured": True, "wall_s": time.perf_counter() - t0, "peak_gpu_bytes": torch.cuda.max_memory_allocated()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true", help="CPU only, toy sizes: checks the script runs")
    args = ap.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on the lent GPU, or pass --dry-run")
    cuda = "cpu" if args.dry_run else "cuda"
    config = dict(SMOLLM2, num_hidden_layers=2, vocab_size=512) if args.dry_run else SMOLLM2
    calibration = {"protocol": "brown-128-smoke", "n_samples": 8} if args.dry_run else CAL
    work = Path(tempfile.mkdtemp(prefix="devices-gpu-"))
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    try:
        res = {"gpu": gpu, "date": time.strftime("%Y-%m-%d"), "dry_run": args.dry_run,
               "command": "python benchmarks/devices_gpu.py --out $OUT",
               "agreement": agreement(work, cuda), "timing": timing(work, cuda, config, calibration),
               "llm_compressor": {"measured": False, "why": "dry run"} if args.dry_run else llm_compressor(work)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "devices_gpu.json").write_text(json.dumps(res, indent=2))
    t, a = res["timing"], res["agreement"]
    print(f"GPU {gpu}: GPTQ W4 g64 cuda {t['cuda']['wall_s']:.1f} s (peak {t['cuda']['peak_gpu_bytes'] / 2**30:.2f} "
          f"GiB), host activations {t['cuda_host_activations']['wall_s']:.1f} s, cpu {t['cpu']['wall_s']:.1f} s "
          f"(cpu/cuda {t['cpu_over_cuda']:.2f}x)")
    print(f"agreement: identical codes {a['identical_share']:.4%}, one step {a['one_step_share']:.4%}, "
          f"> one step {a['more_than_one_step']}; Hessian rel diff {a['hessian_rel_diff']}")
    print(f"llm-compressor: {res['llm_compressor']}")


if __name__ == "__main__":
    main()
