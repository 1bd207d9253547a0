"""``compress validate``: every compressed module's kernel path against its plain-torch reference.

For each module that implements :class:`compress.modules.protocol.Validatable`, random inputs
``x [M, in_features]`` (several M, so every dispatcher path is taken; several activation dtypes)
go through the served ``forward`` (the shared kernels: Triton on CUDA, the torch twin on CPU)
and through ``reference_forward`` (float64 math from the stored tensors). The errors are

* ``rel = ‖y − y_ref‖_F / ‖y_ref‖_F`` in float64 — the pass/fail criterion;
* ``max abs = max |y − y_ref|`` — in the JSON report (``--json``), so an isolated wrong element
  is visible too; the tables show the relative error only, to fit 80 columns.

Default tolerances (:data:`DEFAULT_TOLERANCE`), per activation dtype:

* fp32 ``1e-5``: the kernels decode in fp32 and accumulate in fp32; the error of an fp32 dot
  product of length K is about ``sqrt(K) · 6e-8`` relative (≈ 2e-6 at K = 1536), so 1e-5 passes
  every correct kernel and fails any wrong scale, zero point or index (those give ≥ 1e-3);
* bf16 ``1e-2``: the output is rounded to bf16 (unit roundoff 2^-9 ≈ 2e-3, i.e. ≈ 1e-3 relative
  in the Frobenius norm), so 1e-2 leaves headroom for bf16 operands on tensor cores;
* fp16 ``1e-3``: fp16 rounding (2^-11 ≈ 5e-4) with the same reasoning.

A module whose path computes in bf16 whatever the input dtype (``compute_dtype(x)``: torch's
native CPU int4/int8 ops, :mod:`compress.kernels.native_cpu`) is held to the bf16 tolerance.
A NaN or Inf in either output always fails. A compressed module that does not implement the
protocol cannot be vouched for and also makes the run fail.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.table import Table
from rich.text import Text
from torch import Tensor, nn

from compress.errors import CompressError
from compress.modules.protocol import validatable_modules
from compress.report import compact_table, short_name

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_TOLERANCE: dict[str, float] = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 1e-3}
DEFAULT_MS: tuple[int, ...] = (1, 3, 17, 300)
"""Rows per check: decode (1), odd small batches (3, 17: fused path / twin planes) and a large
odd batch (300: dequant path on Triton, dense dequant + matmul in the twin)."""
DEFAULT_DTYPES: tuple[str, ...] = ("fp32", "bf16")


@dataclass
class Check:
    """One module × dtype × M comparison."""

    module: str
    kind: str
    dtype: str
    m: int
    path: str
    rel_err: float
    max_abs_err: float
    tolerance: float
    ok: bool


@dataclass
class ValidationReport:
    """Every check of one checkpoint, plus compressed modules that could not be checked."""

    model: str
    ms: list[int]
    dtypes: list[str]
    tolerance: dict[str, float]
    seed: int
    checks: list[Check] = field(default_factory=list)
    unvalidated: dict[str, str] = field(default_factory=dict)  # module name -> kind

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    @property
    def ok(self) -> bool:
        return not self.failures and not self.unvalidated and bool(self.checks)

    def to_json(self) -> str:
        d = asdict(self)
        d["ok"] = self.ok
        return json.dumps(d, indent=2, allow_nan=True)


def parse_tolerance(specs: list[str] | None) -> dict[str, float]:
    """``["1e-4"]`` (every dtype) or ``["bf16=2e-2", ...]`` on top of :data:`DEFAULT_TOLERANCE`."""
    tol = dict(DEFAULT_TOLERANCE)
    for spec in specs or []:
        name, _, value = spec.rpartition("=")
        try:
            v = float(value)
        except ValueError:
            v = float("nan")
        if not (v > 0 and math.isfinite(v)) or (name and name not in DTYPES):
            raise CompressError(f"bad --tolerance {spec!r}",
                                f"give a positive number, optionally as DTYPE=VALUE with DTYPE in {list(DTYPES)}")
        for key in ([name] if name else list(tol)):
            tol[key] = v
    return tol


def check_options(ms: list[int], dtypes: list[str]) -> None:
    """Raise :class:`CompressError` for row counts or dtype names that cannot be used."""
    if not ms or any(m < 1 for m in ms):
        raise CompressError(f"bad --m {ms}", "give positive row counts, e.g. --m 1 --m 17")
    unknown = [d for d in dtypes if d not in DTYPES]
    if not dtypes or unknown:
        raise CompressError(f"unknown --dtype {unknown or dtypes}", f"pick from {list(DTYPES)}")


def errors(y: Tensor, ref: Tensor) -> tuple[float, float]:
    """(relative Frobenius error, max abs error) of ``y`` against float64 ``ref``; NaN if non-finite."""
    if not bool(torch.isfinite(y).all()) or not bool(torch.isfinite(ref).all()):
        return float("nan"), float("nan")
    diff = y.to(torch.float64) - ref
    denom = float(ref.norm())
    num = float(diff.norm())
    rel = num / denom if denom > 0 else (0.0 if num == 0 else float("inf"))
    return rel, float(diff.abs().max()) if diff.numel() else 0.0


@torch.no_grad()
def check_module(name: str, kind: str, module: nn.Module, *, ms: list[int], dtypes: list[str],
                 tolerance: dict[str, float], generator: torch.Generator) -> list[Check]:
    """Compare ``module(x)`` with ``module.reference_forward(x)`` for every M and dtype."""
    device = next((t.device for t in module.buffers()), torch.device("cpu"))
    checks = []
    for dt in dtypes:
        for m in ms:
            x = torch.randn(m, module.in_features, generator=generator).to(device=device, dtype=DTYPES[dt])
            y = module(x)
            ref = module.reference_forward(x)
            rel, mx = errors(y, ref)
            tol = tolerance[dt]
            compute = getattr(module, "compute_dtype", None)  # a path computing in bf16 is held to bf16's
            if callable(compute) and compute(x) == torch.bfloat16:
                tol = max(tol, tolerance.get("bf16", DEFAULT_TOLERANCE["bf16"]))
            checks.append(Check(name, kind, dt, m, module.kernel_path(x), rel, mx, tol,
                                bool(rel <= tol)))  # NaN compares False
    return checks


def _kind(name: str, module: nn.Module, manifest: dict) -> str:
    entry = manifest.get("modules", {}).get(name)
    if entry is None and hasattr(module, "manifest_entry"):
        entry = module.manifest_entry()
    return (entry or {}).get("kind", type(module).__name__)


def _unvalidated(model: nn.Module, manifest: dict, checked: list[str]) -> dict[str, str]:
    """Compressed modules (manifest entries, or modules with ``manifest_entry``) not covered."""
    named = dict(model.named_modules())
    claimed = dict((manifest.get("modules") or {}).items())
    for name, mod in named.items():
        if hasattr(mod, "manifest_entry") and name not in claimed:
            claimed[name] = mod.manifest_entry()
    out = {}
    for name, entry in claimed.items():
        covered = any(name == c or name.startswith(c + ".") or c.startswith(name + ".") for c in checked)
        if not covered:
            out[name] = (entry or {}).get("kind", "?")
    return out


def validate(path: str | Path, *, ms: list[int] | None = None, dtypes: list[str] | None = None,
             tolerance: dict[str, float] | None = None, seed: int = 0,
             device: str = "cpu") -> ValidationReport:
    """Load ``path`` with :func:`compress.load` onto ``device`` and check every compressed module
    (on CUDA the served path is the Triton kernels; on CPU torch's native int4/int8 ops where they
    apply, held to bf16's tolerance, else the torch twins) and every embedding that decodes codes."""
    from compress.api import load
    from compress.assets import resolve_model

    ms = list(ms or DEFAULT_MS)
    dtypes = list(dtypes or DEFAULT_DTYPES)
    tolerance = tolerance or dict(DEFAULT_TOLERANCE)
    check_options(ms, dtypes)
    model_dir = resolve_model(str(path))
    model = load(model_dir, device=device)
    manifest = getattr(model, "compress_manifest", {}) or {}
    mods = validatable_modules(model)
    lookups = [(n, m) for n, m in model.named_modules() if callable(getattr(m, "reference_lookup", None))]
    report = ValidationReport(str(model_dir), ms, dtypes, {d: tolerance[d] for d in dtypes}, seed)
    report.unvalidated = _unvalidated(model, manifest, [n for n, _ in mods + lookups])
    if not mods and not report.unvalidated:
        raise CompressError(f"{model_dir} has no compressed modules to validate",
                            "pass a compress output or a compressed-tensors checkpoint")
    gen = torch.Generator().manual_seed(seed)
    for name, mod in mods:
        report.checks += check_module(name, _kind(name, mod, manifest), mod, ms=ms, dtypes=dtypes,
                                      tolerance=tolerance, generator=gen)
    for name, mod in lookups:
        report.checks += check_lookup(name, _kind(name, mod, manifest), mod, ms=ms, tolerance=tolerance,
                                      generator=gen)
    return report


@torch.no_grad()
def check_lookup(name: str, kind: str, module: nn.Module, *, ms: list[int], tolerance: dict[str, float],
                 generator: torch.Generator) -> list[Check]:
    """An embedding that decodes codes (``reference_lookup``): ``module(ids)`` against the float64
    rows for ``m`` random token ids, in the model's dtype."""
    checks = []
    dt = next((k for k, v in DTYPES.items() if v == module.dtype), "fp32")
    for m in ms:
        ids = torch.randint(0, module.num_embeddings, (m,), generator=generator).to(module.weight_packed.device)
        rel, mx = errors(module(ids), module.reference_lookup(ids))
        tol = tolerance.get(dt, DEFAULT_TOLERANCE[dt])
        checks.append(Check(name, kind, dt, m, module.lookup_path(), rel, mx, tol, bool(rel <= tol)))
    return checks


def dense_reference(model: nn.Module) -> int:
    """Swap, in place, every validatable module that offers ``reference_weight()`` for a dense
    ``nn.Linear`` carrying that weight (rounded once to the module's dtype) and its bias.

    The result serves no kernel: it is the "dequantized reference" model that end-to-end checks
    compare the kernel-served model with. Returns how many modules were swapped.
    """
    from compress.model import set_module

    swapped = 0
    for name, mod in validatable_modules(model):
        if not hasattr(mod, "reference_weight"):
            continue
        w = mod.reference_weight()  # float64 [out, in]
        bias = getattr(mod, "bias", None)
        dtype = bias.dtype if bias is not None else next(t for t in mod.buffers() if t.is_floating_point()).dtype
        dense = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=dtype)
        dense.weight = nn.Parameter(w.to(dtype), requires_grad=False)
        if bias is not None:
            dense.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        set_module(model, name, dense)
        swapped += 1
    return swapped


