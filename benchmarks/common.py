"""Helpers shared by the benchmark scripts: measured subprocesses, machine facts, JSON output."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


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


def save(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
