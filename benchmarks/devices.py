"""Device figures (issue 11), every evaluation a fresh process on SmolLM2-135M:

* ``device-map``: GPTQ W4 g64 under ``brown-512-smoke`` (the output is reused from the work
  directory when it is already there with the same recipe), then ``compress eval`` through the
  CLI with ``--device cpu`` and with ``--device-map auto``, and the library with an explicit map
  that sends every other block to disk (``compress.eval.evaluate(OUT, device_map={...})``,
  offloaded through ``accelerate``); the dense origin is placed the same way each time.
  Recorded: the PPLs, whether they are equal, the map ``auto`` chose on this machine, wall and
  peak RSS of each process (both models loaded: not a memory figure of the offload).

    python benchmarks/devices.py --sections device-map      # from the repository root
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the checkout, not benchmarks/ (its kernels.py would shadow the PyPI package transformers imports)
from benchmarks.common import SMOLLM2_LABEL, compress_cmd, machine, measured, merge_save  # noqa: E402
from compress.assets import cache_dir, resolve_model  # noqa: E402

PROTOCOL = "brown-512-smoke"
GPTQ_W4 = ["gptq", "--bits", "4", "--group-size", "64", "--protocol", PROTOCOL]
COMMAND = "python benchmarks/devices.py --sections device-map"

# the library row: evaluate OUT with blocks 0, 2, 4, ... on disk; prints the map and writes the result
_DISK_EVAL = """
import json, sys
import compress
from compress.eval import evaluate
out, dest = sys.argv[1], sys.argv[2]
m = compress.load(out)
a = m.compress_adapter
base, _, leaf = a.layers.rpartition(".")
dmap = {f"{base}.{n}": "cpu" for n, _ in m.get_submodule(base).named_children() if n != leaf}
dmap |= {f"{a.layers}.{i}": "disk" if i % 2 == 0 else "cpu" for i in range(len(m.get_submodule(a.layers)))}
dmap |= {n: "cpu" for n, _ in m.named_children() if n != base}
del m
res = evaluate(out, protocol=sys.argv[3], device_map=dmap)
json.dump({"result": json.loads(res.to_json()), "device_map": dmap}, open(dest, "w"), indent=1)
"""


def _quantized(model: Path, work: Path) -> tuple[Path, dict]:
    """The GPTQ W4 g64 output, made once (a later run reuses it when its recipe is the same)."""
    out = work / "smollm2-gptq-w4g64-smoke"
    manifest = out / "compression.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        stage, protocol = m["recipe"]["stages"][0], (m.get("calibration") or {}).get("protocol")
        if stage["pass"] == "gptq" and (stage["config"]["bits"], stage["config"]["group_size"], protocol) == \
                (4, 64, PROTOCOL):
            return out, {"reused": True}
    run = measured(compress_cmd(GPTQ_W4[0], str(model), *GPTQ_W4[1:], "--overwrite", "-o", str(out)),
                   log=work / "gptq.log")
    return out, {"reused": False, **run}


def _eval_row(case: str, command: str, cmd: list[str], result: Path, log: Path) -> dict:
    run = measured(cmd, log=log)
    data = json.loads(result.read_text())
    res = data.get("result", data)
    row = {"case": case, "command": command, "ppl": res["ppl"], "dense_ppl": res["dense_ppl"],
           "eval_tokens": res["eval_tokens"], "eval_windows": res["eval_windows"], **run}
    if "device_map" in data:
        row["device_map"] = data["device_map"]
    return row


def device_map_section(model: Path, work: Path) -> dict:
    out, quant = _quantized(model, work)
    base = ["eval", str(out), "--protocol", PROTOCOL]
    rows = [
        _eval_row("--device cpu", f"compress eval OUT --protocol {PROTOCOL} --device cpu",
                  compress_cmd(*base, "--device", "cpu", "--json", str(work / "eval-cpu.json")),
                  work / "eval-cpu.json", work / "eval-cpu.log"),
        _eval_row("--device-map auto", f"compress eval OUT --protocol {PROTOCOL} --device-map auto",
                  compress_cmd(*base, "--device-map", "auto", "--json", str(work / "eval-auto.json")),
                  work / "eval-auto.json", work / "eval-auto.log"),
        _eval_row("even blocks on disk", "evaluate(OUT, device_map={..., 'model.layers.<even>': 'disk'})",
                  [sys.executable, "-c", _DISK_EVAL, str(out), str(work / "eval-disk.json"), PROTOCOL],
                  work / "eval-disk.json", work / "eval-disk.log"),
    ]
    import compress  # the map `auto` picks here (the CLI does not print it)

    auto_map = {k: str(v) for k, v in compress.load(out, device_map="auto").hf_device_map.items()}
    cpu, auto, disk = (r["ppl"] for r in rows)
    return {"model": SMOLLM2_LABEL, "protocol": PROTOCOL, "scheme": "GPTQ W4 g64",
            "quantize_command": f"compress {' '.join(GPTQ_W4[:1])} smollm2-135m {' '.join(GPTQ_W4[1:])} -o OUT",
            "quantize": quant, "rows": rows, "auto_map": auto_map, "ppl_equal_auto": auto == cpu,
            "ppl_equal_disk": disk == cpu, "max_rel_diff": max(abs(p - cpu) / cpu for p in (auto, disk))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", nargs="+", default=["device-map"], choices=["device-map"])
    ap.add_argument("--work", type=Path, default=None,
                    help="scratch directory, kept so the quantised output is reused [default: CACHE/bench-devices]")
    args = ap.parse_args()
    work = args.work or cache_dir() / "bench-devices"
    work.mkdir(parents=True, exist_ok=True)
    model = resolve_model("smollm2-135m")
    for section in args.sections:
        t0 = time.perf_counter()
        key = section.replace("-", "_")
        data = device_map_section(model, work)
        data["machine"] = machine()
        data["section_wall_s"] = round(time.perf_counter() - t0, 1)
        data["command"] = f"python benchmarks/devices.py --sections {section}"
        print(json.dumps(data, indent=1), flush=True)
        merge_save("devices", {key: data, "commands": {key: data["command"]}}, nested={"commands": None})


if __name__ == "__main__":
    main()
