"""Helpers shared by the benchmark scripts: measured subprocesses, machine facts, JSON output."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# the converted smollm2-135m asset: fp32 tensors, but every linear was Q4_1 in the GGUF it comes from
SMOLLM2_LABEL = "SmolLM2-135M-Instruct (fp32, dequantized from the Q4_1 GGUF)"


@contextlib.contextmanager
def kernels(mode: str | None) -> Iterator[None]:
    """``COMPRESS_KERNELS`` set to ``mode`` inside (None: the default dispatch, which on CPU takes
    torch's native int4/int8 ops with bf16 activations; ``torch``: the exact fp32 twin)."""
    old = os.environ.pop("COMPRESS_KERNELS", None)
    if mode is not None:
        os.environ["COMPRESS_KERNELS"] = mode
    try:
        yield
    finally:
        os.environ.pop("COMPRESS_KERNELS", None)
        if old is not None:
            os.environ["COMPRESS_KERNELS"] = old


def machine() -> dict:
    """What the figures were measured on."""
    cpu = "unknown"
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": dt.date.today().isoformat()}


def _hwm_bytes(pid: int) -> int:
    """VmHWM (peak resident set) of a live process, 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def measured(cmd: list[str], env: dict | None = None, log: Path | None = None) -> dict:
    """Run ``cmd``; whole-process wall time and peak RSS of the child.

    Peak RSS is the child's own ``VmHWM``, polled every 20 ms while it runs (a high-water mark,
    so polling loses at most the last interval). ``wait4``'s ``ru_maxrss`` is not used: Linux
    carries the *parent's* resident size at fork into the child's maximum, so a benchmark script
    that has loaded models would inflate every figure it measures.
    """
    t0 = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _hwm_bytes(proc.pid))
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    if log:
        out.close()
    rc = proc.returncode
    if rc != 0:
        tail = log.read_text()[-3000:] if log else ""
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed with {rc}\n{tail}")
    return {"wall_s": round(wall, 2), "peak_rss_bytes": peak}


def compress_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "import cli; cli.main()", *args]


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _write(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)  # a crash mid-write never leaves half a JSON behind
    return path


HEADLINE_W4 = ["--bits", "4", "--group-size", "64", "--act-order", "--mse"]
"""``compress gptq`` options of the headline W4 scheme (quant.py's quality row, kernels.py's e2e model)."""


def merge_save(name: str, sections: dict, *, nested: dict[str, tuple[str, ...] | None] | None = None) -> Path:
    """Merge ``sections`` into ``benchmarks/results/<name>.json`` and write it.

    The file is re-read just before writing, every top-level key this run computed replaces the
    one on disk, and every other key is kept: a full run never drops what ``--timing-only``,
    ``--depth-only`` or a separate ``--sections`` run wrote (nor the other way round).
    ``nested`` names sections merged one level deeper: ``None`` for a dict section (its entries
    are merged, e.g. ``quality`` rows by name, ``commands`` by section), a tuple of fields for a
    list of row dicts (rows with the same values of those fields are replaced, others kept).
    """
    nested = nested or {}
    path = RESULTS / f"{name}.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    for key, value in sections.items():
        old = data.get(key)
        if key in nested and isinstance(old, dict) and isinstance(value, dict):
            value = {**old, **value}
        elif key in nested and isinstance(old, list) and isinstance(value, list):
            fields = nested[key] or ()

            def ident(row: object, fields: tuple[str, ...] = fields) -> object:
                return tuple(row.get(f) for f in fields) if isinstance(row, dict) else json.dumps(row)

            rows = {ident(r): r for r in old}
            rows.update({ident(r): r for r in value})
            value = list(rows.values())
        data[key] = value
    return _write(name, data)


def scored(model: object, windows: object, dense: object | None = None) -> dict:
    """PPL (and, against ``dense``, mean per-token KL and top-1 agreement) of ``model`` on the
    evaluation ``windows``, through :func:`compress.eval.score`."""
    import math

    import torch

    from compress.eval import score

    with torch.no_grad():
        s = score(model, windows, dense)
    out = {"ppl": math.exp(s["nll"] / s["tokens"]), "eval_tokens": s["tokens"]}
    if dense is not None:
        out.update({"kl": s["kl"] / s["tokens"], "top1": s["agree"] / s["tokens"]})
    return out


def ensure_dense(res: dict, dense: object, src: object, windows: object, store: object) -> None:
    """``res["dense"]``: PPL of the loaded ``dense`` model on ``windows`` and the bytes of its
    checkpoint ``src``, measured and stored once (a rerun keeps the earlier figure)."""
    import math

    import torch

    from compress.checkpoint import CheckpointReader
    from compress.eval import score

    if "dense" in res:
        return
    with torch.no_grad():
        s = score(dense, windows)
    res["dense"] = {"ppl": math.exp(s["nll"] / s["tokens"]), "bytes_on_disk": CheckpointReader(src).total_bytes()}
    store(res)  # type: ignore[operator]


def rows_to_run(names: list[str], rows: list[dict], only: str | None) -> list[str]:
    """The rows a run measures: every name not yet in ``rows``, or (``--only a,b``) exactly those,
    whose old rows are dropped from ``rows``."""
    if only is None:
        return [n for n in names if not any(r["name"] == n for r in rows)]
    chosen = [n for n in names if n in set(only.split(","))]
    rows[:] = [r for r in rows if r["name"] not in chosen]
    return chosen