def short_path(path: str) -> str:
    """A kernel path label in a few characters: ``torch twin · dequant+matmul`` → ``twin dequant``,
    ``triton-interpreter gemv`` → ``interp gemv``."""
    return (path.replace("torch twin · ", "twin ").replace("triton-interpreter ", "interp ")
            .replace("dequant+matmul", "dequant"))


def _fmt(v: float) -> str:
    """Two significant digits: enough to compare with a tolerance, narrow enough for 80 columns."""
    return "NaN" if math.isnan(v) else f"{v:.1e}"


def _group(checks: list[Check], key: Callable[[Check], str]) -> dict[str, list[Check]]:
    """``checks`` by ``key``, in first-seen order."""
    out: dict[str, list[Check]] = {}
    for c in checks:
        out.setdefault(key(c), []).append(c)
    return out


def _worst_cells(checks: list[Check], dtypes: list[str]) -> list[str]:
    """Per dtype, the worst relative error of ``checks`` (blank where none ran in that dtype)."""
    by_dtype = _group(checks, lambda c: c.dtype)
    return [_fmt(_worst(c.rel_err for c in by_dtype[dt])) if dt in by_dtype else "" for dt in dtypes]


def _ok(ok: bool) -> str:
    return "[green]ok[/green]" if ok else "[red]FAIL[/red]"


