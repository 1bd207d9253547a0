"""RCO (``compress allocate``): spend one exact budget — average bits or bytes — over every
allocated linear group, choosing per group among candidate representations (GPTQ widths,
low-rank ratios) by Riemannian constrained optimisation of the whole model's KL to the dense model.

Phases (:mod:`compress.pipeline.pass_api`):

* **scan** — the candidate database, one dense block at a time: each fused group's input Gram,
  then every option from that same Gram: GPTQ codes/scales at each width, whitened low-rank
  factors at each ratio, with each option's relative output error and stored bytes. Kept in the
  work store under the input checkpoint, the calibration and every option that changes it, so a
  second run at another budget (or another search) reads it and computes no Hessian.
* **plan** — the costs ``C[i, k]`` (bits budget: code bits × weights, as BAQ counts them; bytes
  budget: stored bytes), checked against the budget's feasible range; then ``search: rco``
  (:func:`compress.algos.rco.optimize` on the interpolated model of
  :mod:`compress.passes.rco_objective`), ``greedy`` (error-per-cost upgrades) or ``sensitivity``
  (the MCKP over the database's errors). The final DP hits the budget exactly when some
  assignment does, else the nearest feasible capacity (``exact: false`` in the plan).
* **apply** — each group gets its chosen database entry (no solve): ``quant`` modules of one width
  per linear (a compressed-tensors export groups them per width), or ``lowrank`` factors.

Where this differs from the reference code (IST-DASLab/RCO): the database's Hessians are the
dense model's (the reference calibrates on a 4-bit model); options may mix methods; the
final DP works on exact integer costs; fused siblings share one group by default (vLLM needs
q/k/v and gate/up at one width).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from compress.algos import svd
from compress.algos.gptq import gptq_quantize, relative_output_error
from compress.algos.quant import QuantizedWeight, QuantSpec, split_rows
from compress.errors import CompressError
from compress.modules.lowrank import LowRankLinear
from compress.modules.quant_linear import QuantLinear
from compress.passes.quantize import _install_module, auto_group_size, parse_group_size, single_thread
from compress.passes.rco_plan import (
    Budget, GroupChoice, Option, RCOPlan, assignment_figure, code_bits, fmt_range, option_bytes, parse_budget,
    parse_options)
from compress.pipeline.pass_api import Needs, Pass, PassConfig, Statistic
from compress.pipeline.stats import group_first, input_grams
from compress.registry import register_pass
from compress.report import LayerRecord

if TYPE_CHECKING:
    from compress.arch import Adapter
    from compress.calib.pipeline import LayerContext
    from compress.pipeline.contexts import RunContext
    from compress.pipeline.memory import MemoryShape
    from compress.pipeline.stats import BlockStats

DB_VERSION = 1


class RCOConfig(PassConfig):
    """Exact-budget allocation over candidate representations (RCO, arXiv 2605.00649).

    Example:
        ``{pass: rco, config: {budget: 3.0bits, options: ["gptq:2,3,4,8"]}}``
    """

    budget: str = Field("3.0bits", description=(
        "what to spend: average code bits per allocated weight (3.0bits) or bytes of the allocated linears (40MB)"))
    options: list[str] = Field(default_factory=lambda: ["gptq:2,3,4,8"], description=(
        "candidates per group: gptq:W1,W2,... (code widths) and lowrank:R1,... (parameter ratios)"))
    search: Literal["rco", "greedy", "sensitivity", "uniform"] = Field("rco", description=(
        "rco: Riemannian optimisation of the whole-model loss; greedy: error-per-cost upgrades; "
        "sensitivity: the exact knapsack over the database's per-layer errors; uniform: every group at "
        "the gptq width equal to a bits budget (the baseline, from the same database)"))
    objective: Literal["kl", "ce"] = Field("kl", description="loss of the interpolated model: KL to the dense model or CE")
    steps: int = Field(100, ge=1, le=100000, description="optimisation steps")
    lr: float = Field(0.1, gt=0.0, le=100.0, description="Adam learning rate on the logits")
    samples: int = Field(1, ge=1, le=64, description="Gumbel samples per step (gradients averaged)")
    batch: int = Field(1, ge=1, le=1024, description="calibration windows per sample")
    windows: int = Field(16, ge=1, le=100000, description=(
        "calibration windows the objective cycles over (the dense log-probs of each are cached)"))
    tau_start: float = Field(1.0, gt=0.0, le=100.0, description="Gumbel temperature at the first step")
    tau_end: float = Field(0.01, gt=0.0, le=100.0, description="Gumbel temperature at the last step")
    init: Literal["budget", "sensitivity", "uniform"] = Field("budget", description=(
        "starting logits: budget (every group peaked at the widths nearest the average), sensitivity "
        "(-log normalised error per group, the reference's) or uniform (alpha = -beta * cost)"))
    resolution: int = Field(500, ge=10, le=100000, description="DP units per budget unit in each step's hard sample")
    tie: Literal["fused", "none"] = Field("fused", description=(
        "fused: q/k/v and gate/up share one option (what vLLM needs); none: every linear alone"))
    group_size: int | Literal["auto"] | None = Field("auto", description=(
        "GPTQ input columns per scale: a number, 0 for per channel, or auto (largest of 128/64/32 dividing every width)"))
    symmetric: bool = Field(True, description="symmetric GPTQ grids; --asym stores a zero point per group")
    mse: bool = Field(True, description="shrink each grid's clipping range to minimise the weight error")
    act_order: bool = Field(True, description="GPTQ columns by decreasing Hessian diagonal (static grids)")
    damp: float = Field(0.01, gt=0.0, le=10.0, description="Hessian dampening (GPTQ and whitening), fraction of mean diag")
    block_size: int = Field(128, ge=1, le=8192, description="GPTQ columns per lazy batch update")
    hessian_dtype: Literal["float64", "float32"] = Field("float64", description="Gram accumulator dtype")
    delta_dtype: Literal["bfloat16", "float32"] = Field("bfloat16", description=(
        "dtype of the option deltas of the interpolated model"))

    @field_validator("group_size", mode="before")
    @classmethod
    def _group(cls, v: object) -> object:
        return parse_group_size(v)

    @field_validator("budget")
    @classmethod
    def _budget(cls, v: str) -> str:
        parse_budget(v)
        return v

    @field_validator("options", mode="before")
    @classmethod
    def _options(cls, v: object) -> object:
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list):
            parse_options([str(x) for x in v])
        return v

    @model_validator(mode="after")
    def _temps(self) -> RCOConfig:
        if self.tau_end > self.tau_start:
            raise ValueError("tau_end must not exceed tau_start (the temperature decays)")
        return self

    def parsed_options(self) -> list[Option]:
        return parse_options(self.options)

    def parsed_budget(self) -> Budget:
        return parse_budget(self.budget)


@register_pass("rco", RCOConfig, needs_calibration=True, cli_name="allocate",
               summary="RCO: exact-budget allocation of bits (and ranks) across layers on the whole-model KL",
               examples=("compress allocate smollm2-135m --budget 3.0bits --options gptq:2,3,4,8 -o out/rco3",
                         "compress allocate smollm2-135m --budget 40MB --options gptq:2,3,4,8 "
                         "--options lowrank:0.3,0.5 -o out/mixed",
                         "compress allocate smollm2-135m --budget 2.5bits --search greedy -o out/greedy"))
class RCOPass(Pass):
    """Scan the candidate database, allocate the budget, install the chosen candidates."""

    config: RCOConfig
    needs_embeddings_at_finish = False
    uses_final_hidden = False

    def needs(self) -> Needs:
        return Needs(scan=True, plan=True, activations=False)

    def statistic(self) -> Statistic:
        c = self.config
        return Statistic("rco-candidates", DB_VERSION, {
            "options": [o.label for o in c.parsed_options()], "group_size": c.group_size, "symmetric": c.symmetric,
            "mse": c.mse, "act_order": c.act_order, "damp": c.damp, "block_size": c.block_size,
            "hessian_dtype": c.hessian_dtype, "tie": c.tie, "targets": c.targets, "ignore": c.ignore})

    def check_input(self, adapter: Adapter, manifest: dict) -> None:
        if not adapter.causal:
            raise CompressError(f"{adapter.name} is an encoder: RCO's objective is the KL of a language model's "
                                "next-token distribution", "use compress quantize --allocate baq on encoders")
        if manifest.get("modules") or manifest.get("transforms"):
            raise CompressError("allocate needs a dense checkpoint (this one is already compressed)",
                                "allocate first, then apply other passes")

    # -- shapes, before any work -----------------------------------------------------------------
    def resolve(self, linears: list[tuple[str, int, int]]) -> None:
        """Fix ``group_size: auto``, and refuse a budget outside the feasible range before any
        calibration (costs are additive per linear, so the range follows from the shapes)."""
        widths = {k for rel, _, k in linears if self.config.selects(rel)}
        if not widths:
            raise CompressError("no linear is selected for allocation", "check --target / --ignore")
        if self.config.group_size == "auto":
            self.config = self.config.model_copy(update={"group_size": auto_group_size(widths)})
        lo = hi = 0.0
        weights = 0
        for rel, o, k in linears:
            if not self.config.selects(rel):
                continue
            costs = [self._cost(opt, o, k) for opt in self.config.parsed_options()]
            costs = [c for c in costs if c is not None]
            if not costs:
                raise CompressError(f"no option applies to {rel} [{o}×{k}] (every rank would be dearer than dense)",
                                    "add a gptq option, or a smaller lowrank ratio")
            lo, hi, weights = lo + min(costs), hi + max(costs), weights + o * k
        self._check_budget(lo, hi, weights)

    def _cost(self, opt: Option, o: int, k: int, dtype: torch.dtype = torch.float32) -> float | None:
        """Integer cost of one linear under ``opt``: weight-bits (bits budget) or bytes."""
        nbytes = option_bytes(opt, o, k, self._gs(k), self.config.symmetric, dtype)
        if nbytes is None:
            return None
        if self.config.parsed_budget().unit == "bytes":
            return float(nbytes)
        return code_bits(opt, nbytes, o * k) * o * k

    def _gs(self, in_f: int) -> int | None:
        gs = self.config.group_size
        return None if gs is None else min(int(gs), in_f)  # type: ignore[arg-type]

    def _check_budget(self, lo: float, hi: float, weights: int) -> float:
        b = self.config.parsed_budget()
        target = b.value * weights if b.unit == "bits" else b.value
        unit = b.unit
        show = (lambda x: x / weights) if unit == "bits" else (lambda x: x)
        if not lo - 1e-9 <= target <= hi + 1e-9:
            raise CompressError(f"--budget {b.text} is outside what the options can spend "
                                f"({fmt_range(show(lo), show(hi), unit)})",
                                "choose a budget inside that range, or other --options")
        return target

    def scheme(self) -> str:
        c = self.config
        return f"rco {c.search} {c.budget} of {'+'.join(c.options)}"

    def plan_memory(self, shape: MemoryShape) -> dict[str, int]:
        out_f, in_f = shape.widest_linear
        k = len(self.config.parsed_options())
        return {"Hessians of one block": shape.gram_bytes,
                "candidate weights of the widest group": (k + 2) * out_f * in_f * 4}

    # -- scan: the candidate database ------------------------------------------------------------
    def _groups(self, adapter: Adapter, names: list[str]) -> list[list[str]]:
        if self.config.tie == "none":
            return [[n] for n in names]
        out, seen = [], set()
        for g in adapter.groups:
            sel = [n for n in g if n in names]
            if sel:
                out.append(sel)
                seen.update(sel)
        return out + [[n] for n in names if n not in seen]

    def _block_groups(self, ctx: LayerContext) -> list[list[str]]:
        names = [n for n in ctx.adapter.linears if self.config.selects(n)
                 and isinstance(_try_module(ctx, n), nn.Linear)]
        return self._groups(ctx.adapter, names)

    def scan_layer(self, ctx: LayerContext) -> dict[str, Tensor]:
        grams = input_grams(ctx, self.config.hessian_dtype)
        out: dict[str, Tensor] = dict(grams)
        for names in self._block_groups(ctx):
            H = grams[group_first(ctx.adapter, names[0])]
            out.update(self._candidates(ctx, names, H))
        return out

    def _candidates(self, ctx: LayerContext, names: list[str], H: Tensor) -> dict[str, Tensor]:
        c = self.config
        first = names[0]
        weights = [ctx.module(n).weight.detach() for n in names]
        W = torch.cat(weights, dim=0)  # (Σ out, in): siblings stacked by rows
        errors, nbytes, seconds = [], [], []
        out: dict[str, Tensor] = {}
        white = None
        for opt in c.parsed_options():
            t0 = time.perf_counter()
            if opt.method == "gptq":
                spec = QuantSpec(int(opt.value), self._gs(W.shape[1]), c.symmetric, c.mse, W.dtype)
                with single_thread():
                    qw, _ = gptq_quantize(W, H, spec, block_size=c.block_size, percdamp=c.damp,
                                          act_order=c.act_order)
                out[f"{first}.{opt.label}.codes"] = qw.codes
                out[f"{first}.{opt.label}.scale"] = qw.scale
                if qw.zero is not None:
                    out[f"{first}.{opt.label}.zero"] = qw.zero
                if qw.perm is not None:
                    out[f"{first}.{opt.label}.perm"] = qw.perm.to(torch.int64)
                errors.append(relative_output_error(W.float(), qw.dequantize(torch.float32), H))
                nbytes.append(sum(option_bytes(opt, w.shape[0], w.shape[1], self._gs(w.shape[1]), c.symmetric,
                                               W.dtype) or 0 for w in weights))
            else:
                ranks = [svd.rank_for_ratio(w.shape[1], w.shape[0], opt.value) for w in weights]
                if any(r is None for r in ranks):
                    errors.append(float("inf"))
                    nbytes.append(-1)
                    seconds.append(time.perf_counter() - t0)
                    continue
                white = white or svd.whitening(H, c.damp)
                parts = []
                for n, w, r in zip(names, weights, ranks, strict=True):
                    fac = svd.factors(svd.spectrum(w, white), int(r))  # type: ignore[arg-type]
                    out[f"{n}.{opt.label}.U"] = fac.U.to(w.dtype).contiguous()
                    out[f"{n}.{opt.label}.V"] = fac.V.to(w.dtype).contiguous()
                    parts.append((fac.U.to(w.dtype) @ fac.V.to(w.dtype)).T)
                errors.append(relative_output_error(W.float(), torch.cat(parts).float(), H))
                nbytes.append(sum(option_bytes(opt, w.shape[0], w.shape[1], None, True, W.dtype) or 0
                                  for w in weights))
            seconds.append(time.perf_counter() - t0)
        dev = W.device
        out[f"{first}.errors"] = torch.tensor(errors, dtype=torch.float64, device=dev)
        out[f"{first}.bytes"] = torch.tensor(nbytes, dtype=torch.int64, device=dev)
        out[f"{first}.seconds"] = torch.tensor(seconds, dtype=torch.float64, device=dev)
        out[f"{first}.sizes"] = torch.tensor([w.shape[0] for w in weights], dtype=torch.int64, device=dev)
        out[f"{first}.in"] = torch.tensor([W.shape[1]], dtype=torch.int64, device=dev)
        return out

    # -- plan ------------------------------------------------------------------------------------
    def plan(self, stats: BlockStats, run: RunContext) -> RCOPlan:
        from compress.passes.rco_search import allocate

        return allocate(self, stats, run)

    # -- apply -----------------------------------------------------------------------------------
    def begin(self, run: RunContext) -> None:
        plan = run.plan
        assert isinstance(plan, RCOPlan)
        self._choice = {(g.layer, g.names[0]): g for g in plan.groups}

    def process_layer(self, ctx: LayerContext, run: RunContext) -> list[LayerRecord]:
        records = []
        db = ctx.stats or {}
        for names in self._block_groups(ctx):
            t0 = time.perf_counter()
            choice = self._choice[(ctx.index, names[0])]
            opt = next(o for o in self.config.parsed_options() if o.label == choice.option)
            H = db[group_first(ctx.adapter, names[0])]
            dense = [ctx.module(n) for n in names]
            modules = self._build(db, names, opt, dense)
            dt = (time.perf_counter() - t0) / len(names)
            for name, d, m in zip(names, dense, modules, strict=True):
                records.append(_install(ctx, name, d, m, H, opt, dt, choice))
        return records

    def _build(self, db: dict[str, Tensor], names: list[str], opt: Option, dense: list[nn.Module]) -> list[nn.Module]:
        first = names[0]
        if opt.method == "lowrank":
            return [LowRankLinear.from_factors(db[f"{n}.{opt.label}.U"], db[f"{n}.{opt.label}.V"], d.bias,
                                               d.weight.dtype) for n, d in zip(names, dense, strict=True)]
        qw = stored_quantized(db, first, opt, self._gs(int(db[f"{first}.in"][0])), self.config)
        sizes = [int(s) for s in db[f"{first}.sizes"].tolist()]
        return [QuantLinear.from_quantized(part, d.bias) for part, d in zip(split_rows(qw, sizes), dense, strict=True)]

    def write_reports(self, run: RunContext, directory: Path) -> None:
        plan = run.plan
        if not isinstance(plan, RCOPlan):
            return
        directory.mkdir(parents=True, exist_ok=True)
        (directory.parent / "assignment.json").write_text(json.dumps(plan.model_dump(mode="json"), indent=1))
        assignment_figure(plan, f"{self.scheme()} on {run.reader.path.name}").savefig(directory / "assignment.png",
                                                                                     dpi=100)


def stored_quantized(db: dict[str, Tensor], first: str, opt: Option, group_size: int | None,
                     config: RCOConfig) -> QuantizedWeight:
    """The database's GPTQ solution of a stacked group at one width."""
    key = f"{first}.{opt.label}"
    codes = db[f"{key}.codes"]
    spec = QuantSpec(int(opt.value), group_size, config.symmetric, config.mse, db[f"{key}.scale"].dtype)
    perm = db.get(f"{key}.perm")
    return QuantizedWeight(codes, db[f"{key}.scale"], db.get(f"{key}.zero"), spec,
                           None if perm is None else perm.long())


