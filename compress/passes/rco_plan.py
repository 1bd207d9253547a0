"""RCO's budget and option spellings, its per-group costs and the plan it writes (``plan.json``,
``assignment.json``, ``reports/assignment.png``)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, Field

from compress.algos import svd

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


@dataclass(frozen=True)
class Budget:
    """``3.0bits`` (average code bits per allocated weight) or ``40MB`` (bytes of the allocated
    linears; decimal KB/MB/GB or binary KiB/MiB/GiB)."""

    unit: str  # "bits" | "bytes"
    value: float
    text: str


def parse_budget(text: str) -> Budget:
    """Parse ``--budget``; ValueError names the accepted spellings."""
    s = str(text).strip().lower().replace(" ", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)(bits?|[kmg]i?b|b)?", s)
    if m is None:
        raise ValueError(f"{text!r} is not a budget: give average bits (3.0bits) or bytes (40MB, 38MiB)")
    value, unit = float(m.group(1)), m.group(2) or "bits"
    if unit.startswith("bit"):
        if not 0 < value <= 32:
            raise ValueError(f"an average of {value:g} bits is outside (0, 32]")
        return Budget("bits", value, text)
    if value <= 0:
        raise ValueError("a byte budget must be positive")
    return Budget("bytes", value * _BYTE_UNITS[unit], text)


@dataclass(frozen=True)
class Option:
    """One candidate representation: ``gptq`` at ``value`` bits or ``lowrank`` at ``value`` of the
    parameters (whitened SVD, SVD-LLM)."""

    method: str
    value: float

    @property
    def label(self) -> str:
        return f"gptq{int(self.value)}" if self.method == "gptq" else f"lowrank{self.value:g}"


METHODS = ("gptq", "lowrank")


def parse_options(specs: list[str]) -> list[Option]:
    """``["gptq:2,3,4,8", "lowrank:0.3,0.5"]`` → options, in that order, duplicates dropped."""
    from compress.kernels.packing import SUPPORTED_BITS

    out: list[Option] = []
    for spec in specs:
        method, _, values = str(spec).partition(":")
        method = method.strip().lower()
        if method not in METHODS or not values.strip():
            raise ValueError(f"{spec!r}: write METHOD:V1,V2 with METHOD one of {', '.join(METHODS)} "
                             "(gptq:2,3,4,8 or lowrank:0.3,0.5)")
        for v in values.split(","):
            try:
                x = float(v)
            except ValueError:
                raise ValueError(f"{spec!r}: {v!r} is not a number") from None
            if method == "gptq" and (x != int(x) or int(x) not in SUPPORTED_BITS):
                raise ValueError(f"gptq:{v} has no kernel; choose widths from {', '.join(map(str, SUPPORTED_BITS))}")
            if method == "lowrank" and not 0 < x < 1:
                raise ValueError(f"lowrank:{v}: a parameter ratio must be in (0, 1)")
            opt = Option(method, float(int(x)) if method == "gptq" else x)
            if opt not in out:
                out.append(opt)
    if not out:
        raise ValueError("name at least one option (e.g. gptq:2,3,4,8)")
    return out


def option_bytes(opt: Option, out_f: int, in_f: int, group_size: int | None, symmetric: bool,
                 dtype: torch.dtype) -> int | None:
    """Stored bytes of one ``[out, in]`` linear under ``opt`` (None: the option does not apply,
    e.g. a rank that would not save parameters)."""
    if opt.method == "gptq":
        from compress.modules.kinds import entry_bytes
        from compress.modules.quant_linear import QuantEntry

        entry = QuantEntry(in_features=in_f, out_features=out_f, bits=int(opt.value),
                           group_size=group_size or in_f, symmetric=symmetric)
        return entry_bytes(entry, dtype)  # scales in the weight's dtype, as the GPTQ pass stores them
    rank = svd.rank_for_ratio(in_f, out_f, opt.value)
    return None if rank is None else svd.lowrank_params(in_f, out_f, rank) * dtype.itemsize


def code_bits(opt: Option, nbytes: int, weights: int) -> float:
    """What an option costs under a bits budget, per weight: the code width for GPTQ (as BAQ
    counts it: scales and zero points aside), the stored bits for low rank."""
    return opt.value if opt.method == "gptq" else 8.0 * nbytes / weights


# -- the plan ------------------------------------------------------------------------------------
class GroupChoice(BaseModel):
    """One allocation group (a fused group of one block by default) and the option it got."""

    layer: int
    names: list[str]
    weights: int
    option: str
    bits: float  # the option's cost per weight in the budget's own measure
    bytes: int
    error: float  # relative output error of the option (the database's sensitivity)
    probability: float | None = None  # p of the chosen option at the end of the optimisation


class RCOPlan(BaseModel):
    """The assignment (``plan.json`` and ``assignment.json``)."""

    search: str
    objective: str
    budget: str
    budget_unit: str
    target: float  # average bits, or bytes of the allocated linears
    realized_average_bits: float  # code bits per allocated weight (GPTQ width; low rank: stored bits)
    realized_stored_bits: float  # every stored bit (scales, zero points, factors) per allocated weight
    realized_bytes: int
    exact: bool  # the realised cost equals the budget (else the nearest feasible capacity was taken)
    feasible_range: list[float]
    options: list[str]
    groups: list[GroupChoice]
    steps: int = 0
    seconds_per_step: float | None = None
    optimize_seconds: float | None = None
    objective_setup_seconds: float | None = None
    final_loss: float | None = None  # the objective of the discrete assignment over every window
    history: list[dict] = Field(default_factory=list)

    def shares(self) -> dict[str, float]:
        """Fraction of the allocated weights at each option."""
        total = sum(g.weights for g in self.groups)
        out: dict[str, float] = {}
        for g in self.groups:
            out[g.option] = out.get(g.option, 0.0) + g.weights / total
        return out

    def summary(self) -> list[str]:
        unit = "bits" if self.budget_unit == "bits" else "bytes"
        got = (f"{self.realized_average_bits:.4f} average bits" if unit == "bits"
               else f"{self.realized_bytes:,} bytes")
        lines = [f"RCO ({self.search}, {self.objective}): budget {self.budget} → {got} "
                 f"({'exact' if self.exact else 'nearest feasible'}; feasible {self.feasible_range[0]:g}.."
                 f"{self.feasible_range[1]:g} {unit}) over {len(self.groups)} groups",
                 "options: " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in sorted(self.shares().items()))]
        layers = sorted({g.layer for g in self.groups})
        per = []
        for i in layers:
            gs = [g for g in self.groups if g.layer == i]
            n = sum(g.weights for g in gs)
            per.append(f"{i}:{sum(g.bits * g.weights for g in gs) / n:.2f}")
        lines.append("average cost per layer (bits/weight): " + " ".join(per))
        if self.seconds_per_step is not None:
            lines.append(f"{self.steps} steps, {self.seconds_per_step:.2f} s per step, "
                         f"{self.optimize_seconds:.1f} s in total")
        return lines


def assignment_figure(plan: RCOPlan, title: str) -> Figure:
    """Cost per weight of every group, per layer (one line per group role), and the loss curve."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    ax = fig.add_subplot(1, 2, 1)
    roles = sorted({g.names[0] for g in plan.groups})
    for role in roles:
        gs = sorted((g for g in plan.groups if g.names[0] == role), key=lambda g: g.layer)
        ax.plot([g.layer for g in gs], [g.bits for g in gs], marker="o", ms=3,
                label="+".join(n.split(".")[-1] for n in gs[0].names))
    ax.set_xlabel("layer")
    ax.set_ylabel("bits per weight" if plan.budget_unit == "bits" else "stored bits per weight")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, ncol=2)
    ax2 = fig.add_subplot(1, 2, 2)
    if plan.history:
        ax2.plot([h["step"] for h in plan.history], [h["loss"] for h in plan.history], lw=0.8)
        ax2.set_xlabel("step")
        ax2.set_ylabel(plan.objective)
        if min(h["loss"] for h in plan.history) > 0:
            ax2.set_yscale("log")
    ax2.set_title(f"realised {plan.realized_average_bits:.4f} bits", fontsize=8)
    fig.tight_layout()
    return fig


def fmt_range(lo: float, hi: float, unit: str) -> str:
    if unit == "bits":
        return f"{lo:.4g}..{hi:.4g} average bits"
    return f"{lo / 1e6:.3f}..{hi / 1e6:.3f} MB ({math.floor(lo):,}..{math.ceil(hi):,} bytes)"
