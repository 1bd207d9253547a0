"""BAQ for the GPTQ pass (``allocate: baq``): the scan, plan and report pieces of loss-driven
bit allocation (the math is :mod:`compress.algos.baq`).

* **scan** (dense blocks, work store): each fused group's input Gram and GPTQ's per-column OBS
  losses at the reference width ``bits`` (one GPTQ solve on the dense Hessian, the codes thrown
  away). Stored under a key of every option that changes those losses, so a second BAQ run on the
  same model and data — any budget, any choices — reads them instead of recomputing.
* **plan**: every group's per-weight sensitivity, the closed-form widths (geometric mean per
  fused group or over the model), projected onto the kernel-legal choices and repaired to the
  budget over *all* quantised weights; ``plan.json`` lists the widths of every group.
* **apply**: the ordinary GPTQ stream (true-sequential, quantised propagation by default) with
  each group solved at its planned width; a linear with several widths becomes a
  :class:`~compress.modules.quant_linear.MixedQuantLinear` (one packed range per width).

Where this differs from the reference code (``opt_baq.py``): the losses come from the dense
model's Hessians in one scan instead of a full quantised GPTQ pass; widths are chosen per group
of ``group_size`` columns from {2, 3, 4, 8} (not a level count per column), so the kernels serve
them; the realised average is repaired to the budget instead of drifting.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel
from torch import Tensor

from compress.algos import baq
from compress.algos.gptq import gptq_quantize
from compress.errors import CompressError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from compress.calib.pipeline import LayerContext
    from compress.passes.quantize import GPTQConfig
    from compress.pipeline.stats import BlockStats


class UnitPlan(BaseModel):
    """One fused group of one block: its linears and the width of each column group."""

    layer: int
    names: list[str]
    rows: int
    in_features: int
    group_width: int
    group_bits: list[int]
    predicted_loss: float

    def average_bits(self) -> float:
        cols = [min(self.group_width, self.in_features - g * self.group_width) for g in range(len(self.group_bits))]
        return sum(c * b for c, b in zip(cols, self.group_bits, strict=True)) / self.in_features


class BAQPlan(BaseModel):
    """The whole model's allocation (``plan.json``)."""

    budget: float
    realized: float
    choices: list[int]
    reference_bits: int
    theta: float
    granularity: str
    scope: str
    repair_moves: int
    predicted_loss: float
    uniform_predicted_loss: float | None
    units: list[UnitPlan]

    def unit(self, layer: int, first: str) -> UnitPlan:
        for u in self.units:
            if u.layer == layer and u.names[0] == first:
                return u
        raise KeyError(f"no BAQ plan for {first} of block {layer}")


def scan_losses(ctx: LayerContext, groups: list[list[str]], config: GPTQConfig) -> dict[str, Tensor]:
    """Per fused group: its Gram (under the adapter group's first linear, as ``input-gram``), and
    under the first *selected* linear GPTQ's per-column losses at the reference width
    (``name.column_loss``) and ``[rows, in]`` of the row-stacked siblings (``name.shape``)."""
    from compress.passes.quantize import single_thread
    from compress.pipeline.stats import group_first, input_grams

    grams = input_grams(ctx, config.hessian_dtype)  # keyed by the adapter group's first linear
    out: dict[str, Tensor] = {}
    for names in groups:
        first = names[0]
        H = grams[group_first(ctx.adapter, first)]
        W = torch.cat([ctx.module(n).weight.detach() for n in names], dim=0)  # (Σ out, in) siblings by rows
        with single_thread():
            _, stats = gptq_quantize(W, H, config.spec(W.dtype), block_size=config.block_size,
                                     percdamp=config.damp, act_order=config.act_order,
                                     static_groups=config.static_groups)
        out[group_first(ctx.adapter, first)] = H  # what a ``propagate: dense`` apply reads
        out[f"{first}.column_loss"] = stats.column_loss  # type: ignore[assignment]
        out[f"{first}.shape"] = torch.tensor([W.shape[0], W.shape[1]], dtype=torch.int64, device=W.device)
    return out


Unit = tuple[int, list[str], Tensor, int, int]


def _units(stats: BlockStats, groups_of: dict[str, list[str]], config: GPTQConfig) -> list[Unit]:
    """``(layer, names, column_loss, rows, in)`` of every scanned fused group."""
    units = []
    for i in range(stats.n_blocks):
        block = stats.block(i)
        if block is None:
            raise CompressError(f"the BAQ scan statistics of block {i} are missing", "run again (or with --no-cache)")
        for key in sorted(k for k in block if k.endswith(".column_loss")):
            first = key[: -len(".column_loss")]
            rows, in_f = (int(v) for v in block[f"{first}.shape"].tolist())
            units.append((i, groups_of.get(first, [first]), block[key].cpu(), rows, in_f))
    return units


