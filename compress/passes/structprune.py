"""StructPrune (arXiv 2510.03246): structured pruning of attention heads and FFN channels with a
layer-wise allocation and ADMM reconstruction, one block in memory at a time.

* **scan** (dense blocks, stored in the work store): each group's group-Wanda score — for an
  FFN channel its gate/up rows and its down column, for a KV group its k/v rows, the rows of the
  query heads that read it and their o columns — from the blocks' input norms.
* **plan**: the parameter budget (``sparsity`` of every block linear's parameters) spread over
  the units (one structure of one layer) by :func:`compress.algos.structprune.plan_removal`;
  each unit keeps its highest-scoring groups (the closed-form structured mask). ``plan.json``
  lists every layer's kept groups.
* **apply**: per block, the Grams of o's and down's inputs on the pruned prefix's activations
  (one partial forward through the still-dense block), the kept weights of o and down
  reconstructed by ADMM against the dense block's outputs, q/k/v/gate/up cut to their kept rows;
  every changed linear becomes a physically smaller :class:`PrunedLinear`.

Heads are pruned a **KV group at a time** (its k/v heads and every query head that reads them),
so each layer keeps the query/KV ratio every ``transformers`` attention assumes and the KV cache
shrinks with it. What the paper specifies could not be read; the reconstructed parts (scores,
energy, temperature, ADMM details) are options, see docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel, Field, field_validator
from torch import Tensor

from compress.algos import structprune as sp
from compress.errors import CompressError
from compress.modules.pruned import PrunedLinear, set_head_counts
from compress.pipeline.pass_api import Needs, Pass, PassConfig, Statistic
from compress.registry import register_pass
from compress.report import LayerRecord

if TYPE_CHECKING:
    from pathlib import Path

    from matplotlib.figure import Figure

    from compress.arch import Adapter
    from compress.calib.pipeline import LayerContext
    from compress.pipeline.contexts import RunContext
    from compress.pipeline.memory import MemoryShape
    from compress.pipeline.shapes import ShapePlan
    from compress.pipeline.stats import BlockStats

Structure = Literal["heads", "ffn"]


class StructPruneConfig(PassConfig):
    """Structured pruning (``compress prune``).

    Args:
        sparsity: fraction of the blocks' linear parameters to remove, in [0, 0.95).
        structures: what may be removed: ``heads`` (KV groups with their query heads) and/or
            ``ffn`` (MLP channels).
        allocation: ``softmax`` (energy-based, the paper's), ``uniform`` (the same share in every
            layer) or ``global`` (one threshold over every group of the model).
        energy_form: the energy rule, ``softmax`` (dilute limit) or ``logistic`` (mean field).
        temperature: allocation temperature relative to the spread of the layers' energies.
        min_keep / max_keep: fraction of each layer's heads and channels kept at least / at most.
        multiple_of: kept FFN widths are multiples of this (kernel-friendly shapes).
        aggregation: group score ``sum`` of ``|W|·‖x‖`` (group Wanda) or its ``l2`` aggregate.
        reconstruct: ``admm`` re-fits o's and down's kept columns; ``none`` only masks.
        compensate: add the mean output change of o and down (removed columns, and the re-fit's
            residual) to their bias, FLAP-style (adds a bias where the model had none).
        admm_iters / admm_rho / damp: ADMM iterations, penalty (relative to the Gram's mean
            diagonal) and Gram damping.
    """

    sparsity: float = Field(0.2, ge=0.0, lt=0.95, description="fraction of block linear parameters removed")
    structures: list[Structure] = Field(default_factory=lambda: ["heads", "ffn"], description=(
        "what may be removed: heads (KV groups with their query heads), ffn (MLP channels)"))
    allocation: Literal["softmax", "uniform", "global"] = Field("softmax", description=(
        "how the budget is spread over layers: softmax (energy-based), uniform or global"))
    energy_form: Literal["softmax", "logistic"] = Field("softmax", description="energy rule of --allocation softmax")
    temperature: float = Field(1.0, gt=0.0, le=1e6, description="allocation temperature, relative to std(energy)")
    min_keep: float = Field(0.1, gt=0.0, le=1.0, description="least fraction of each layer's heads/channels kept")
    max_keep: float = Field(1.0, gt=0.0, le=1.0, description="most fraction of each layer's heads/channels kept")
    multiple_of: int = Field(1, ge=1, le=256, description="kept FFN widths are multiples of this")
    aggregation: Literal["sum", "l2"] = Field("sum", description="group score: sum of |W|·‖x‖, or its L2 aggregate")
    relative: bool = Field(True, description=(
        "compare layers by scores relative to the RMS of the residual stream entering them"))
    reconstruct: Literal["admm", "none"] = Field("admm", description="re-fit o and down on the kept columns (ADMM)")
    compensate: bool = Field(False, description=(
        "add the mean output change of o and down to their bias (FLAP-style compensation)"))
    admm_iters: int = Field(30, ge=1, le=1000, description="ADMM iterations per reconstructed linear")
    admm_rho: float = Field(1.0, gt=0.0, le=1e6, description="ADMM penalty, relative to mean(diag H)")
    damp: float = Field(0.01, ge=0.0, le=10.0, description="Gram damping, fraction of its mean diagonal")

    @field_validator("structures")
    @classmethod
    def _some(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one of heads, ffn")
        return sorted(set(v))

    @field_validator("targets", "ignore")
    @classmethod
    def _no_targets(cls, v: list[str]) -> list[str]:
        if v:
            raise ValueError("structprune removes whole heads and channels; choose them with structures")
        return v


class LayerPlan(BaseModel):
    """One block's kept KV groups and FFN channels (None: the structure is left whole)."""

    heads: list[int] | None = None
    channels: list[int] | None = None


