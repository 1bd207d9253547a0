"""Peer baseline: llm-compressor 0.14 GPTQModifier on a local HF checkpoint.

Runs in its own virtual environment (llm-compressor pins transformers<=5.17), so the
benchmark driver launches it as a subprocess and reads one JSON line from stdout.
Calibration windows come from a safetensors file written by our protocol code, so both
tools see exactly the same tokens.
"""
import argparse
import json
import resource
import time

T0 = time.perf_counter()

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--windows", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--actorder", default="static")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = load_file(a.windows)["input_ids"]  # (n, seq) int64
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    strategy = "channel" if a.group_size <= 0 else "group"
    weights = {"num_bits": a.bits, "type": "int", "symmetric": True, "strategy": strategy}
    if strategy == "group":
        weights["group_size"] = a.group_size
    recipe = GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
        ignore=["lm_head"],
        dampening_frac=a.damp,
        block_size=128,
        actorder=None if a.actorder == "none" else a.actorder,
    )
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a.model)
    t1 = time.perf_counter()
    oneshot(
        model=model,
        dataset=ds,
        recipe=recipe,
        max_seq_length=ids.shape[1],
        num_calibration_samples=ids.shape[0],
        pipeline="sequential",
    )
    t2 = time.perf_counter()
    model.save_pretrained(a.out, save_compressed=True)
    tok.save_pretrained(a.out)
    t3 = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"tool": "llm-compressor", "wall_s": t3 - T0, "oneshot_s": t2 - t1,
                      "peak_rss_bytes": rss, "out": a.out}))


if __name__ == "__main__":
    main()
