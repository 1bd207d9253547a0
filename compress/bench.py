"""``compress bench``: latency and peak memory of a compressed model against its dense source.

Phases (every one measured for the compressed model and, when known, its dense source, one after
the other so that both see the same machine load; the figure that matters is their ratio):

* ``prefill`` — one forward over ``seq`` random token ids (``use_cache=False``; for causal LMs
  only the last position's logits are computed, as a server does before decoding);
* ``decode`` — a ``prompt`` of random ids fills the KV cache, then ``tokens`` greedy steps of
  one token each (M = 1 through every linear); latency is the median time of one step.

Latency is the median over ``repeats`` runs after one warm-up run (decode: over all measured
steps). Per-layer latency is the median time of each block (forward pre-/post-hooks). On CPU
the clock is ``time.perf_counter``; on CUDA the device is synchronised at every reading, and
per-block times come from separate hooked runs so the end-to-end figure has no extra syncs.

Memory (:data:`MEMORY_METHOD`): every (model, phase) runs in a fresh Python process
(``python -m compress.bench``), so no allocator state leaks between measurements.
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.device import device_name
from compress.errors import CompressError

MEMORY_METHOD = (
    "CPU: fresh process per (model, phase); after compress.load the resident set (VmRSS) is read "
    "and the kernel's peak-RSS mark is reset (5 > /proc/self/clear_refs); peak = VmHWM after the "
    "phase (warm-up included), transient = peak - loaded. CUDA: memory_allocated after load, "
    "max_memory_allocated after reset_peak_memory_stats.")


@dataclass
class PhaseResult:
    """One (model, phase) measured in its own process."""

    phase: str
    tokens: int
    latency_s: float
    tokens_per_s: float
    latencies_s: list[float]
    loaded_bytes: int
    peak_bytes: int
    transient_bytes: int
    weight_bytes: int
    blocks_s: dict[str, float]
    block_weight_bytes: dict[str, int]
    threads: int
    peak_reset_after_load: bool
    #: the kernel path of every compressed linear at this phase's rows, counted (``compress inspect``'s labels)
    paths: dict[str, int] = field(default_factory=dict)
    #: bytes of weights one step reads (decode: every tensor but the embedding table, which only a
    #: tied head reads whole; prefill: the same), for the roofline
    bytes_per_step: int = 0


@dataclass
class BenchReport:
    """Compressed vs dense, per phase and per block."""

    model: str
    against: str | None
    device: str
    memory_method: str
    repeats: int
    machine: dict[str, Any]
    phases: list[dict[str, Any]] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    #: the ``--device-map`` both models were placed with (None: all on ``device``)
    device_map: Any = None
    #: a STREAM-like copy on the measured device in the same run: bytes read + written per second
    copy_bandwidth_Bps: float | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


# -- the child process ---------------------------------------------------------------------
def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak(device: torch.device) -> bool:
    """Restart the peak-memory mark; False where the OS cannot (the peak then includes loading)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
    except OSError:
        return False
    return True


def _memory(device: torch.device) -> tuple[int, int]:
    """(currently held, peak since the last reset) in bytes."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    if Path("/proc/self/status").is_file():
        return _status_bytes("VmRSS"), _status_bytes("VmHWM")
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return 0, peak  # no current-RSS reading: loaded = 0, peak over the whole process


class _Clock:
    """Wall clock that waits for the device first."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


class BlockTimer:
    """Per-block wall times via forward pre-/post-hooks (recording only while ``on``)."""

    def __init__(self, blocks: nn.ModuleList, prefix: str, clock: _Clock) -> None:
        self.on, self.armed, self.clock = False, False, clock
        self.times: dict[str, list[float]] = {f"{prefix}.{i}": [] for i in range(len(blocks))}
        self._start: dict[str, float] = {}
        self.handles = []
        for name, block in zip(self.times, blocks):
            self.handles.append(block.register_forward_pre_hook(self._pre(name)))
            self.handles.append(block.register_forward_hook(self._post(name)))

    def _pre(self, name: str):  # noqa: ANN202
        def hook(*_: Any) -> None:
            if self.on:
                self._start[name] = self.clock()
        return hook

    def _post(self, name: str):  # noqa: ANN202
        def hook(*_: Any) -> None:
            if self.on:
                self.times[name].append(self.clock() - self._start[name])
        return hook

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.times.items() if v}


