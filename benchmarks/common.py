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


def measured(cmd: list[str], env: dict | None = None, log: Path | None = None) -> dict:
    """Run ``cmd``; whole-process wall time and peak RSS of the child (``wait4`` rusage)."""
    t0 = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if log:
        out.close()
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        tail = log.read_text()[-3000:] if log else ""
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed with {rc}\n{tail}")
    return {"wall_s": round(wall, 2), "peak_rss_bytes": usage.ru_maxrss * 1024}


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
