"""BAQ for the GPTQ pass (``allocate: baq``): the scan, plan and report pieces of loss-driven
bit allocation (the math is :mod:`compress.algos.baq`).

* **scan** (dense blocks, work store): each fused group's input Gram, its act-order permutation,
  its dense output energy and GPTQ's per-column and per-row OBS losses at the reference width
  ``bits`` (one GPTQ solve on the dense Hessian with the grouping the apply uses, the codes
  thrown away). Stored under a key of every option that changes those losses, so a second BAQ
  run on the same model and data — any budget, choices, scope or granularity — reads them.
* **plan**: every unit's per-weight sensitivity (a column group, a block of output rows, or a
  whole fused group), the closed-form widths (geometric mean per fused group or over the model),
  projected onto the kernel-legal choices and repaired to the budget over *all* quantised
  weights; ``plan.json`` lists every unit's width.
* **apply**: the ordinary GPTQ stream (true-sequential, quantised propagation by default) with
  each group solved at its planned widths; a linear with several widths becomes a
  :class:`~compress.modules.quant_linear.MixedQuantLinear` (one packed column range per width)
  or, for row blocks, a :class:`~compress.modules.quant_linear.RowMixedQuantLinear`.

Where this differs from the reference code (``opt_baq.py``): the losses come from the dense
model's Hessians in one scan instead of a full quantised GPTQ pass; widths are chosen per group
of ``group_size`` columns from {2, 3, 4, 8} (not a level count per column), so the kernels serve
them; the realised average is repaired to the budget instead of drifting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel, Field
from torch import Tensor

from compress.algos import baq
from compress.algos.gptq import act_order_perm, gptq_quantize_mixed
from compress.errors import CompressError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from compress.calib.pipeline import LayerContext
    from compress.passes.quantize import GPTQConfig
    from compress.pipeline.stats import BlockStats


class UnitPlan(BaseModel):
    """One fused group of one block: its linears and the width of each column group — or, under
    ``granularity: rows``, of each block of ``row_block`` output rows (blocks cut per sibling)."""

    layer: int
    names: list[str]
    rows: int
    in_features: int
    group_width: int
    group_bits: list[int] = Field(default_factory=list)
    sizes: list[int] = Field(default_factory=list)  # rows of every sibling (stacked in this order)
    row_block: int | None = None
    row_bits: list[int] | None = None
    predicted_loss: float

    def row_widths(self) -> list[int]:
        """The width of every stacked row (``granularity: rows``)."""
        assert self.row_bits is not None and self.row_block is not None
        out, k = [], 0
        for size in self.sizes:
            for a in range(0, size, self.row_block):
                out += [self.row_bits[k]] * (min(a + self.row_block, size) - a)
                k += 1
        return out

    def average_bits(self) -> float:
        if self.row_bits is not None:
            return sum(self.row_widths()) / self.rows
        cols = [min(self.group_width, self.in_features - g * self.group_width) for g in range(len(self.group_bits))]
        return sum(c * b for c, b in zip(cols, self.group_bits, strict=True)) / self.in_features

    def histogram(self) -> str:
        """Columns (or rows) stored at each width, narrowest first
        (``"3b:448 4b:128"``; under row blocks ``"2b:64r 3b:512r"``)."""
        hist: dict[int, int] = {}
        if self.row_bits is not None:
            for b in self.row_widths():
                hist[b] = hist.get(b, 0) + 1
            return " ".join(f"{b}b:{n}r" for b, n in sorted(hist.items()))
        for g, b in enumerate(self.group_bits):
            hist[b] = hist.get(b, 0) + min(self.group_width, self.in_features - g * self.group_width)
        return " ".join(f"{b}b:{n}" for b, n in sorted(hist.items()))


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

    def summary(self) -> list[str]:
        """What ``compress plan`` prints: the budget met, the widths' shares, the predicted gain,
        the average bits of every layer (the full plan is the run's ``plan.json``)."""
        weights: dict[int, int] = {}
        for u in self.units:
            if u.row_bits is not None:
                for b in u.row_widths():
                    weights[b] = weights.get(b, 0) + u.in_features
            else:
                for g, b in enumerate(u.group_bits):
                    weights[b] = weights.get(b, 0) + u.rows * min(u.group_width, u.in_features - g * u.group_width)
        total = sum(weights.values())
        lines = [f"BAQ: budget {self.budget:g} bits, realised {self.realized:.4f} over {total:,} weights "
                 f"({self.granularity} granularity, scope {self.scope}, theta {self.theta:g})",
                 "widths: " + ", ".join(f"{b} bits {100 * n / total:.1f} %" for b, n in sorted(weights.items()))]
        if self.uniform_predicted_loss:
            lines.append(f"predicted loss vs uniform {self.budget:g} bits: "
                         f"{self.predicted_loss / self.uniform_predicted_loss:.3f}×")
        layers = sorted({u.layer for u in self.units})
        avg = []
        for i in layers:
            us = [u for u in self.units if u.layer == i]
            n = sum(u.rows * u.in_features for u in us)
            avg.append(f"{i}:{sum(u.average_bits() * u.rows * u.in_features for u in us) / n:.2f}")
        lines.append("average bits per layer: " + " ".join(avg))
        return lines

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
        spec = config.spec(W.dtype)
        perm = act_order_perm(H) if config.act_order else torch.arange(W.shape[1], device=W.device)
        n_groups = 1 if spec.per_channel(W.shape[1]) else spec.n_groups(W.shape[1])
        with single_thread():  # the grouping the apply will use, every group at the reference width
            _, stats = gptq_quantize_mixed(W, H, spec, [config.bits] * n_groups, block_size=config.block_size,
                                           percdamp=config.damp, act_order=config.act_order,
                                           static_groups=config.static_groups, perm=perm)
        out[group_first(ctx.adapter, first)] = H  # what a ``propagate: dense`` apply reads
        out[f"{first}.column_loss"] = stats.column_loss  # type: ignore[assignment]
        out[f"{first}.shape"] = torch.tensor([W.shape[0], W.shape[1]], dtype=torch.int64, device=W.device)
        out[f"{first}.perm"] = perm.to(torch.int64)  # the processing order the groups are cut from
        out[f"{first}.row_loss"] = stats.row_loss  # type: ignore[assignment]
        out[f"{first}.sizes"] = torch.tensor([ctx.module(n).weight.shape[0] for n in names], dtype=torch.int64,
                                             device=W.device)
        Wd = W.to(torch.float64)
        out[f"{first}.energy"] = ((Wd @ H.to(torch.float64)) * Wd).sum().reshape(1)  # ‖X Wᵀ‖² / samples
    return out


@dataclass
class _Unit:
    """One scanned fused group: losses in the order its column groups are cut from (the act-order
    permutation unless ``static_groups``), divided by ``scale`` (its dense output energy under
    ``model-relative``, else 1)."""

    layer: int
    names: list[str]
    rows: int
    in_f: int
    sizes: list[int]
    column_loss: Tensor
    row_loss: Tensor
    scale: float


def _units(stats: BlockStats, groups_of: dict[str, list[str]], config: GPTQConfig) -> list[_Unit]:
    units = []
    for i in range(stats.n_blocks):
        block = stats.block(i)
        if block is None:
            raise CompressError(f"the BAQ scan statistics of block {i} are missing", "run again (or with --no-cache)")
        for key in sorted(k for k in block if k.endswith(".column_loss")):
            first = key[: -len(".column_loss")]
            rows, in_f = (int(v) for v in block[f"{first}.shape"].tolist())
            loss = block[key].cpu()
            if not config.static_groups:  # groups are consecutive columns of the processing order
                loss = loss[block[f"{first}.perm"].cpu().long()]
            scale = 1.0
            if config.scope == "model-relative":
                scale = float(block[f"{first}.energy"].clamp_min(1e-30))
            units.append(_Unit(i, groups_of.get(first, [first]), rows, in_f, block[f"{first}.sizes"].tolist(),
                               loss / scale, block[f"{first}.row_loss"].cpu() / scale, scale))
    return units


def _cells(u: _Unit, config: GPTQConfig) -> tuple[Tensor, Tensor, int]:
    """Per-weight sensitivity and weight count of every unit of allocation of ``u`` (column groups,
    row blocks, or the whole group), and the column-group width."""
    theta, ref = config.theta, config.bits
    gw = u.in_f if config.group_size is None else min(int(config.group_size), u.in_f)
    if config.granularity == "rows":
        c, rows = baq.row_block_sensitivity(u.row_loss, u.in_f, u.sizes, config.row_block, ref, theta)
        return c, rows * u.in_f, gw
    c = baq.group_sensitivity(u.column_loss, u.rows, gw, ref, theta)  # (G,)
    cols = torch.tensor([min(gw, u.in_f - g * gw) for g in range(c.numel())], dtype=torch.float64, device=c.device)
    n = cols * u.rows
    if config.granularity == "layer":  # one width for the whole fused group
        return (c * n).sum(dim=0, keepdim=True) / n.sum(), n.sum(dim=0, keepdim=True), gw
    return c, n, gw


def make_plan(stats: BlockStats, groups_of: dict[str, list[str]], config: GPTQConfig) -> BAQPlan:
    """Sensitivities of every group → closed-form widths → choices → budget (see the module doc)."""
    theta, budget = config.theta, config.budget()
    choices = tuple(sorted(config.bit_choices))
    units = _units(stats, groups_of, config)
    cells = [_cells(u, config) for u in units]
    c_all = torch.cat([c for c, _, _ in cells])
    n_all = torch.cat([n for _, n, _ in cells])
    scopes = torch.cat([torch.full((c.numel(),), k, device=c.device) for k, (c, _, _) in enumerate(cells)])
    try:
        alloc = baq.allocate(c_all, n_all, budget, choices, theta=theta,
                             scopes=scopes if config.scope == "layer" else None)
    except ValueError as e:
        raise CompressError(f"--average-bits {budget:g}: {e}",
                            "choose a budget inside --bit-choices, or a finer --granularity") from None
    plans, start = [], 0
    uniform = 0.0 if budget in choices else None
    predicted = 0.0
    for u, (c, n, gw) in zip(units, cells, strict=True):
        bits = alloc.bits[start:start + c.numel()]
        start += c.numel()
        loss = float(baq.predicted_loss(c, n, bits, theta).sum()) * u.scale  # in GPTQ's own (raw) units
        predicted += loss
        if uniform is not None:
            uniform += float(baq.predicted_loss(c, n, torch.full_like(c, budget), theta).sum()) * u.scale
        widths = [int(b) for b in bits]
        plan = UnitPlan(layer=u.layer, names=u.names, rows=u.rows, in_features=u.in_f, group_width=gw,
                        sizes=u.sizes, predicted_loss=loss)
        if config.granularity == "rows":
            plan.row_block, plan.row_bits = config.row_block, widths
        else:
            plan.group_bits = widths * (-(-u.in_f // gw)) if config.granularity == "layer" else widths
        plans.append(plan)
    return BAQPlan(budget=budget, realized=alloc.realized, choices=list(choices), reference_bits=config.bits,
                   theta=theta, granularity=config.granularity, scope=config.scope, repair_moves=alloc.moves,
                   predicted_loss=predicted, uniform_predicted_loss=uniform, units=plans)


def log_correlation(predicted: list[float], measured: list[float]) -> float | None:
    """Pearson correlation of ``log`` predicted vs ``log`` measured losses (None below 3 points)."""
    pairs = [(math.log(p), math.log(m)) for p, m in zip(predicted, measured, strict=True) if p > 0 and m > 0]
    if len(pairs) < 3:
        return None
    x = torch.tensor(pairs, dtype=torch.float64, device="cpu")
    x = x - x.mean(dim=0)
    den = float(x[:, 0].norm() * x[:, 1].norm())
    return float((x[:, 0] * x[:, 1]).sum()) / den if den > 0 else None


def bits_figure(plan: BAQPlan, title: str) -> Figure:
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


Granularity = Literal["group", "rows", "layer"]
Scope = Literal["layer", "model", "model-relative"]