class StructPrunePlan(BaseModel):
    layers: list[LayerPlan]
    removed_params: int
    target_params: int
    allocation: str
    shares: list[float]
    info: dict = Field(default_factory=dict)


def allocation_figure(plan: StructPrunePlan, kv_groups: int, ffn_width: int, overall_keep: float,
                      title: str) -> Figure:
    """Kept fraction of each block's KV groups and FFN channels (1 where a structure is whole),
    with the fraction of all block parameters kept as a dashed line (the uniform level)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    blocks = list(range(len(plan.layers)))
    heads = [1.0 if lp.heads is None else len(lp.heads) / kv_groups for lp in plan.layers]
    chans = [1.0 if lp.channels is None else len(lp.channels) / ffn_width for lp in plan.layers]
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    ax.plot(blocks, heads, marker="o", ms=3, label="KV groups kept")
    ax.plot(blocks, chans, marker="s", ms=3, label="FFN channels kept")
    ax.axhline(overall_keep, ls="--", color="grey", lw=1, label=f"block parameters kept overall ({overall_keep:.0%})")
    ax.set_title(title)
    ax.set_xlabel("block")
    ax.set_ylabel("fraction kept")
    ax.set_ylim(0, 1.05)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _attn_shape(config: dict) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) from config.json."""
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    hd = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    return heads, kv, hd


_FFN_KEYS = ("intermediate_size", "ffn_dim")