def candidate_weights(db: dict[str, Tensor], names: list[str], options: list[Option], group_size: int | None,
                      config: RCOConfig) -> dict[str, list[Tensor | None]]:
    """Per sibling of a group, its dense ``[out, in]`` weight under every option (None where the
    option does not apply)."""
    first = names[0]
    sizes = [int(s) for s in db[f"{first}.sizes"].tolist()]
    out: dict[str, list[Tensor | None]] = {n: [] for n in names}
    for opt in options:
        if opt.method == "gptq":
            parts = split_rows(stored_quantized(db, first, opt, group_size, config), sizes)
            for n, part in zip(names, parts, strict=True):
                out[n].append(part.dequantize(torch.float32))
        else:
            for n in names:
                U, V = db.get(f"{n}.{opt.label}.U"), db.get(f"{n}.{opt.label}.V")
                out[n].append(None if U is None or V is None else (U.float() @ V.float()).T.contiguous())
    return out


def _try_module(ctx: LayerContext, rel: str) -> nn.Module | None:
    try:
        return ctx.module(rel)
    except AttributeError:
        return None


def _install(ctx: LayerContext, name: str, dense: nn.Module, module: nn.Module, H: Tensor, opt: Option,
             dt: float, choice: GroupChoice) -> LayerRecord:
    """Swap ``dense`` for the chosen module; quant modules get the GPTQ pass's own record."""
    extra: dict[str, float | int | str] = {"option": opt.label, "group_error": choice.error}
    if choice.probability is not None:
        extra["probability"] = choice.probability
    if not isinstance(module, LowRankLinear):
        rec = _install_module(ctx, name, module, "rco", dt, H)
        rec.extra.update(extra)
        return rec
    W = dense.weight.detach()
    ctx.replace(name, module)
    deq = (module.U.float() @ module.V.float()).T
    nbytes = sum(b.numel() * b.element_size() for k, b in module.state_dict().items() if not k.endswith("bias"))
    werr = float(((W.float() - deq) ** 2).sum() / (W.float() ** 2).sum().clamp_min(1e-30))
    return LayerRecord(stage="rco", layer=ctx.index, module=ctx.prefix + name, kind="lowrank",
                       bits=8 * nbytes / W.numel(), error=relative_output_error(W.float(), deq, H),
                       weight_error=werr, time_s=dt, bytes=nbytes, params=W.numel(), extra=extra)
