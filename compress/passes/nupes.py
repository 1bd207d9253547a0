"""NUPES: power-exponent non-uniform weight quantisation, data-free or learned, served as ``lut``.

``compress quantize MODEL --bits 3 --grid power [--learn]`` (recipe stage ``nupes``). Per selected
linear of a block:

* **data-free** (default): the exponent ``a`` minimising the weight reconstruction error
  (:func:`compress.algos.nupes.search_exponent`, PowerQuant's locally convex 1-D problem), then
  round-to-nearest on the power grid;
* ``--init gptq``: the same exponent, then GPTQ's error-feedback loop on the power grid with the
  block's input Hessians (one forward of the dense block);
* ``--learn`` (the NUPES contribution): from that start, latent weights, the exponents (and the
  group scales, ``--learn-scale``) are trained together with Adam by straight-through estimation
  to reproduce the dense block's outputs on the block's calibration inputs; a latent weight may
  move across any number of levels. Memory: one block, plus one buffer of dense outputs.

The output is a ``lut`` module per linear: packed indices, group scales and the ``2^b`` table of
its exponent (one per output channel with ``--exponent channel``). Compressed-tensors has no
non-uniform format, so this output loads with ``compress.load`` only (``inspect`` says so).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from compress.algos import nupes as algo
from compress.algos.gptq import relative_output_error
from compress.algos.quant import rtn_quantize
from compress.calib.pipeline import CalibState, LayerContext, block_output
from compress.distributed import agree, all_reduce_sum, world
from compress.errors import NumericsError
from compress.modules.lut_linear import LutLinear
from compress.passes.quantize import QuantConfig, _install_module, _QuantPass, _selected_groups, single_thread
from compress.pipeline.memory import MemoryShape
from compress.pipeline.pass_api import Needs
from compress.registry import register_pass
from compress.report import LayerRecord


class NupesConfig(QuantConfig):
    """Power-exponent (NUPES) quantisation on top of the shared quantisation options.

    Args:
        grid: ``power`` (the only grid of this pass; ``compress quantize --grid power`` selects it).
        exponent: one exponent per linear (``layer``: one table per layer) or per output channel.
        a_min / a_max: bounds of the exponent (search and learning); must contain 1 (RTN).
        init: where the codes start: ``search`` (round to nearest at the searched exponent) or
            ``gptq`` (GPTQ on the power grid, calibrated).
        learn: train latent weights, exponents (and scales) on the block's outputs.
        steps / lr / lr_exponent / lr_scale / learn_scale / learn_batch: the learner's options.
    """

    grid: Literal["power"] = Field("power", description="quantisation grid: power (NUPES' sign(w)|w|^a)")
    exponent: Literal["layer", "channel"] = Field("layer", description=(
        "one power exponent per linear (one lookup table each) or per output channel"))
    a_min: float = Field(algo.A_MIN_DEFAULT, gt=0.0, le=1.0, description="smallest exponent searched or learned")
    a_max: float = Field(algo.A_MAX_DEFAULT, ge=1.0, le=8.0, description="largest exponent searched or learned")
    init: Literal["search", "gptq"] = Field("search", description=(
        "starting codes: search (round to nearest at the searched exponent) or gptq (GPTQ on the power grid)"))
    learn: bool = Field(False, description="learn codes, exponents and scales on the block's outputs (NUPES)")
    steps: int = Field(100, ge=0, le=100000, description="Adam steps per block (--learn)")
    lr: float = Field(5e-3, gt=0.0, le=1.0, description="learning rate of the latent weights, in grid steps")
    lr_exponent: float = Field(5e-4, ge=0.0, le=1.0, description="learning rate of the exponents")
    lr_scale: float = Field(5e-3, ge=0.0, le=1.0, description="learning rate of the log group scales")
    learn_scale: bool = Field(True, description="also learn the group scales (--learn)")
    learn_batch: int = Field(2, ge=1, le=4096, description="calibration windows per learning step")
    damp: float = Field(0.01, gt=0.0, le=10.0, description="Hessian dampening for --init gptq")
    act_order: bool = Field(True, description="--init gptq: quantise columns by decreasing Hessian diagonal")

    @model_validator(mode="after")
    def _check(self) -> NupesConfig:
        if not self.symmetric:
            raise ValueError("the power grid is sign-symmetric: drop --asym (symmetric: false)")
        if not self.a_min <= 1.0 <= self.a_max:
            raise ValueError(f"exponent bounds [{self.a_min}, {self.a_max}] must contain 1 (plain RTN)")
        if not self.learn:
            learned = sorted(f for f in LEARN_OPTIONS
                             if getattr(self, f) != type(self).model_fields[f].get_default(call_default_factory=True))
            if learned:
                raise ValueError(f"{learned[0]} (--{learned[0].replace('_', '-')}) is a learning option: add --learn")
        return self

    def calibrates(self) -> bool:
        return self.learn or self.init == "gptq"

    def power_spec(self, dtype: torch.dtype) -> algo.PowerSpec:
        if self.group_size == "auto":
            raise ValueError("group_size 'auto' must be resolved against the model first")
        return algo.PowerSpec(self.bits, self.group_size, self.mse, dtype if dtype.is_floating_point
                              else torch.float32)


LEARN_OPTIONS = frozenset({"steps", "lr", "lr_exponent", "lr_scale", "learn_scale", "learn_batch"})


class _PowerTrainLinear(nn.Module):
    """A linear whose weight is the straight-through power quantisation of latent weights ``z``
    (grid units), with a learned exponent and (optionally) learned log group scales."""

    def __init__(self, start: algo.PowerQuantized, bias: Tensor | None, cfg: NupesConfig) -> None:
        super().__init__()
        spec = start.spec
        self.spec, self.a_min, self.a_max = spec, cfg.a_min, cfg.a_max
        scale = start.scale.to(torch.float32)
        self.register_buffer("scale0", scale)
        gidx = algo.group_index(start.codes.shape[1], spec, scale.device)
        self.z = nn.Parameter(start.dequantize() / scale[:, gidx])  # sits on its level: codes unchanged
        a = torch.as_tensor(start.exponent, dtype=torch.float32, device=scale.device)
        self.a = nn.Parameter(a.clone())
        self.log_scale = nn.Parameter(torch.zeros_like(scale), requires_grad=cfg.learn_scale)
        self.bias = None if bias is None else bias.detach()

    def exponent(self) -> Tensor:
        return self.a.clamp(self.a_min, self.a_max)

    def scale(self) -> Tensor:
        return self.scale0 * self.log_scale.exp()

    def forward(self, x: Tensor) -> Tensor:
        w = algo.fake_power_quant(self.z, self.scale(), self.exponent(), self.spec)
        return F.linear(x, w.to(x.dtype), self.bias)

    def frozen(self) -> algo.PowerQuantized:
        """The trained codes, scales (storage dtype) and exponent."""
        a = self.exponent().detach()
        exp: Tensor | float = a if a.dim() else float(a)
        codes = algo.learned_codes(self.z, exp, self.spec)
        return algo.PowerQuantized(codes, self.scale().detach().to(self.spec.scale_dtype), exp, self.spec)


def _average_gradients(modules: object) -> None:
    """Mean of every learner gradient over the processes of a data-parallel run (each process
    computed its own windows' step), so every process applies the same update (no-op alone)."""
    w = world()
    if w.size == 1:
        return
    for m in modules:  # type: ignore[attr-defined]
        for p in m.parameters():
            if p.grad is not None:
                all_reduce_sum(p.grad).div_(w.size)


def _rows_of(value: object, lo: int, hi: int, rows: int) -> object:
    """``value`` (a block call argument) restricted to windows ``lo:hi`` of a batch of ``rows``."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == rows and rows > 1:
        return value[lo:hi]
    if isinstance(value, tuple):
        return tuple(_rows_of(v, lo, hi, rows) for v in value)
    return value


def _call_rows(state: CalibState, layer: nn.Module, b: int, x: Tensor, lo: int, hi: int) -> Tensor:
    """The block's output for windows ``lo:hi`` of batch ``b`` (input ``x`` already sliced)."""
    rows = state.batch_size if b < len(state.kwargs) - 1 else state.hidden.shape[0] - b * state.batch_size
    kwargs = {k: _rows_of(v, lo, hi, rows) for k, v in state.kwargs[b].items()}
    args = tuple(_rows_of(v, lo, hi, rows) for v in (state.args[b] if state.args else ()))
    return block_output(layer(x, *args, **kwargs))


def _slices(state: CalibState, per_step: int) -> list[tuple[int, int, int]]:
    """Every (batch, first window, end window) chunk of ``per_step`` windows, batch by batch."""
    out = []
    n = state.hidden.shape[0]
    for b in state.batches():
        rows = min(state.batch_size, n - b * state.batch_size)
        out += [(b, lo, min(lo + per_step, rows)) for lo in range(0, rows, per_step)]
    return out


@register_pass("nupes", NupesConfig, needs_calibration=lambda cfg: cfg.calibrates(),
               summary="NUPES power-exponent non-uniform quantisation (data-free, or learned on the block)",
               examples=("compress quantize smollm2-135m --bits 3 --grid power -o out/p3",
                         "compress quantize smollm2-135m --bits 3 --grid power --init gptq --learn -o out/n3",
                         "compress nupes smollm2-135m --bits 4 --exponent channel -o out/p4c"))
class NupesPass(_QuantPass):
    """Power-grid quantisation of every selected linear (see the module docstring)."""

    config: NupesConfig
    needs_embeddings_at_finish = False
    uses_final_hidden = False

    def needs(self) -> Needs:
        return Needs(gradients=self.config.learn)

    def scheme(self) -> str:
        c = self.config
        group = {None: "per-channel", "auto": "g-auto"}.get(c.group_size, f"g{c.group_size}")
        words = [self.name, f"W{c.bits}", group, f"power a/{c.exponent}", f"init {c.init}"]
        if c.learn:
            words.append(f"learned {c.steps} steps")
        return " ".join(words + (["mse"] if c.mse else []))

    def estimate_bytes(self, out_features: int, in_features: int, rel_name: str) -> int | None:
        if not self.config.selects(rel_name):
            return None
        from compress.modules.kinds import entry_bytes
        from compress.modules.lut_linear import LutEntry

        gs = self.config.group_size if isinstance(self.config.group_size, int) else in_features
        entry = LutEntry(in_features=in_features, out_features=out_features, bits=self.config.bits,
                         group_size=min(gs, in_features), tables=self._tables())
        return entry_bytes(entry, torch.float32)

    def _tables(self) -> Literal["layer", "channel"]:
        return "channel" if self.config.exponent == "channel" else "layer"

    def plan_memory(self, shape: MemoryShape) -> dict[str, int]:
        out, in_f = shape.widest_linear
        terms = {"power-grid search workspace": 6 * out * in_f * 4}
        if self.config.calibrates():
            terms["Hessians of one block"] = shape.gram_bytes
        if self.config.learn:
            terms["dense block outputs (learning targets)"] = shape.activation_bytes
            terms["latents, Adam moments, gradients of one block"] = 6 * shape.block_bytes
            per_window = shape.activation_bytes // max(shape.windows, 1)
            terms["autograd activations of one learning step"] = 16 * per_window * self.config.learn_batch
        return terms

    # -- one block ---------------------------------------------------------------------------
    def process_layer(self, ctx: LayerContext, run: object) -> list[LayerRecord]:
        c = self.config
        groups = _selected_groups(ctx, c)
        names = [n for g in groups for n in g]
        if not names:
            return []
        t0 = time.perf_counter()
        targets = self._dense_outputs(ctx) if c.learn else None
        H = ctx.collect([g[0] for g in groups]) if c.calibrates() else {}
        H = {n: H[g[0]] for g in groups for n in g} if H else {}
        starts = {n: self._start(ctx, n, H.get(n)) for n in names}
        losses: tuple[float, float] | None = None
        if c.learn:
            losses = self._learn(ctx, starts, targets)  # type: ignore[arg-type]
        dt = (time.perf_counter() - t0) / len(names)
        return [self._install(ctx, n, starts[n], H.get(n), dt, losses) for n in names]

    def _start(self, ctx: LayerContext, name: str, H: Tensor | None) -> algo.PowerQuantized:
        """The searched exponent and the starting codes of one linear."""
        c = self.config
        W = ctx.module(name).weight.detach()
        spec = c.power_spec(W.dtype)
        a, _ = algo.search_exponent(W, spec, c.a_min, c.a_max, per_channel=c.exponent == "channel")
        if c.init == "gptq":
            assert H is not None
            with single_thread():
                q, _ = algo.gptq_power(W, H, a, spec, percdamp=c.damp, act_order=c.act_order)
            return q
        return algo.power_quantize(W, a, spec)

    def _dense_outputs(self, ctx: LayerContext) -> CalibState:
        """The dense block's outputs for every calibration window (the learning targets)."""
        assert ctx.state is not None
        targets = ctx.state.scratch()
        with torch.no_grad():
            width = None
            for b in ctx.state.batches():
                out = block_output(ctx.state.call(ctx.layer, b, ctx.state.batch(b)))
                targets.store(b, out)
                width = out.shape[-1]
        if width is not None:
            targets.set_width(width)
        return targets

    def _learn(self, ctx: LayerContext, starts: dict[str, algo.PowerQuantized],
               targets: CalibState) -> tuple[float, float]:
        """Train every selected linear of the block together on the block-output MSE; the
        trained codes replace ``starts``. Returns (mean loss of the first epoch's steps, of the last)."""
        c = self.config
        state = ctx.state
        assert state is not None
        dense = {n: ctx.module(n) for n in starts}
        train = {n: _PowerTrainLinear(q, dense[n].bias, c) for n, q in starts.items()}
        for n, m in train.items():
            ctx.replace(n, m)
        for p in ctx.layer.parameters():  # only the quantiser's parameters learn
            p.requires_grad_(False)
        groups = [{"params": [m.z for m in train.values()], "lr": c.lr},
                  {"params": [m.a for m in train.values()], "lr": c.lr_exponent}]
        if c.learn_scale:
            groups.append({"params": [m.log_scale for m in train.values()], "lr": c.lr_scale})
        for m in train.values():
            for p in (m.z, m.a) + ((m.log_scale,) if c.learn_scale else ()):
                p.requires_grad_(True)
        opt = torch.optim.Adam(groups)
        chunks = _slices(state, c.learn_batch)
        history: list[float] = []
        with torch.enable_grad():
            for step in range(c.steps):
                b, lo, hi = chunks[step % len(chunks)]
                x = state.batch(b)[lo:hi]
                y = targets.batch(b)[lo:hi]
                loss = F.mse_loss(_call_rows(state, ctx.layer, b, x, lo, hi).float(), y.float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if not agree(bool(torch.isfinite(loss))):
                    self._fail(ctx, dense, train, f"the block loss became non-finite at step {step}")
                _average_gradients(train.values())  # data-parallel: every process takes the same step
                opt.step()
                bad = [n for n, m in train.items() if not (torch.isfinite(m.z).all() and torch.isfinite(m.a).all()
                                                          and torch.isfinite(m.log_scale).all())]
                if bad:
                    self._fail(ctx, dense, train, f"{bad[0]} has NaN/Inf parameters after step {step}")
                history.append(float(loss.detach()))
        for n, m in train.items():
            starts[n] = m.frozen()
            ctx.replace(n, dense[n])
        k = min(len(history), len(chunks))
        first = sum(history[:k]) / k if k else math.nan
        last = sum(history[-k:]) / k if k else math.nan
        return first, last

    def _fail(self, ctx: LayerContext, dense: dict[str, nn.Module], train: dict[str, nn.Module], why: str) -> None:
        for n in train:
            ctx.replace(n, dense[n])
        raise NumericsError(f"NUPES learning diverged in block {ctx.index} ({ctx.prefix}): {why}",
                            "lower --lr / --lr-exponent / --lr-scale, or learn fewer --steps")

    def _install(self, ctx: LayerContext, name: str, q: algo.PowerQuantized, H: Tensor | None, dt: float,
                 losses: tuple[float, float] | None) -> LayerRecord:
        """Swap the dense linear for its ``lut`` module and record the errors beside uniform RTN's."""
        W = ctx.module(name).weight.detach()
        bias = ctx.module(name).bias
        deq = q.dequantize()
        if not torch.isfinite(deq).all():
            raise NumericsError(f"block {ctx.index} {name}: the power-quantised weight has NaN/Inf values",
                                "check the input weights (compress validate)")
        lo = algo.code_range(q.spec.bits)[0]
        module = LutLinear.from_indices((q.codes.to(torch.int64) - lo), q.table(), q.scale,
                                        q.spec.uniform().group_width(W.shape[1]), bias)
        exps = q.exponent if isinstance(q.exponent, Tensor) else None
        module.grid_info = {"grid": "power", "exponent": float(exps.mean()) if exps is not None else q.exponent}
        if exps is not None:
            module.grid_info["exponent_range"] = (float(exps.min()), float(exps.max()))
        uniform = rtn_quantize(W, q.spec.uniform()).dequantize()  # symmetric RTN at the same bits and groups
        rec = _install_module(ctx, name, module, self.name, dt, H, deq)
        rec.kind = "lut"
        energy = float((W.float() ** 2).sum().clamp_min(1e-30))
        rec.extra.update({"exponent": module.grid_info["exponent"],
                          "uniform_weight_error": float(((W.float() - uniform) ** 2).sum()) / energy})
        if exps is not None:
            rec.extra.update({"exponent_min": float(exps.min()), "exponent_max": float(exps.max())})
        if H is not None:
            rec.extra["uniform_output_error"] = relative_output_error(W.float(), uniform, H)
        if losses is not None:
            rec.extra.update({"loss_first": losses[0], "loss_last": losses[1]})
        return rec

    def write_reports(self, run: object, directory: Path) -> None:
        """``exponents.png``: the exponent of every linear across the blocks (one line per role)."""
        from matplotlib.figure import Figure

        rows = [r for r in getattr(run, "records", []) if r.stage == self.name and "exponent" in r.extra]
        if not rows:
            return
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        fig = Figure(figsize=(8, 4))
        ax = fig.add_subplot(1, 1, 1)
        role_of = {r.module: r.module.rsplit(".", 1)[-1] for r in rows}
        for role in sorted(set(role_of.values())):
            pts = sorted((r.layer, float(r.extra["exponent"])) for r in rows if role_of[r.module] == role)
            ax.plot(*zip(*pts, strict=True), marker=".", label=role)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("block")
        ax.set_ylabel("power exponent a (1 = uniform)")
        ax.set_title(self.scheme())
        ax.legend(fontsize=7, ncol=4)
        fig.tight_layout()
        fig.savefig(directory / "exponents.png", dpi=100)