def module_table(report: ValidationReport, verbose: bool = False) -> Table | Text:
    """Failing and unvalidated modules (every module with ``verbose``), one row per module and
    kernel path: short name (``L12 self_attn.q``), kind (only when the checkpoint mixes kinds,
    else in the title), the path and the M that took it, and per dtype the worst relative error
    over those M. Fits 80 columns; max abs errors are in :meth:`ValidationReport.to_json`.

    Returns a one-line :class:`~rich.text.Text` instead of an empty table when nothing failed
    and ``verbose`` is off, so the caller prints the result either way.
    """
    modules = _group(report.checks, lambda c: c.module)
    shown = {n: cs for n, cs in modules.items() if verbose or not all(c.ok for c in cs)}
    if not shown and not report.unvalidated:
        return Text(f"all {len(modules)} modules within tolerance on every path and dtype "
                    "(--verbose lists them)")
    kinds = sorted({c.kind for c in report.checks} | set(report.unvalidated.values()))
    mixed = len(kinds) > 1
    what = " ".join([*(["failing"] if not verbose else []), *([] if mixed else kinds), "modules"])
    t = compact_table(f"{what} of {Path(report.model).name}: kernel vs float64 reference")
    for col in ("module", *(["kind"] if mixed else []), "path (M)"):
        t.add_column(col, overflow="fold")
    for dt in report.dtypes:
        t.add_column(dt, justify="right", no_wrap=True)
    t.add_column("ok", no_wrap=True)
    for name, cs in shown.items():
        for path, sel in _group(cs, lambda c: c.path).items():
            ms = " ".join(map(str, sorted({c.m for c in sel})))
            t.add_row(short_name(name), *([sel[0].kind] if mixed else []), f"{short_path(path)} ({ms})",
                      *_worst_cells(sel, report.dtypes), _ok(all(c.ok for c in sel)))
    for name, kind in report.unvalidated.items():
        t.add_row(short_name(name), *([kind] if mixed else []), "no reference", *[""] * len(report.dtypes),
                  _ok(False))
    t.caption = "rel. err = ‖y − y_ref‖/‖y_ref‖, worst over M; max abs: --json"
    return t


