"""RTN and GPTQ weight quantisation passes (packed ``pack-quantized`` output, not fake-quant)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from compress.algos.gptq import gptq_quantize, relative_output_error
from compress.algos.quant import QuantizedWeight, QuantSpec, rtn_quantize, split_rows
from compress.calib.pipeline import LayerContext
from compress.calib.staged import run_staged, supports_staged
from compress.modules.quant_linear import QuantLinear
from compress.passes.base import Pass, PassConfig
from compress.registry import register_pass
from compress.report import LayerRecord


class QuantConfig(PassConfig):
    """Weight quantisation scheme shared by RTN and GPTQ.

    Args:
        bits: code width, one of 2, 3, 4, 8.
        group_size: input columns per scale; null (or 0/-1) for one scale per output channel.
            A last group that does not fill up is allowed (ragged).
        symmetric: symmetric grids (no zero points) or asymmetric.
        mse: shrink each grid's clipping range to minimise the L2.4 error.

    Example:
        ``{pass: rtn, config: {bits: 4, group_size: 64}}``
    """

    bits: Literal[2, 3, 4, 8] = 4
    group_size: int | None = Field(128, description="null / 0 / -1 means per channel")
    symmetric: bool = True
    mse: bool = False

    @field_validator("group_size", mode="before")
    @classmethod
    def _group(cls, v: object) -> object:
        if v in (0, -1, None):
            return None
        if isinstance(v, int) and not isinstance(v, bool) and not 8 <= v <= 65536:
            raise ValueError(f"group_size must be in [8, 65536] or null (per channel), got {v}")
        return v

    def spec(self, dtype: torch.dtype) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.symmetric, self.mse,
                         dtype if dtype.is_floating_point else torch.float32)


class GPTQConfig(QuantConfig):
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

    mse: bool = True  # GPTQ defaults to its best-measured setting (BENCHMARKS.md, issue 2)
    damp: float = Field(0.01, gt=0.0, le=10.0)
    block_size: int = Field(128, ge=1, le=8192)
    act_order: bool = True
    static_groups: bool = False
    sequential: Literal["true", "layer"] = "true"
    propagate: Literal["quantized", "dense"] = "quantized"
    hessian_dtype: Literal["float64", "float32"] = "float64"


def quant_bytes(cfg: QuantConfig, out_f: int, in_f: int, scale_bytes: int = 4) -> int:
    """Bytes of packed codes + scales (+ packed zero points) for one [out, in] linear."""
    from kernels.packing import packed_len

    groups = 1 if cfg.group_size is None else -(-in_f // cfg.group_size)
    total = out_f * packed_len(in_f, cfg.bits) * 4 + out_f * groups * scale_bytes
    if not cfg.symmetric:
        total += packed_len(out_f, cfg.bits) * groups * 4
    return total


class _QuantPass(Pass):
    config: QuantConfig
    needs_embeddings_at_finish = False
    uses_final_hidden = False

    def estimate_bytes(self, out_features: int, in_features: int, rel_name: str) -> int | None:
        return quant_bytes(self.config, out_features, in_features) if self.config.selects(rel_name) else None


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
    dense = ctx.module(name)
    W = dense.weight.detach()
    qlin = QuantLinear.from_quantized(qw, dense.bias)
    ctx.replace(name, qlin)
    nbytes = sum(b.numel() * b.element_size() for k, b in qlin.state_dict().items() if k != "bias")
    err = None if H is None else relative_output_error(W.float(), qw.dequantize(), H)
    werr = float(((W.float() - qw.dequantize()) ** 2).sum() / (W.float() ** 2).sum().clamp_min(1e-30))
    return LayerRecord(stage=stage, layer=ctx.index, module=ctx.prefix + name, kind="quant",
                       bits=8 * nbytes / W.numel(), error=err, time_s=t, bytes=nbytes,
                       params=W.numel(), extra={"weight_rel_err": werr})


@register_pass("rtn", QuantConfig, needs_calibration=False,
               summary="round-to-nearest weight quantisation (data-free)")
class RTNPass(_QuantPass):
    """Round every selected linear to the nearest grid point, group by group."""

    config: QuantConfig

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
               summary="GPTQ: Hessian-aware sequential weight quantisation")
class GPTQPass(_QuantPass):
    """GPTQ every selected linear; fused siblings share one Hessian and one call."""

    config: GPTQConfig

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
        if self.config.sequential == "layer" or self.config.propagate == "dense":
            H = ctx.collect([g[0] for g in groups], propagate=self.config.propagate == "dense")
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
        with single_thread():
            qw, stats = gptq_quantize(W, H, c.spec(W.dtype), block_size=c.block_size,
                                      percdamp=c.damp, act_order=c.act_order,
                                      static_groups=c.static_groups)
        dt = (time.perf_counter() - t0) / len(names)
        parts = split_rows(qw, [w.shape[0] for w in weights])
        records = []
        for name, part in zip(names, parts, strict=True):
            rec = _install(ctx, name, part, self.name, dt, H)
            rec.extra.update({"damp": stats.damp, "dead_inputs": stats.dead_inputs})
            records.append(rec)
        return records
