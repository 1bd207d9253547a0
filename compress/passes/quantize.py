"""RTN and GPTQ weight quantisation passes (packed ``pack-quantized`` output, not fake-quant)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from compress.algos import baq as baq_algos
from compress.algos.gptq import (MixedQuantizedWeight, gptq_quantize, gptq_quantize_mixed, gptq_quantize_rows,
                                 relative_output_error)
from compress.algos.quant import QuantizedWeight, QuantSpec, rtn_quantize, split_rows
from compress.calib.pipeline import LayerContext
from compress.calib.staged import run_staged, supports_staged
from compress.modules.quant_linear import MixedQuantLinear, QuantLinear, RowMixedQuantLinear
from compress.passes import baq as baq_pass
from compress.passes.head_quant import HeadOptions, check_head, quantize_head
from compress.pipeline.memory import MemoryShape
from compress.pipeline.pass_api import Needs, Pass, PassConfig, Statistic
from compress.pipeline.stats import group_first, input_gram_statistic, input_grams
from compress.registry import register_pass
from compress.report import LayerRecord
from compress.kernels.packing import SUPPORTED_BITS


class QuantConfig(PassConfig):
    """Weight quantisation scheme shared by RTN and GPTQ.

    Args:
        bits: code width, one of 2, 3, 4, 8.
        group_size: input columns per scale; null (or 0/-1) for one scale per output channel;
            ``auto`` (the default) takes the largest of 128, 64, 32 that divides the input width
            of every quantised linear, so the output keeps the compressed-tensors layout that
            ``transformers`` loads (64 on SmolLM2, whose widths are 576 and 1536). A group size
            that leaves a ragged last group is allowed, but such an output loads with
            ``compress.load`` only (the run says so, and ``config.json`` advertises nothing).
        symmetric: symmetric grids (no zero points) or asymmetric.
        mse: shrink each grid's clipping range to minimise the L2.4 error.

    Example:
        ``{pass: rtn, config: {bits: 4, group_size: 64}}``
    """

    bits: Literal[2, 3, 4, 8] = Field(4, description="code width in bits")
    group_size: int | Literal["auto"] | None = Field(
        "auto", description="input columns per scale: a number, 0 for per channel, or auto "
                            "(the largest of 128/64/32 dividing every quantised width)")
    symmetric: bool = Field(True, description="symmetric grids; --asym stores a zero point per group")
    mse: bool = Field(False, description="shrink each grid's clipping range to minimise the weight error")

    @field_validator("group_size", mode="before")
    @classmethod
    def _group(cls, v: object) -> object:
        return parse_group_size(v)

    def resolved(self, widths: set[int]) -> QuantConfig:
        """This config with ``auto`` replaced by the group size chosen for these input widths."""
        if self.group_size != "auto":
            return self
        return self.model_copy(update={"group_size": auto_group_size(widths)})

    def spec(self, dtype: torch.dtype) -> QuantSpec:
        if self.group_size == "auto":
            raise ValueError("group_size 'auto' must be resolved against the model first")
        return QuantSpec(self.bits, self.group_size, self.symmetric, self.mse,
                         dtype if dtype.is_floating_point else torch.float32)


class RTNConfig(QuantConfig, HeadOptions):
    """RTN's scheme (:class:`QuantConfig`) and the head options (:class:`HeadOptions`)."""


AUTO_GROUP_SIZES = (128, 64, 32)


def parse_group_size(v: object) -> object:
    """A ``group_size`` value as given (number, ``"64"``, ``auto``; 0/-1/None = per channel),
    checked to lie in [8, 65536]."""
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        v = int(v)
    if v in (0, -1, None):
        return None
    if isinstance(v, int) and not isinstance(v, bool) and not 8 <= v <= 65536:
        raise ValueError("must be 0 (per channel), auto, or a number of columns in [8, 65536]")
    return v


def auto_group_size(widths: set[int]) -> int:
    """The largest of 128, 64, 32 dividing every width (128 when none does: ragged groups)."""
    for g in AUTO_GROUP_SIZES:
        if all(w % g == 0 for w in widths):
            return g
    return AUTO_GROUP_SIZES[0]