def _uniform_config(config: dict, plan: StructPrunePlan, adapter: Adapter) -> bool:
    """Edit ``config`` to the pruned widths when every block kept the same ones (then the
    checkpoint is an ordinary smaller model); whether it did. Head counts are only written
    where the config can state the head width (``head_dim``), so it does not change with them."""
    heads = {None if lp.heads is None else len(lp.heads) for lp in plan.layers}
    channels = {None if lp.channels is None else len(lp.channels) for lp in plan.layers}
    if len(heads) > 1 or len(channels) > 1:
        return False
    (kv,), (ch,) = heads, channels
    ffn_key = next((k for k in _FFN_KEYS if k in config), None)
    if ch is not None and ffn_key is None:
        return False
    if kv is not None:
        if "head_dim" not in config and adapter.name != "llama":
            return False
        q, k_heads, hd = _attn_shape(config)
        config["head_dim"] = hd
        config["num_attention_heads"], config["num_key_value_heads"] = kv * (q // k_heads), kv
    if ch is not None:
        config[ffn_key] = ch  # type: ignore[index]
    return True


def _residual_rms(ctx: LayerContext) -> Tensor:
    """RMS of the residual stream entering the block (what a group's removal is measured against)."""
    st = ctx.state
    assert st is not None
    total, rows = 0.0, 0
    for b in st.batches():
        x = st.batch(b).to(torch.float64)
        total += float((x * x).mean(-1).sum())
        rows += x.shape[0] * x.shape[1]
    return torch.tensor(math.sqrt(total / max(rows, 1)), dtype=torch.float64, device=st.hidden.device)


def _block_attn(ctx: LayerContext) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of the block, from its projections' widths."""
    a = ctx.adapter
    hd = int(getattr(ctx.module(a.role("attn")), "head_dim"))
    return ctx.module(a.role("q")).out_features // hd, ctx.module(a.role("k")).out_features // hd, hd


@register_pass("structprune", StructPruneConfig, needs_calibration=True, cli_name="prune",
               summary="StructPrune: remove attention heads and FFN channels, budget spread over layers",
               examples=("compress prune smollm2-135m --sparsity 0.3 -o out/p30",
                         "compress prune smollm2-135m --sparsity 0.2 --structures ffn --allocation uniform -o out/p"))
class StructPrunePass(Pass):
    """Score, allocate, mask and reconstruct; see the module docstring."""

    config: StructPruneConfig

    # -- checks and needs ------------------------------------------------------------------
    def check_input(self, adapter: Adapter, manifest: dict) -> None:
        if manifest.get("modules") or manifest.get("transforms"):
            raise CompressError("structprune needs a dense checkpoint (this one is already compressed)",
                                "prune first, then quantise or factor (e.g. recipes/prune-then-gptq.yaml)")
        if not adapter.causal:
            raise CompressError(f"structprune prunes decoder blocks; {adapter.name} is an encoder",
                                "use lowrank or quantize for encoders")
        need = {"ffn": ("up", "down"), "heads": ("q", "k", "v", "o", "attn")}
        for s in self.config.structures:
            if [r for r in need[s] if r not in adapter.roles]:
                raise CompressError(f"structprune cannot remove {s} of {adapter.name} blocks (fused or absent "
                                    "projections)", "choose --structures " + ("ffn" if s == "heads" else "heads"))

    def needs(self) -> Needs:
        return Needs(scan=True, plan=True, activations=self.config.reconstruct == "admm" or self.config.compensate)

    def statistic(self) -> Statistic:
        return Statistic("structprune-scores", 2, {"aggregation": self.config.aggregation})

    # -- scan: group scores of the dense block ---------------------------------------------
    def scan_layer(self, ctx: LayerContext) -> dict[str, Tensor]:
        a = ctx.adapter
        names = [a.roles[r] for r in ("q", "o", "up", "down") if r in a.roles]
        residual = _residual_rms(ctx)  # before the forward below overwrites the block's inputs
        grams = ctx.collect(names, propagate=True)
        norm = {n: torch.diagonal(g).clamp_min(0).sqrt() for n, g in grams.items()}  # per-column RMS
        out = {"ffn": self._ffn_scores(ctx, norm), "residual": residual}  # both structures, whatever this run prunes:
        if all(r in a.roles for r in ("q", "k", "v", "o", "attn")):  # one stored statistic serves every run
            out["heads"] = self._head_scores(ctx, norm)
        return out

    def _ffn_scores(self, ctx: LayerContext, norm: dict[str, Tensor]) -> Tensor:
        a, agg = ctx.adapter, self.config.aggregation
        x_in = norm[a.role("up")]
        rows = [a.role(r) for r in ("gate", "up") if r in a.roles]
        n = ctx.module(a.role("up")).out_features
        idx = torch.arange(n, device=x_in.device)
        total = sum(sp.row_group_scores(sp.element_scores(ctx.module(r).weight, x_in), idx, n, agg) for r in rows)
        down = ctx.module(a.role("down"))
        total = total + sp.col_group_scores(sp.element_scores(down.weight, norm[a.role("down")]), idx, n, agg)
        return sp.finish_scores(total, agg)

    def _head_scores(self, ctx: LayerContext, norm: dict[str, Tensor]) -> Tensor:
        a, agg = ctx.adapter, self.config.aggregation
        heads, kv, hd = _block_attn(ctx)
        x_in = norm[a.role("q")]
        q_group = torch.arange(heads * hd, device=x_in.device) // (hd * (heads // kv))  # q row → its KV group
        kv_group = torch.arange(kv * hd, device=x_in.device) // hd
        total = sp.row_group_scores(sp.element_scores(ctx.module(a.role("q")).weight, x_in), q_group, kv, agg)
        for r in ("k", "v"):
            total = total + sp.row_group_scores(sp.element_scores(ctx.module(a.role(r)).weight, x_in), kv_group, kv, agg)
        o = ctx.module(a.role("o"))
        total = total + sp.col_group_scores(sp.element_scores(o.weight, norm[a.role("o")]), q_group, kv, agg)
        return sp.finish_scores(total, agg)

    def resolve(self, linears: list[tuple[str, int, int]]) -> None:
        """Keep the block linears (the budget counts their parameters) and check that
        ``multiple_of`` divides the FFN width, before any work."""
        self._linears = linears
        m = self.config.multiple_of
        widths = {o for name, o, _ in linears if name.endswith(("up_proj", "fc1"))}
        if "ffn" in self.config.structures and m > 1 and any(w % m for w in widths):
            raise CompressError(f"--multiple-of {m} does not divide the FFN width {min(widths)}",
                                "choose a divisor of it (e.g. 8 or 64)")

    # -- plan --------------------------------------------------------------------------------
    def plan(self, stats: BlockStats, run: RunContext) -> StructPrunePlan:
        units, where = [], []
        for i in range(stats.n_blocks):
            block = stats.block(i)
            if block is None:
                raise CompressError(f"the scan statistics of block {i} are missing", "run again (or with --no-cache)")
            rel = float(block["residual"]) if self.config.relative else 1.0
            for s in self.config.structures:
                units.append(self._unit(i, s, block[s].cpu() / rel, run))
                where.append((i, s))
        total = sum(o * k for _, o, k in self._linears)
        budget = int(round(self.config.sparsity * total))
        try:
            alloc = sp.plan_removal(units, budget, method=self.config.allocation, temperature=self.config.temperature,
                                    form=self.config.energy_form)
        except ValueError as e:
            raise CompressError(f"--sparsity {self.config.sparsity}: {e}",
                                "lower --sparsity, lower --min-keep or allow more --structures") from None
        layers = [LayerPlan() for _ in range(stats.n_blocks)]
        for (i, s), u, k in zip(where, units, alloc.removed, strict=True):
            if k:
                kept = sp.keep_top(u.scores, u.n - k).tolist()
                setattr(layers[i], "heads" if s == "heads" else "channels", kept)
        return StructPrunePlan(layers=layers, removed_params=alloc.removed_params, target_params=budget,
                               allocation=self.config.allocation, shares=alloc.share, info=alloc.info)

    def _unit(self, i: int, structure: str, scores: Tensor, run: RunContext) -> sp.Unit:
        c = self.config
        n = scores.numel()
        lo = max(1, -(-int(c.min_keep * n * 1000) // 1000))
        hi = max(lo, int(c.max_keep * n))
        if structure == "heads":
            heads, kv, hd = _attn_shape(run.config)
            if heads % kv:
                raise CompressError(f"{heads} query heads do not divide into {kv} KV groups",
                                    "prune --structures ffn only")
            hidden = int(run.config["hidden_size"])
            cost = (heads // kv) * hd * hidden * 2 + 2 * hd * hidden  # q rows + o columns, k and v rows
            return sp.Unit(f"layer {i} heads", scores, cost, min_keep=lo, max_keep=hi)
        m = c.multiple_of
        hidden = int(run.config["hidden_size"])
        rows = 3 if "gate" in run.adapter.roles else 2
        return sp.Unit(f"layer {i} ffn", scores, rows * hidden, min_keep=-(-lo // m) * m, max_keep=hi, multiple=m)

    # -- apply -------------------------------------------------------------------------------
    def begin(self, run: RunContext) -> None:
        self._head_counts: dict[str, list[int]] = {}
        self._added_bias = False

    def carry_state(self) -> dict[str, object]:
        return {"head_counts": dict(self._head_counts), "added_bias": self._added_bias}

    def restore_carry(self, state: dict[str, object]) -> None:
        self._head_counts = dict(state.get("head_counts", {}))  # type: ignore[call-overload]
        self._added_bias = bool(state.get("added_bias", False))

    def finish(self, run: RunContext) -> None:
        """Record the per-block head counts (a ``head-counts`` transform) for the loader and, when
        every block kept the same widths, write them into ``config.json`` so plain
        ``transformers`` loads the output too."""
        if self._head_counts:
            run.transforms.append({"kind": "head-counts", "layers": dict(self._head_counts)})
        assert isinstance(run.plan, StructPrunePlan)
        # a bias the dense model did not have is not in its config: only compress.load rebuilds it
        plain = not self._added_bias and _uniform_config(run.config, run.plan, run.adapter)
        run.notes["structprune"] = {"plain_transformers": plain}

    def process_layer(self, ctx: LayerContext, run: RunContext) -> list[LayerRecord]:
        assert isinstance(run.plan, StructPrunePlan)
        lp = run.plan.layers[ctx.index]
        a = ctx.adapter
        grams: dict[str, Tensor] = {}
        means: dict[str, Tensor] = {}
        admm = self.config.reconstruct == "admm"
        if (admm or self.config.compensate) and (lp.heads is not None or lp.channels is not None):
            wanted = [a.role("o")] * (lp.heads is not None) + [a.role("down")] * (lp.channels is not None)
            # inputs of the still-dense block on the pruned prefix's activations
            if self.config.compensate:
                grams, means = ctx.collect_moments(wanted, grams=admm)
            else:
                grams = ctx.collect(wanted)
        records = []
        if lp.heads is not None:
            o = a.role("o")
            records.append(self._prune_heads(ctx, lp.heads, grams.get(o), means.get(o)))
        if lp.channels is not None:
            d = a.role("down")
            records.append(self._prune_ffn(ctx, lp.channels, grams.get(d), means.get(d)))
        return records

    def _prune_heads(self, ctx: LayerContext, kept: list[int], H: Tensor | None, mu: Tensor | None) -> LayerRecord:
        t0 = time.perf_counter()
        a = ctx.adapter
        heads, kv, hd = _block_attn(ctx)
        r = heads // kv
        dev = ctx.module(a.role("q")).weight.device
        q_rows = torch.cat([torch.arange(g * r * hd, (g + 1) * r * hd, device=dev) for g in kept])
        kv_rows = torch.cat([torch.arange(g * hd, (g + 1) * hd, device=dev) for g in kept])
        for role, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
            ctx.replace(a.role(role), PrunedLinear.from_dense(ctx.module(a.role(role)), rows, None))
        rec = self._reconstruct(ctx, a.role("o"), q_rows, H, mu)
        set_head_counts(ctx.module(a.role("attn")), len(kept) * r, len(kept))
        self._head_counts[str(ctx.index)] = [len(kept) * r, len(kept)]
        return self._record(ctx, "self_attn", f"{len(kept)}/{kv} KV groups", rec, t0,
                            [a.role(x) for x in ("q", "k", "v", "o")])

    def _prune_ffn(self, ctx: LayerContext, kept: list[int], H: Tensor | None, mu: Tensor | None) -> LayerRecord:
        t0 = time.perf_counter()
        a = ctx.adapter
        n = ctx.module(a.role("up")).out_features
        rows = torch.tensor(kept, device=ctx.module(a.role("up")).weight.device)
        names = [a.role(x) for x in ("gate", "up") if x in a.roles]
        for rel in names:
            ctx.replace(rel, PrunedLinear.from_dense(ctx.module(rel), rows, None))
        rec = self._reconstruct(ctx, a.role("down"), rows, H, mu)
        return self._record(ctx, "mlp", f"{len(kept)}/{n} channels", rec, t0, [*names, a.role("down")])

    def _reconstruct(self, ctx: LayerContext, rel: str, cols: Tensor, H: Tensor | None,
                     mu: Tensor | None = None) -> sp.Reconstruction | None:
        """Cut ``rel`` to the kept input columns, re-fitted by ADMM when there is a Gram; with the
        input mean ``mu``, the mean output change goes into the bias (FLAP-style)."""
        dense = ctx.module(rel)
        pruned = PrunedLinear.from_dense(dense, None, cols)
        rec = None
        if H is not None:
            c = self.config
            rec = sp.admm_reconstruct(dense.weight, H, cols, iters=c.admm_iters, rho=c.admm_rho, percdamp=c.damp)
            pruned.weight.data = rec.weight[:, cols].to(dense.weight.dtype).contiguous()
        if mu is not None:
            shift = sp.mean_compensation(dense.weight, pruned.weight, cols, mu)  # (out,)
            if pruned.bias is None:
                pruned.bias = torch.nn.Parameter(shift.to(dense.weight.dtype), requires_grad=False)
                self._added_bias = True
            else:
                pruned.bias.data += shift.to(pruned.bias.dtype)
        ctx.replace(rel, pruned)
        return rec

    def _record(self, ctx: LayerContext, part: str, kept: str, rec: sp.Reconstruction | None, t0: float,
                rels: list[str]) -> LayerRecord:
        mods = [ctx.module(r) for r in rels]
        params = sum(m.weight.numel() for m in mods)
        dense = sum(m.dense_in * m.dense_out for m in mods)
        extra: dict[str, float | int | str] = {"kept": kept, "params_removed": dense - params}
        if rec is not None:
            extra.update({"error_before_admm": rec.before, "admm_iters": len(rec.history) - 1})
        return LayerRecord(stage=self.name, layer=ctx.index, module=ctx.prefix + part, kind="pruned",
                           error=None if rec is None else rec.after, time_s=time.perf_counter() - t0,
                           bytes=sum(m.weight.numel() * m.weight.element_size() for m in mods), params=params,
                           extra=extra)

    def write_reports(self, run: RunContext, directory: Path) -> None:
        """``allocation.png``: the fraction of KV groups and FFN channels each block keeps, against
        the uniform level (what ``--allocation`` did with the budget)."""
        assert isinstance(run.plan, StructPrunePlan)
        directory.mkdir(parents=True, exist_ok=True)
        _, kv, _ = _attn_shape(run.config)
        ffn = max(o for name, o, _ in self._linears if name.endswith(("up_proj", "fc1")))
        keep = 1 - run.plan.removed_params / max(1, sum(o * k for _, o, k in self._linears))
        allocation_figure(run.plan, kv, ffn, keep, self.scheme()).savefig(directory / "allocation.png", dpi=100)

    # -- plan --------------------------------------------------------------------------------
    def plan_shapes(self, plan: ShapePlan, adapter: Adapter) -> None:
        """Before the scan the allocation is unknown: every block linear is counted with
        ``1 − sparsity`` of its output rows (the budget is global and exact); they stay dense
        linears a later stage may quantise."""
        keep = 1 - self.config.sparsity
        for name, (o, k) in plan.linears.items():
            plan.linears[name] = (max(1, round(o * keep)), k)
            plan.linear_bytes[name] = int(plan.linear_bytes[name] * keep)

    def plan_memory(self, shape: MemoryShape) -> dict[str, int]:
        """The scan's Grams of the block's inputs; in the apply phase the Grams of o's and down's
        inputs and the ADMM iterates of the widest linear (float64: W, Z, U, the right-hand side
        and the Cholesky factor of its Gram)."""
        out, in_f = shape.widest_linear
        widest_in = max(shape.gram_inputs, default=in_f)
        return {"Gram matrices of one block": shape.gram_bytes,
                "ADMM workspace (float64)": (5 * out * in_f + 2 * widest_in * widest_in) * 8}

    def scheme(self) -> str:
        c = self.config
        return f"structprune {c.sparsity:.0%} {'+'.join(c.structures)} {c.allocation}" + \
            ("" if c.reconstruct == "admm" else " no-reconstruction")
