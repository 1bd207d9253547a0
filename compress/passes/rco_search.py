"""RCO's plan step: the database's costs and errors → one option per group (see :mod:`compress.passes.rco`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from compress.algos import rco
from compress.errors import CompressError
from compress.passes.rco_plan import GroupChoice, Option, RCOPlan, code_bits, fmt_range

if TYPE_CHECKING:
    from compress.passes.rco import RCOPass
    from compress.pipeline.contexts import RunContext
    from compress.pipeline.stats import BlockStats


@dataclass
class Table:
    """Every group's costs and errors: ``cost [N, K]`` integer (weight-bits or bytes; unavailable
    options at the row's dearest available cost), ``nbytes``, ``errors`` (inf: unavailable)."""

    layers: list[int]
    names: list[list[str]]
    weights: list[int]
    cost: Tensor
    nbytes: Tensor
    bits: Tensor  # code bits per weight of each option
    errors: Tensor
    available: Tensor

    @property
    def total(self) -> int:
        return sum(self.weights)


def read_table(p: RCOPass, stats: BlockStats, run: RunContext) -> Table:
    options = p.config.parsed_options()
    selected = [n for n in run.adapter.linears if p.config.selects(n)]
    by_first = {g[0]: g for g in p._groups(run.adapter, selected)}
    layers, names, weights, nbytes, errors, bits = [], [], [], [], [], []
    for i in range(stats.n_blocks):
        block = stats.block(i)
        if block is None:
            raise CompressError(f"the RCO candidate database of block {i} is missing or corrupt",
                                "run again (or with --no-cache)")
        for key in sorted(k for k in block if k.endswith(".errors")):
            first = key[: -len(".errors")]
            sizes = block[f"{first}.sizes"].tolist()
            in_f = int(block[f"{first}.in"][0])
            n = int(sum(sizes)) * in_f
            b = block[f"{first}.bytes"].cpu()
            layers.append(i)
            names.append(by_first.get(first, [first])[: len(sizes)])
            weights.append(n)
            nbytes.append(b)
            errors.append(block[key].cpu())
            bits.append(torch.tensor([code_bits(o, max(int(x), 0), n) for o, x in zip(options, b.tolist(), strict=True)],
                                     dtype=torch.float64, device="cpu"))
    if not layers:
        raise CompressError("the database holds no allocated linear", "check --target / --ignore")
    nb = torch.stack(nbytes)
    err = torch.stack(errors).to(torch.float64)
    avail = (nb >= 0) & torch.isfinite(err)
    bits_t = torch.stack(bits)
    w = torch.tensor(weights, dtype=torch.float64, device="cpu")
    if p.config.parsed_budget().unit == "bytes":
        cost = nb.clone()
    else:
        cost = (bits_t * w[:, None]).round().to(torch.int64)
    dearest = torch.where(avail, cost, torch.zeros_like(cost)).max(dim=1, keepdim=True).values
    cost = torch.where(avail, cost, dearest.expand_as(cost))
    if not bool(avail.any(dim=1).all()):
        raise CompressError("a group has no applicable option", "add a gptq option")
    return Table(layers, names, weights, cost, nb, bits_t, err, avail)


def allocate(p: RCOPass, stats: BlockStats, run: RunContext) -> RCOPlan:
    """The plan: feasibility, the search, the exact discretisation."""
    cfg = p.config
    options = cfg.parsed_options()
    budget = cfg.parsed_budget()
    tab = read_table(p, stats, run)
    total = tab.total
    inf = torch.full_like(tab.cost, 2**62)
    lo = int(torch.where(tab.available, tab.cost, inf).min(dim=1).values.sum())
    hi = int(tab.cost.max(dim=1).values.sum())
    target = int(round(budget.value * total)) if budget.unit == "bits" else int(round(budget.value))
    show = (lambda x: x / total) if budget.unit == "bits" else (lambda x: float(x))
    if not lo <= target <= hi:
        raise CompressError(f"--budget {budget.text} is outside what the options can spend "
                            f"({fmt_range(show(lo), show(hi), budget.unit)})",
                            "choose a budget inside that range, or other --options")
    final = rco.integer_units(tab.cost, target)
    scale = (8.0 if budget.unit == "bytes" else 1.0) / total  # → bits per allocated weight
    C = tab.cost.to(torch.float64) * scale
    B = target * scale
    extra: dict = {}
    if cfg.search == "greedy":
        choice = rco.greedy(torch.where(tab.available, tab.errors, torch.full_like(tab.errors, float("inf"))),
                            tab.cost.to(torch.float64), float(target))
    elif cfg.search == "uniform":
        k = next((k for k, o in enumerate(options) if o.method == "gptq" and budget.unit == "bits"
                  and o.value == budget.value), None)
        if k is None:
            raise CompressError(f"--search uniform needs a bits budget equal to one gptq option (got {budget.text})",
                                "e.g. --budget 3bits with --options gptq:2,3,4,8")
        choice = torch.full((len(tab.layers),), k, dtype=torch.int64, device="cpu")
    elif cfg.search == "sensitivity" or len(options) == 1 or target in (lo, hi):
        values = torch.where(tab.available, tab.errors, torch.full_like(tab.errors, float("inf")))
        choice, _ = rco.mckp(final.units, values, final.capacity, exact=True)
    else:
        choice, extra = _optimize(p, tab, run, stats, C, B, final)
    return _plan(p, tab, options, budget.text, budget.unit, target, choice, (show(lo), show(hi)), extra)