def ragged_linears(group_size: int | None, widths: dict[str, int]) -> list[str]:
    """Names whose input width leaves a ragged last group (per channel never does)."""
    if group_size is None:
        return []
    return [n for n, k in widths.items() if k > group_size and k % group_size]


class GPTQConfig(QuantConfig, HeadOptions):
    """GPTQ on top of :class:`QuantConfig`.

    Args:
        damp: dampening as a fraction of mean(diag H); raised ×10 automatically on failure.
        block_size: columns per lazy batch update.
        mse: as for RTN; on by default here (W4 g64 on SmolLM2: PPL 67.9 vs 70.6 without).
        act_order: quantise columns by decreasing Hessian diagonal (grids are static, so the
            checkpoint needs no g_idx); on by default.
        static_groups: compute every group's grid from the original weights.
        sequential: ``true`` re-runs the block after each fused group so later groups see the
            quantised earlier ones; ``layer`` feeds every Hessian from one forward.
        propagate: what the next block is calibrated on: ``quantized`` re-runs this block after
            quantising it (the GPTQ paper's choice); ``dense`` uses the outputs of the very
            forward that collected the Hessians (one forward per block instead of two; only
            with ``sequential: layer``).
        hessian_dtype: accumulator dtype of the input Gram matrices.
    """

    # GPTQ defaults to its best-measured setting (BENCHMARKS.md, issue 2)
    mse: bool = Field(True, description="shrink each grid's clipping range to minimise the weight error")
    damp: float = Field(0.01, gt=0.0, le=10.0, description="Hessian dampening, fraction of mean(diag H); "
                                                           "raised ×10 on a failed Cholesky")
    block_size: int = Field(128, ge=1, le=8192, description="columns per lazy batch update")
    act_order: bool = Field(True, description="quantise columns by decreasing Hessian diagonal (static grids, "
                                              "no g_idx)")
    static_groups: bool = Field(False, description="every group's grid from the original weights")
    sequential: Literal["true", "layer"] = Field("true", description=(
        "true: re-run the block after each fused group; layer: every Hessian from one forward"))
    propagate: Literal["quantized", "dense"] = Field("quantized", description=(
        "what calibrates the next block: this block's quantised or dense outputs"))
    hessian_dtype: Literal["float64", "float32"] = Field("float64", description="Hessian accumulator dtype")
    allocate: Literal["none", "baq"] = Field("none", description=(
        "bit allocation: none (every weight at --bits) or baq (widths per column group from GPTQ's losses)"))
    average_bits: float | None = Field(None, ge=1.0, le=8.0, description=(
        "BAQ budget in average code bits per quantised weight [default: --bits]"))
    bit_choices: list[int] = Field(default_factory=lambda: [2, 3, 4, 8], description=(
        "widths BAQ may give a column group (kernel-served: 2, 3, 4, 8)"))
    theta: float = Field(baq_algos.THETA, gt=0.5, le=4.0, description=(
        "BAQ's rate-loss exponent: loss ∝ 2^(-theta·bits) (the paper's 1.95)"))
    granularity: baq_pass.Granularity = Field("group", description=(
        "what BAQ gives one width: group (each --group-size columns), rows (each --row-block output rows) "
        "or layer (each fused linear group)"))
    row_block: int = Field(64, ge=1, le=65536, description="output rows per BAQ width under --granularity rows")
    scope: baq_pass.Scope = Field("layer", description=(
        "where BAQ's closed form balances losses: layer (each fused group averages the budget, the paper), "
        "model (raw losses across layers) or model-relative (each group's losses relative to its output energy)"))

    @field_validator("bit_choices", mode="before")
    @classmethod
    def _choices(cls, v: object) -> object:
        if isinstance(v, str):
            v = [p for p in v.replace(" ", "").split(",") if p]
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str) and "," in v[0]:
            v = [p for p in v[0].split(",") if p]
        if isinstance(v, list):
            try:
                v = sorted({int(x) for x in v})
            except (TypeError, ValueError):
                raise ValueError("give widths as integers, e.g. 2,3,4,8") from None
            bad = [b for b in v if b not in SUPPORTED_BITS]
            if bad:
                raise ValueError(f"{bad[0]} bits has no kernel; choose from {', '.join(map(str, SUPPORTED_BITS))}")
            if not v:
                raise ValueError("name at least one width")
        return v

    @model_validator(mode="after")
    def _allocation(self) -> GPTQConfig:
        if self.allocate == "none":
            # a value other than the default (a saved recipe.yaml spells every default out)
            given = sorted(f for f in BAQ_OPTIONS
                           if getattr(self, f) != type(self).model_fields[f].get_default(call_default_factory=True))
            if given:
                flag = "--" + given[0].replace("_", "-")
                raise ValueError(f"{given[0]} ({flag}) is a BAQ option: add allocate: baq (--allocate baq)")
            return self
        lo, hi = min(self.bit_choices), max(self.bit_choices)
        if not lo <= self.budget() <= hi:
            raise ValueError(f"a BAQ budget (average_bits / --average-bits, else bits) of {self.budget():g} is "
                             f"outside the bit choices {lo}..{hi}")
        return self

    def budget(self) -> float:
        """BAQ's average-bit budget (``average_bits``, else ``bits``)."""
        return float(self.bits if self.average_bits is None else self.average_bits)