def _nbytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each shared tensor (tied head) counted once."""
    unique = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return sum(t.numel() * t.element_size() for t in unique.values())


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    """``logits_to_keep=1`` where the model accepts it (a server needs the last logits only)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _prefill_runner(model: nn.Module, timer: BlockTimer, clock: _Clock, ids: torch.Tensor,
                    causal: bool) -> Callable[[], list[float]]:
    """One forward over ``ids [1, seq]``; returns its wall time."""
    kw = _forward_kwargs(model) | ({"use_cache": False} if causal else {})

    def run() -> list[float]:
        timer.on = timer.armed
        t0 = clock()
        model(input_ids=ids, **kw)
        t = clock() - t0
        timer.on = False
        return [t]
    return run


def _cache_kwargs(model: nn.Module, out: object) -> dict:
    """The previous step's KV cache, under the name this ``transformers`` uses (``cache`` from
    5.2x, ``past_key_values`` before)."""
    import inspect

    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def _decode_runner(model: nn.Module, timer: BlockTimer, clock: _Clock, prompt_ids: torch.Tensor,
                   steps: int) -> Callable[[], list[float]]:
    """Fill the KV cache with ``prompt_ids``, then ``steps`` greedy one-token steps; their wall times."""
    def run() -> list[float]:
        from compress.modules.flat_attention import code_cache

        cache = code_cache(model)  # a FlatQuant model decodes from a code cache
        first = {} if cache is None else _cache_kwargs(model, type("Out", (), {"cache": cache})())
        out = model(input_ids=prompt_ids, use_cache=True, **_forward_kwargs(model), **first)
        times = []
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)  # [1, 1]
            timer.on = timer.armed
            t0 = clock()
            out = model(input_ids=nxt, use_cache=True, **_cache_kwargs(model, out))
            times.append(clock() - t0)
            timer.on = False
        return times
    return run


@torch.inference_mode()
def measure(model_dir: str, phase: str, tokens: int, *, repeats: int = 3, prompt: int = 32,
            device: str = "cpu", seed: int = 0, device_map: Any = None) -> PhaseResult:
    """Load ``model_dir`` and time one phase in this process (what the child process runs);
    with ``device_map`` the model is placed by ``accelerate`` and timed on the map's main device."""
    from compress.api import load
    from compress.model import get_module
    from compress.placement import input_device, main_device

    dev = torch.device(device)
    model = load(model_dir, device=dev) if device_map is None else load(model_dir, device_map=device_map)
    dev = dev if device_map is None else main_device(model)
    adapter = model.compress_adapter
    blocks = get_module(model, adapter.layers)
    clock = _Clock(dev)
    timer = BlockTimer(blocks, adapter.layers, clock)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(int(model.config.vocab_size), (1, tokens if phase == "prefill" else prompt),
                        generator=gen).to(input_device(model))  # random ids: the cost does not depend on the text
    run = (_prefill_runner(model, timer, clock, ids, adapter.causal) if phase == "prefill"
           else _decode_runner(model, timer, clock, ids, tokens))
    loaded, _ = _memory(dev)
    reset = _reset_peak(dev)
    run()  # warm-up
    timer.armed = not clock.cuda  # CPU: a hook costs ~1 us per block, record during the timed runs
    lat = [t for _ in range(repeats) for t in run()]
    if clock.cuda:  # per-block times from separate hooked runs: no syncs inside the timed ones
        timer.armed = True
        for _ in range(repeats):
            run()
    _, peak = _memory(dev)
    med = statistics.median(lat)
    rows = 1 if phase == "decode" else tokens
    return PhaseResult(phase=phase, tokens=tokens, latency_s=med,
                       tokens_per_s=(tokens if phase == "prefill" else 1) / med, latencies_s=lat,
                       loaded_bytes=loaded, peak_bytes=peak, transient_bytes=max(peak - loaded, 0),
                       weight_bytes=_nbytes(model), blocks_s=timer.medians(),
                       block_weight_bytes={f"{adapter.layers}.{i}": _nbytes(b) for i, b in enumerate(blocks)},
                       threads=torch.get_num_threads(), peak_reset_after_load=reset,
                       paths=_paths(model, rows, dev), bytes_per_step=_step_bytes(model, adapter))