def _optimize(p: RCOPass, tab: Table, run: RunContext, stats: BlockStats, C: Tensor, B: float,
              final: rco.Units) -> tuple[Tensor, dict]:
    """Build the interpolated model from the database and run :func:`compress.algos.rco.optimize`."""
    from compress.passes.rco_objective import build_objective

    cfg = p.config
    options = cfg.parsed_options()
    if run.calibration is None:
        raise CompressError("RCO's objective needs calibration windows", "give --data / a calibration section")
    t0 = time.perf_counter()
    refs = torch.where(tab.available, tab.cost, torch.full_like(tab.cost, -1)).argmax(dim=1).tolist()
    full = [[run.adapter.layer_prefix(i) + n for n in names] for i, names in zip(tab.layers, tab.names, strict=True)]
    group_of = {name: k for k, names in enumerate(full) for name in names}
    cache: dict[str, list[Tensor | None]] = {}  # one block's candidates at a time

    def candidates(name: str) -> list[Tensor]:
        if name not in cache:
            layer = tab.layers[group_of[name]]
            cache.clear()
            block = stats.block(layer)
            if block is None:
                raise CompressError(f"the RCO candidate database of block {layer} is missing or corrupt",
                                    "run again (or with --no-cache)")
            for k, names in enumerate(full):
                if tab.layers[k] == layer:
                    ws = _weights(p, block, tab.names[k], options)
                    for short, fulln in zip(tab.names[k], names, strict=True):
                        cache[fulln] = ws[short]
        ws = cache[name]
        ref = next(w for w in ws if w is not None)
        return [ref if w is None else w for w in ws]  # an unavailable option: a zero delta, never chosen

    windows = run.calibration.windows[: cfg.windows]
    objective = build_objective(str(run.reader.path), full, refs, candidates, windows, objective=cfg.objective,
                                batch=cfg.batch, device=run.device,
                                delta_dtype=getattr(torch, cfg.delta_dtype))
    setup = time.perf_counter() - t0
    if cfg.init == "budget":
        per_weight = C / torch.tensor(tab.weights, dtype=torch.float64, device="cpu")[:, None] * tab.total
        alpha0 = rco.retract(rco.mask_logits(rco.budget_init(per_weight, C, B), tab.available), C, B)[0]
    elif cfg.init == "uniform":
        alpha0 = rco.retract(rco.mask_logits(torch.zeros_like(C), tab.available), C, B)[0]
    else:
        err = torch.where(tab.available, tab.errors, torch.full_like(tab.errors, float("inf")))
        alpha0 = rco.sensitivity_init(err, C, B)
    gen = torch.Generator().manual_seed(torch.initial_seed())  # the recipe's seed (the runner set it)
    t1 = time.perf_counter()
    res = rco.optimize(objective, C, B, alpha0, steps=cfg.steps, lr=cfg.lr, tau_start=cfg.tau_start,
                       tau_end=cfg.tau_end, samples=cfg.samples, resolution=cfg.resolution, final=final,
                       generator=gen, available=tab.available)
    seconds = time.perf_counter() - t1
    onehot = torch.nn.functional.one_hot(res.choice, C.shape[1]).to(torch.float64)
    final_loss = objective.evaluate(onehot)
    probs = torch.softmax(res.alpha, dim=1)
    extra = {"steps": cfg.steps, "seconds_per_step": seconds / cfg.steps, "optimize_seconds": seconds,
             "objective_setup_seconds": setup, "final_loss": final_loss,
             "history": [{"step": h.step, "loss": h.loss, "tau": h.tau, "cost_error": h.cost_error,
                          "hard_cost": h.hard_cost, "seconds": h.seconds} for h in res.history],
             "probability": probs.gather(1, res.choice[:, None])[:, 0].tolist()}
    del objective
    return res.choice, extra


def _weights(p: RCOPass, block: dict[str, Tensor], names: list[str], options: list[Option]) -> dict:
    from compress.passes.rco import candidate_weights

    in_f = int(block[f"{names[0]}.in"][0])
    return candidate_weights(block, names, options, p._gs(in_f), p.config)


def _plan(p: RCOPass, tab: Table, options: list[Option], text: str, unit: str, target: int, choice: Tensor,
          feasible: tuple[float, float], extra: dict) -> RCOPlan:
    rows = torch.arange(len(tab.layers), device="cpu")
    total = tab.total
    w = torch.tensor(tab.weights, dtype=torch.float64, device="cpu")
    spent = int(tab.cost[rows, choice].sum())
    nb = tab.nbytes[rows, choice]
    probs = extra.pop("probability", None)
    groups = [GroupChoice(layer=tab.layers[g], names=tab.names[g], weights=tab.weights[g],
                          option=options[int(choice[g])].label,
                          bits=float(tab.cost[g, choice[g]]) / tab.weights[g] * (8.0 if unit == "bytes" else 1.0),
                          bytes=int(nb[g]), error=float(tab.errors[g, choice[g]]),
                          probability=None if probs is None else float(probs[g]))
              for g in range(len(tab.layers))]
    return RCOPlan(search=p.config.search, objective=p.config.objective, budget=text, budget_unit=unit,
                   target=target / total if unit == "bits" else float(target),
                   realized_average_bits=float((tab.bits[rows, choice] * w).sum()) / total,
                   realized_stored_bits=8.0 * float(nb.sum()) / total, realized_bytes=int(nb.sum()),
                   exact=spent == target, feasible_range=list(feasible), options=[o.label for o in options],
                   groups=groups, **extra)
