"""True-sequential calibration of a pre-norm residual block without recomputation.

For blocks of the form ``h = x + attn(norm1(x)); y = h + mlp(norm2(h))`` (the LLaMA family),
GPTQ's true-sequential order — q/k/v, then o, then gate/up, then down, each group calibrated on
activations produced by the already-quantised groups before it — needs the block's activations
four times. The generic path re-runs the whole block for each group. Here each stage runs only
the part of the block it needs and keeps the attention output (later the mid-block residual) in
one extra ``[windows, seq, dim]`` buffer:

1. Gram of ``norm1(x)``                          → quantise q/k/v
2. attention with quantised q/k/v, stop at o's input (kept in the buffer) → quantise o
3. ``h = x + o(buffer)`` written back into the buffer, Gram of ``norm2(h)`` → quantise gate/up
4. ``mlp(norm2(h))`` up to down's input                          → quantise down
5. ``y = h + mlp(norm2(h))`` written over ``x``: the next block's input

The numbers are those of the generic path (same operations, same order); the work is one
attention pass and two MLP passes instead of roughly four block forwards.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from compress.calib.hessian import GramAccumulator
from compress.calib.pipeline import LayerContext, _StopForward, block_output
from compress.modules.protocol import calibration_mode, supports_staged_calibration

Quantize = Callable[[list[str], Tensor], None]


def supports_staged(ctx: LayerContext) -> bool:
    """The adapter describes a pre-norm residual block with attention + MLP sub-modules, and
    the block is the plain one (a SliceGPT block carries residual shortcuts the stages omit)."""
    a = ctx.adapter
    if not supports_staged_calibration(ctx.layer):  # e.g. a sliced block (residual shortcuts)
        return False
    return (a.pre_norm and a.causal and len(a.groups) == 4 and not a.branch_norms
            and {"attn", "mlp", "o", "down"} <= set(a.roles) and ctx.state is not None)


def run_staged(ctx: LayerContext, groups: list[list[str]], quantize: Quantize) -> None:
    """Calibrate and quantise the four fused groups of one block in true-sequential order.

    ``groups`` holds the *selected* linears of each of the adapter's four groups (a group may
    be empty when the recipe targets only part of the block); ``quantize(names, H)`` swaps them.
    """
    a, st = ctx.adapter, ctx.state
    assert st is not None
    norm1, norm2 = ctx.module(a.attn_norm), ctx.module(a.mlp_norm)
    attn, mlp = ctx.module(a.role("attn")), ctx.module(a.role("mlp"))
    o_proj = lambda: ctx.module(a.role("o"))  # noqa: E731  (re-fetched: quantising swaps the module)
    down = lambda: ctx.module(a.role("down"))  # noqa: E731
    buf = st.scratch()  # (windows, seq, ·): o's input, then the mid residual
    dt = ctx.hessian_dtype

    with torch.no_grad():
        acc = GramAccumulator(st.hidden.shape[-1], dt)
        for b in st.batches():
            acc.add(norm1(st.batch(b)))
        _maybe(quantize, groups[0], acc)

        with calibration_mode(attn):
            acc = GramAccumulator(o_proj().in_features, dt)
            for b in st.batches():
                _run_until(o_proj(), lambda x, b=b: (acc.add(x), buf.store(b, x)),
                           lambda b=b: attn(hidden_states=norm1(st.batch(b)), **_attn_kwargs(st.kwargs[b])))
            buf.set_width(o_proj().in_features)
        _maybe(quantize, groups[1], acc)

        with calibration_mode(attn):
            acc = GramAccumulator(st.hidden.shape[-1], dt)
            for b in st.batches():
                h = st.batch(b) + o_proj()(buf.batch(b))
                buf.store(b, h)
                acc.add(norm2(h))
            buf.set_width(st.width or st.hidden.shape[-1])
        _maybe(quantize, groups[2], acc)

        with calibration_mode(mlp):
            acc = GramAccumulator(down().in_features, dt)
            for b in st.batches():
                _run_until(down(), acc.add, lambda b=b: mlp(norm2(buf.batch(b))))
        _maybe(quantize, groups[3], acc)

        with calibration_mode(mlp):
            for b in st.batches():
                h = buf.batch(b)
                st.store(b, h + block_output(mlp(norm2(h))))
    ctx.propagated = True


def _attn_kwargs(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k != "use_cache"}


def _maybe(quantize: Quantize, names: list[str], acc: GramAccumulator) -> None:
    if names:
        quantize(names, acc.mean())


def _run_until(module: nn.Module, seen: Callable[[Tensor], object], call: Callable[[], object]) -> None:
    """Call ``call()`` and stop it as soon as ``module`` receives its input (given to ``seen``)."""

    def hook(_m: nn.Module, args: tuple) -> None:
        seen(args[0])
        raise _StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        call()
    except _StopForward:
        pass
    finally:
        handle.remove()