def _paths(model: nn.Module, rows: int, dev: torch.device) -> dict[str, int]:
    """How many compressed linears take each kernel path for ``rows`` rows (``kernel_path``)."""
    from collections import Counter

    from compress.modules.protocol import validatable_modules

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    out: Counter[str] = Counter()
    for _, mod in validatable_modules(model):
        x = torch.zeros(rows, int(mod.in_features), dtype=dtype, device=dev)
        out[mod.kernel_path(x)] += 1
    return dict(out)


def _step_bytes(model: nn.Module, adapter: Any) -> int:
    """Weight bytes one forward step streams: everything but the token table's unread rows (a tied
    head reads the whole table; otherwise one row per token is negligible)."""
    from compress.model import get_module

    total = _nbytes(model)
    emb = get_module(model, adapter.token_embedding)
    head = get_module(model, adapter.head) if adapter.head else None
    tied = head is not None and getattr(head, "weight", None) is getattr(emb, "weight", None)
    return total if tied else total - _nbytes(emb)


def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes per second (read + write) of the best of ``repeats`` copies of an ``nbytes`` buffer."""
    a = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        b.copy_(a)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * a.element_size() / best


def _child_main(argv: list[str]) -> None:
    args = json.loads(argv[0])
    res = measure(args.pop("model_dir"), args.pop("phase"), args.pop("tokens"), **args)
    print(json.dumps(asdict(res)))


# -- the parent ----------------------------------------------------------------------------
def run_child(model_dir: Path, phase: str, tokens: int, *, repeats: int, prompt: int, device: str,
              seed: int, device_map: Any = None) -> PhaseResult:
    """Measure one (model, phase) in a fresh ``python -m compress.bench`` process (the device
    map, a strategy or a JSON-able dict, is passed through)."""
    args = {"model_dir": str(model_dir), "phase": phase, "tokens": tokens, "repeats": repeats,
            "prompt": prompt, "device": device, "seed": seed, "device_map": device_map}
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "compress.bench", json.dumps(args)], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench child for {model_dir} ({phase} {tokens}) failed with {proc.returncode}:\n"
                           f"{proc.stderr[-3000:]}")
    return PhaseResult(**json.loads(proc.stdout.strip().splitlines()[-1]))


def machine_facts() -> dict[str, Any]:
    """CPU model, cores, threads, versions and the GPU name (if any) the figures were taken on."""
    import platform

    cpu = "unknown"
    info = Path("/proc/cpuinfo")
    if info.exists():
        cpu = next((ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines()
                    if ln.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _in_process(model_dir: Path, phase: str, tokens: int, **kw: Any) -> PhaseResult:
    return measure(str(model_dir), phase, tokens, **kw)


def device_label(device: str) -> str:
    """What serves the linears on ``device``: ``"CPU, torch twins"``, ``"<GPU name>, Triton"``, ..."""
    from compress.kernels._triton import use_triton

    dev = torch.device(device)
    triton = use_triton(torch.empty(0, device=dev))
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)}, {'Triton' if triton else 'torch twins'}"
    return "CPU, Triton interpreter" if triton else "CPU, torch twins"


def _check_sizes(reader, seqs: list[int], decode_tokens: int, prompt: int, repeats: int) -> None:  # noqa: ANN001
    if not seqs or min(seqs) < 1 or decode_tokens < 0 or prompt < 1 or repeats < 1:
        raise CompressError("--seq, --prompt and --repeats must be positive and --decode-tokens >= 0",
                            "e.g. --seq 512 --seq 2048 --decode-tokens 32 --repeats 3")
    ctx = reader.config.get("max_position_embeddings")
    longest = max(max(seqs), prompt + decode_tokens)
    if ctx and longest > int(ctx):
        raise CompressError(f"{longest} tokens exceed the model's context of {ctx} tokens",
                            f"pass --seq / --prompt + --decode-tokens of at most {ctx}")


def _default_against(reader) -> Path | None:  # noqa: ANN001
    origin = (reader.manifest() or {}).get("origin")
    return Path(origin) if origin and Path(origin).is_dir() and (Path(origin) / "config.json").is_file() else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def run_bench(model: str | Path, against: str | Path | None = None, *, seqs: list[int] | None = None,
              decode_tokens: int = 32, prompt: int = 32, repeats: int = 3, device: str = "auto",
              seed: int = 0, isolate: bool = True, progress=None,  # noqa: ANN001
              device_map: Any = None) -> BenchReport:
    """Benchmark ``model`` (and its dense source ``against``, default: the manifest's origin).

    ``isolate=False`` measures in this process (faster; the memory figures then include what
    earlier phases left in the allocator, so they are upper bounds). ``device_map`` (instead of
    ``device``, which must then stay ``auto``) places both models with ``accelerate``.
    """
    from compress.arch import get_adapter
    from compress.assets import resolve_model
    from compress.checkpoint import CheckpointReader

    seqs = list(seqs or [512, 2048])
    if device_map is not None and device not in ("auto", None):
        raise CompressError(f"both --device {device} and --device-map {device_map} were given", "pass one of them")
    device = device_name(device or "auto")
    model_dir = resolve_model(str(model))
    reader = CheckpointReader(model_dir)
    adapter = get_adapter(reader.config)
    _check_sizes(reader, seqs, decode_tokens, prompt, repeats)
    dense_dir = resolve_model(str(against)) if against is not None else _default_against(reader)
    if dense_dir is not None:
        CheckpointReader(dense_dir)  # fail early and cleanly on a bad --against
    phases = [("prefill", s) for s in seqs] + ([("decode", decode_tokens)] if adapter.causal and decode_tokens else [])
    targets = [("compressed", model_dir)] + ([("dense", dense_dir)] if dense_dir is not None else [])
    method = MEMORY_METHOD if isolate else MEMORY_METHOD.replace("fresh process per (model, phase)",
                                                                "in-process (--in-process)")
    report = BenchReport(str(model_dir), str(dense_dir) if dense_dir else None, device_label(device),
                         method, repeats, machine_facts(), device_map=device_map)
    done, total = 0, len(phases) * len(targets)
    for phase, tokens in phases:
        res: dict[str, PhaseResult] = {}
        for label, path in targets:
            if progress:
                progress(done, total, f"{label}: {phase} {tokens}")
            run = run_child if isolate else _in_process
            res[label] = run(path, phase, tokens, repeats=repeats, prompt=prompt, device=device, seed=seed,
                             device_map=device_map)
            done += 1
        report.phases.append(_phase_row(phase, tokens, res))
        report.layers += _layer_rows(phase, tokens, res)
    if device_map is None:
        report.copy_bandwidth_Bps = copy_bandwidth(torch.device(device))
    if progress:
        progress(total, total, "done")
    return report


def _phase_row(phase: str, tokens: int, res: dict[str, PhaseResult]) -> dict[str, Any]:
    c, d = res["compressed"], res.get("dense")
    row: dict[str, Any] = {"phase": phase, "tokens": tokens, "compressed": asdict(c) | {"blocks_s": None},
                           "dense": None if d is None else asdict(d) | {"blocks_s": None}}
    row["latency_ratio"] = _ratio(c.latency_s, d.latency_s if d else None)
    row["peak_ratio"] = _ratio(c.peak_bytes, d.peak_bytes if d else None)
    row["transient_ratio"] = _ratio(c.transient_bytes, d.transient_bytes if d else None)
    return row


def _layer_rows(phase: str, tokens: int, res: dict[str, PhaseResult]) -> list[dict[str, Any]]:
    c, d = res["compressed"], res.get("dense")
    rows = []
    for name, t in c.blocks_s.items():
        dt = d.blocks_s.get(name) if d else None
        rows.append({"layer": name, "phase": phase, "tokens": tokens, "compressed_s": t, "dense_s": dt,
                     "latency_ratio": _ratio(t, dt), "compressed_weight_bytes": c.block_weight_bytes.get(name),
                     "dense_weight_bytes": d.block_weight_bytes.get(name) if d else None})
    return rows


if __name__ == "__main__":
    _child_main(sys.argv[1:])