BAQ_OPTIONS = frozenset({"average_bits", "bit_choices", "theta", "granularity", "row_block", "scope"})


def quant_bytes(cfg: QuantConfig, out_f: int, in_f: int, scale_dtype: torch.dtype = torch.float32) -> int:
    """Bytes one quantised ``[out, in]`` linear stores (the ``quant`` kind's own accounting)."""
    from compress.modules.kinds import entry_bytes
    from compress.modules.quant_linear import QuantEntry

    gs = auto_group_size({in_f}) if cfg.group_size == "auto" else cfg.group_size
    entry = QuantEntry(in_features=in_f, out_features=out_f, bits=cfg.bits, group_size=gs or in_f,
                       symmetric=cfg.symmetric)
    return entry_bytes(entry, scale_dtype)


class _QuantPass(Pass):
    config: QuantConfig
    needs_embeddings_at_finish = False
    uses_final_hidden = False

    def estimate_bytes(self, out_features: int, in_features: int, rel_name: str) -> int | None:
        if not self.config.selects(rel_name):
            return None
        c = self.config
        if getattr(c, "allocate", "none") != "baq":
            return quant_bytes(c, out_features, in_features)
        # BAQ: the budget's share between the 2- and 8-bit layouts (bytes are affine in the width)
        lo, hi = (quant_bytes(c.model_copy(update={"bits": b}), out_features, in_features) for b in (2, 8))
        return int(round(lo + (c.budget() - 2) / 6 * (hi - lo)))

    def resolve(self, linears: list[tuple[str, int, int]]) -> None:
        """Fix ``group_size: auto`` against the input widths of the linears this pass quantises,
        and remember which linears a ragged group leaves outside the compressed-tensors layout."""
        widths = {rel: k for rel, _, k in linears if self.config.selects(rel)}
        requested = self.config.group_size
        self.config = self.config.resolved(set(widths.values()))
        ragged = sorted({rel for rel in ragged_linears(self.config.group_size, widths)})
        self.group_note = {"requested": requested, "group_size": self.config.group_size,
                           "ragged": ragged}

    def scheme(self) -> str:
        """``gptq W4 g64 sym act-order mse``: bits, group size (``g64``, ``per-channel``, or
        ``g-auto`` before :meth:`resolve`), grid symmetry and the options that change the codes."""
        c = self.config
        group = {None: "per-channel", "auto": "g-auto"}.get(c.group_size, f"g{c.group_size}")
        return " ".join([self.name, f"W{c.bits}", group, "sym" if c.symmetric else "asym",
                         *self._flags(), *(["mse"] if c.mse else [])])

    def _flags(self) -> list[str]:
        """Pass-specific words of :meth:`scheme` (none for RTN)."""
        return []

    def begin(self, run: object) -> None:
        note = getattr(self, "group_note", None)
        if note is not None:
            run.notes["group_size"] = note  # type: ignore[attr-defined]
        check_head(run, self._head_choice())  # type: ignore[arg-type]

    def _head_choice(self) -> str | None:
        return getattr(self.config, "quantize_head", None)

    def rewrites_embeddings(self, run: object) -> bool:
        return self._head_choice() is not None and bool(getattr(run, "tied_head", False))

    def finish(self, run: object) -> None:
        choice = self._head_choice()
        if choice is None:
            return
        c = self.config
        method = "gptq" if isinstance(self, GPTQPass) else "rtn"
        record = quantize_head(run, choice, bool(getattr(c, "dense_embedding", False)),  # type: ignore[arg-type]
                               c.group_size if isinstance(c.group_size, int) else None, c.mse, method,
                               float(getattr(c, "damp", 0.01)), self.name)
        run.records.append(record)  # type: ignore[attr-defined]


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """The column loop is thousands of tiny ops; extra threads only add contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _selected_groups(ctx: LayerContext, cfg: PassConfig) -> list[list[str]]:
    groups = [[n for n in g if cfg.selects(n) and isinstance(ctx.module(n), nn.Linear)]
              for g in ctx.adapter.groups]
    return [g for g in groups if g]


def _install(ctx: LayerContext, name: str, qw: QuantizedWeight, stage: str, t: float,
             H: Tensor | None) -> LayerRecord:
    """Swap the dense linear ``name`` for a QuantLinear and describe what happened."""
    qlin = QuantLinear.from_quantized(qw, ctx.module(name).bias)
    return _install_module(ctx, name, qlin, stage, t, H, qw.dequantize())


@register_pass("rtn", RTNConfig, needs_calibration=False,
               summary="round-to-nearest weight quantisation (data-free)",
               examples=("compress rtn smollm2-135m --bits 8 -o out/w8",
                         "compress rtn smollm2-135m --bits 4 --group-size 32 --asym -o out/w4a"))
class RTNPass(_QuantPass):
    """Round every selected linear to the nearest grid point, group by group."""

    config: RTNConfig

    def process_layer(self, ctx: LayerContext, run: object) -> list[LayerRecord]:
        records = []
        for group in _selected_groups(ctx, self.config):
            for name in group:
                t0 = time.perf_counter()
                W = ctx.module(name).weight.detach()
                qw = rtn_quantize(W, self.config.spec(W.dtype))
                records.append(_install(ctx, name, qw, self.name, time.perf_counter() - t0, None))
        return records


@register_pass("gptq", GPTQConfig, needs_calibration=True,
               summary="GPTQ: Hessian-aware sequential weight quantisation",
               examples=("compress gptq smollm2-135m --bits 4 -o out/w4",
                         "compress gptq smollm2-135m --bits 3 --asym --ignore mlp.down -o out/w3",
                         "compress gptq MODEL --bits 4 --data my.txt --n-samples 64 -o OUT"))
class GPTQPass(_QuantPass):
    """GPTQ every selected linear; fused siblings share one Hessian and one call."""

    config: GPTQConfig

    @property
    def uses_final_hidden(self) -> bool:  # type: ignore[override]
        """The head's GPTQ reads the final-norm outputs of the calibration windows."""
        return self.config.quantize_head is not None

    def _flags(self) -> list[str]:
        return [w for w, on in (("act-order", self.config.act_order),
                                ("static-groups", self.config.static_groups)) if on] + self._flags_baq()

    def _flags_baq(self) -> list[str]:
        c = self.config
        if c.allocate != "baq":
            return []
        return [f"baq avg {c.budget():g} of {','.join(map(str, c.bit_choices))}"
                + ("" if c.granularity == "group" else f" per {c.granularity}")]

    def needs(self) -> Needs:
        """Under ``propagate: dense`` the Hessians are statistics of the dense model: scanned
        (and kept in the work store), and the apply phase reads nothing else. BAQ scans GPTQ's
        per-column losses (with the Hessians) and plans the widths before any block is applied."""
        dense = self.config.propagate == "dense"
        if self.config.allocate == "baq":
            return Needs(scan=True, plan=True, activations=not dense)
        return Needs(scan=True, activations=False) if dense else Needs()

    def statistic(self) -> Statistic | None:
        c = self.config
        if c.allocate == "baq":
            return Statistic("baq-losses", 4, {
                "dtype": c.hessian_dtype, "bits": c.bits, "group_size": c.group_size, "symmetric": c.symmetric,
                "mse": c.mse, "damp": c.damp, "block_size": c.block_size, "act_order": c.act_order,
                "static_groups": c.static_groups, "targets": c.targets, "ignore": c.ignore})
        return input_gram_statistic(c.hessian_dtype) if c.propagate == "dense" else None

    def scan_layer(self, ctx: LayerContext) -> dict[str, Tensor]:
        if self.config.allocate == "baq":
            return baq_pass.scan_losses(ctx, _selected_groups(ctx, self.config), self.config)
        return input_grams(ctx, self.config.hessian_dtype)

    def plan(self, stats: object, run: object) -> baq_pass.BAQPlan:
        groups_of = {}
        for g in run.adapter.groups:  # type: ignore[attr-defined]
            sel = [n for n in g if self.config.selects(n)]
            if sel:
                groups_of[sel[0]] = sel
        return baq_pass.make_plan(stats, groups_of, self.config)  # type: ignore[arg-type]

    def begin(self, run: object) -> None:
        super().begin(run)
        self._plan = getattr(run, "plan", None) if self.config.allocate == "baq" else None

    def write_reports(self, run: object, directory: object) -> None:
        plan = getattr(run, "plan", None)
        if self.config.allocate != "baq" or not isinstance(plan, baq_pass.BAQPlan):
            return
        from pathlib import Path

        out = Path(str(directory))
        out.mkdir(parents=True, exist_ok=True)
        baq_pass.bits_figure(plan, self.scheme()).savefig(out / "bits.png", dpi=100)

    def plan_memory(self, shape: MemoryShape) -> dict[str, int]:
        """The Hessians of one block, the solver's copies of the widest weight (W, its
        quantised twin, the error block, the grid) and of the widest Hessian (H and its inverse
        Cholesky factor); true-sequential stages keep a second activation buffer."""
        elem = 8 if self.config.hessian_dtype == "float64" else 4
        widest_in = max(shape.gram_inputs, default=shape.widest_linear[1])
        out, in_f = shape.widest_linear
        terms = {"Hessians of one block": shape.gram_bytes * elem // 8,
                 "GPTQ solver workspace": 8 * out * in_f * 4 + 2 * widest_in * widest_in * 8}
        if self.config.sequential == "true" and self.config.propagate == "quantized":
            terms["mid-block activations (true-sequential stages)"] = shape.activation_bytes
        return terms

    def process_layer(self, ctx: LayerContext, run: object) -> list[LayerRecord]:
        ctx.hessian_dtype = getattr(torch, self.config.hessian_dtype)
        records: list[LayerRecord] = []
        if self.config.sequential == "true" and self.config.propagate == "quantized" \
                and supports_staged(ctx):
            per_group = [[n for n in g if self.config.selects(n) and isinstance(ctx.module(n), nn.Linear)]
                         for g in ctx.adapter.groups]
            run_staged(ctx, per_group, lambda names, H: records.extend(self._group(ctx, names, H)))
            return records
        groups = _selected_groups(ctx, self.config)
        if self.config.propagate == "dense":  # Hessians from the scan
            for g in groups:
                records += self._group(ctx, g, ctx.stats[group_first(ctx.adapter, g[0])])
        elif self.config.sequential == "layer":
            H = ctx.collect([g[0] for g in groups])
            for g in groups:
                records += self._group(ctx, g, H[g[0]])
        else:
            for g in groups:
                records += self._group(ctx, g, ctx.collect([g[0]])[g[0]])
        return records

    def _group(self, ctx: LayerContext, names: list[str], H: Tensor) -> list[LayerRecord]:
        t0 = time.perf_counter()
        weights = [ctx.module(n).weight.detach() for n in names]
        W = torch.cat(weights, dim=0)  # (sum of out, in): siblings stacked by rows
        c = self.config
        unit = self._plan.unit(ctx.index, names[0]) if getattr(self, "_plan", None) is not None else None
        rows = unit is not None and unit.row_bits is not None
        widths = None if unit is None else (unit.row_widths() if rows else unit.group_bits)
        spec = c.spec(W.dtype)
        if widths is not None and len(set(widths)) == 1:  # one width: exactly GPTQ at that width
            spec, widths = QuantSpec(widths[0], spec.group_size, spec.symmetric, spec.mse, spec.scale_dtype), None
        opts = {"block_size": c.block_size, "percdamp": c.damp, "act_order": c.act_order,
                "static_groups": c.static_groups}
        with single_thread():
            if widths is None:
                qw, stats = gptq_quantize(W, H, spec, **opts)
            elif rows:
                row_parts, stats = gptq_quantize_rows(W, H, spec, widths, **opts)
            else:  # the groups were planned on the scan's act-order permutation: cut them the same way
                perm = (ctx.stats or {}).get(f"{names[0]}.perm")
                mixed, stats = gptq_quantize_mixed(W, H, spec, widths, perm=None if perm is None else perm.long(),
                                                   **opts)
        dt = (time.perf_counter() - t0) / len(names)
        sizes = [w.shape[0] for w in weights]
        records = []
        if widths is None:
            for name, part in zip(names, split_rows(qw, sizes), strict=True):
                records.append(_install(ctx, name, part, self.name, dt, H))
        elif rows:
            for name, parts in zip(names, _split_row_parts(row_parts, sizes), strict=True):
                records.append(_install_module(ctx, name, _row_module(parts, ctx.module(name).bias), self.name, dt, H))
        else:
            for name, parts in zip(names, _split_mixed(mixed, sizes), strict=True):
                module = MixedQuantLinear.from_quantized(parts, ctx.module(name).bias, mixed.perm)
                records.append(_install_module(ctx, name, module, self.name, dt, H))
        for rec in records:
            rec.extra.update({"damp": stats.damp, "dead_inputs": stats.dead_inputs})
            if unit is not None:
                rec.extra.update({"widths": unit.histogram(), "predicted_loss": unit.predicted_loss,
                                  "measured_loss": stats.loss})
        return records