def summary_table(report: ValidationReport) -> Table:
    """One row per module kind: modules, checks, per dtype the worst relative error (the header
    gives the tolerance) and the failed checks; modules without a reference count as failed.
    The caption names the kernel paths taken. Fits 80 columns."""
    t = compact_table("validate: by kind")
    t.add_column("kind", overflow="fold")
    for col in ("modules", "checks", *(f"{dt} ≤{report.tolerance[dt]:.0e}" for dt in report.dtypes), "failed"):
        t.add_column(col, justify="right", no_wrap=True)
    kinds = _group(report.checks, lambda c: c.kind)
    unchecked = Counter(report.unvalidated.values())
    for kind in sorted(kinds.keys() | unchecked.keys()):
        cs = kinds.get(kind, [])
        n_bad = sum(not c.ok for c in cs) + unchecked[kind]
        t.add_row(kind, str(len({c.module for c in cs}) + unchecked[kind]), str(len(cs)),
                  *_worst_cells(cs, report.dtypes), f"[red]{n_bad}[/red]" if n_bad else "0")
    notes = []
    if report.checks:
        notes.append("paths: " + ", ".join(sorted({short_path(c.path) for c in report.checks})))
    if report.unvalidated:
        notes.append(f"{len(report.unvalidated)} module(s) without a reference, counted as failed")
    t.caption = "\n".join(notes) or None
    return t


def _worst(values: Iterable[float]) -> float:
    vals = list(values)
    return float("nan") if any(math.isnan(v) for v in vals) else max(vals)