def make_plan(stats: BlockStats, groups_of: dict[str, list[str]], config: GPTQConfig) -> BAQPlan:
    """Sensitivities of every group → closed-form widths → choices → budget (see the module doc)."""
    theta, ref = config.theta, config.bits
    budget = config.budget()
    choices = tuple(sorted(config.bit_choices))
    cs, ns, scopes, spans = [], [], [], []
    units = _units(stats, groups_of, config)
    for u, (_, _, loss, rows, in_f) in enumerate(units):
        gw = in_f if config.group_size is None else min(int(config.group_size), in_f)
        c = baq.group_sensitivity(loss, rows, gw, ref, theta)  # (G,)
        cols = torch.tensor([min(gw, in_f - g * gw) for g in range(c.numel())], dtype=torch.float64, device=c.device)
        n = cols * rows
        if config.granularity == "layer":  # one width for the whole fused group
            c, n = (c * n).sum(dim=0, keepdim=True) / n.sum(), n.sum(dim=0, keepdim=True)
        spans.append((len(torch.cat(cs)) if cs else 0, c.numel(), gw))
        cs.append(c)
        ns.append(n)
        scopes.append(torch.full((c.numel(),), u, device=c.device))
    c_all, n_all = torch.cat(cs), torch.cat(ns)
    try:
        alloc = baq.allocate(c_all, n_all, budget, choices, theta=theta,
                             scopes=torch.cat(scopes) if config.scope == "layer" else None)
    except ValueError as e:
        raise CompressError(f"--average-bits {budget:g}: {e}",
                            "choose a budget inside --bit-choices, or a finer --granularity") from None
    plans = []
    for (layer, names, _, rows, in_f), (start, count, gw), c, n in zip(units, spans, cs, ns, strict=True):
        bits = alloc.bits[start:start + count]
        n_groups = -(-in_f // gw)
        group_bits = [int(bits[0])] * n_groups if count == 1 and n_groups > 1 else [int(b) for b in bits]
        plans.append(UnitPlan(layer=layer, names=names, rows=rows, in_features=in_f, group_width=gw,
                              group_bits=group_bits, predicted_loss=float(baq.predicted_loss(c, n, bits, theta).sum())))
    uniform = None
    if budget in choices:
        uniform = float(baq.predicted_loss(c_all, n_all, torch.full_like(c_all, budget), theta).sum())
    return BAQPlan(budget=budget, realized=alloc.realized, choices=list(choices), reference_bits=ref, theta=theta,
                   granularity=config.granularity, scope=config.scope, repair_moves=alloc.moves,
                   predicted_loss=alloc.predicted, uniform_predicted_loss=uniform, units=plans)


def width_histogram(group_bits: list[int], in_features: int, group_width: int) -> str:
    """Input columns stored at each width, narrowest first (``"3b:448 4b:128"``)."""
    hist: dict[int, int] = {}
    for g, b in enumerate(group_bits):
        hist[b] = hist.get(b, 0) + min(group_width, in_features - g * group_width)
    return " ".join(f"{b}b:{n}" for b, n in sorted(hist.items()))


def log_correlation(predicted: list[float], measured: list[float]) -> float | None:
    """Pearson correlation of ``log`` predicted vs ``log`` measured losses (None below 3 points)."""
    pairs = [(math.log(p), math.log(m)) for p, m in zip(predicted, measured, strict=True) if p > 0 and m > 0]
    if len(pairs) < 3:
        return None
    x = torch.tensor(pairs, dtype=torch.float64, device="cpu")
    x = x - x.mean(dim=0)
    den = float(x[:, 0].norm() * x[:, 1].norm())
    return float((x[:, 0] * x[:, 1]).sum()) / den if den > 0 else None


def bits_figure(plan: BAQPlan, title: str, measured: dict[tuple[int, str], float] | None = None) -> Figure:
    """Average bits of every fused group per layer (one line per group role)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot(1, 1, 1)
    roles = sorted({u.names[0] for u in plan.units})
    for role in roles:
        us = sorted((u for u in plan.units if u.names[0] == role), key=lambda u: u.layer)
        label = "+".join(n.split(".")[-1] for n in us[0].names)
        ax.plot([u.layer for u in us], [u.average_bits() for u in us], marker="o", ms=3, label=label)
    ax.axhline(plan.realized, color="k", lw=0.8, ls="--", label=f"model average {plan.realized:.3f}")
    ax.set_xlabel("layer")
    ax.set_ylabel("average bits")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    return fig


Granularity = Literal["group", "layer"]
Scope = Literal["layer", "model"]