def _split_mixed(mixed: MixedQuantizedWeight, sizes: list[int]) -> list[list[QuantizedWeight]]:
    """Per sibling (rows of the stacked call), its part of every width."""
    per_part = [split_rows(p, sizes) for p in mixed.parts]
    return [[pp[i] for pp in per_part] for i in range(len(sizes))]


def _split_row_parts(parts: list[tuple[Tensor, QuantizedWeight]],
                     sizes: list[int]) -> list[list[tuple[Tensor, QuantizedWeight]]]:
    """Per sibling (rows ``[o, o + size)`` of the stacked call), its rows of every width, local."""
    out, start = [], 0
    for size in sizes:
        mine = []
        for rows, qw in parts:
            keep = (rows >= start) & (rows < start + size)
            if bool(keep.any()):
                zero = None if qw.zero is None else qw.zero[keep]
                part = QuantizedWeight(qw.codes[keep], qw.scale[keep], zero, qw.spec, qw.perm)
                mine.append((rows[keep] - start, part))
        out.append(mine)
        start += size
    return out


def _row_module(parts: list[tuple[Tensor, QuantizedWeight]], bias: Tensor | None) -> nn.Module:
    """A sibling's rows: one QuantLinear when they share one width (rows already in order), else
    a RowMixedQuantLinear."""
    if len(parts) == 1:
        return QuantLinear.from_quantized(parts[0][1], bias)
    return RowMixedQuantLinear.from_quantized(parts, bias)


def _install_module(ctx: LayerContext, name: str, qlin: nn.Module, stage: str, t: float,
                    H: Tensor | None, deq: Tensor | None = None) -> LayerRecord:
    """Swap the dense linear ``name`` for a built quantised module and describe what happened
    (``deq``: its dense weight when the caller has it; otherwise the module dequantises)."""
    W = ctx.module(name).weight.detach()
    ctx.replace(name, qlin)
    nbytes = sum(b.numel() * b.element_size() for k, b in qlin.state_dict().items() if not k.endswith("bias"))
    if deq is None:
        deq = qlin.dequantized_weight(torch.float32)  # type: ignore[operator]
    err = None if H is None else relative_output_error(W.float(), deq, H)
    werr = float(((W.float() - deq) ** 2).sum() / (W.float() ** 2).sum().clamp_min(1e-30))
    return LayerRecord(stage=stage, layer=ctx.index, module=ctx.prefix + name, kind="quant",
                       bits=8 * nbytes / W.numel(), error=err, weight_error=werr, time_s=t, bytes=nbytes,
                       params=W.numel())
