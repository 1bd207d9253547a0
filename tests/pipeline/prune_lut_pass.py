"""A test-only pass that writes the ``pruned`` and ``lut`` kinds through the real pipeline:

* block 1 loses MLP channels 64..95 (rows of gate/up, columns of down) and its second KV group
  (k/v rows 16..31, the query heads 2 and 3 that read it: q rows 32..63, o columns 32..63);
* down_proj of every other block becomes a 4-bit lookup-table linear on a non-uniform
  (power 1.5) codebook with one scale per 32 input columns.

:func:`apply_reference` makes the same model in memory the obvious way (zeroed channels, decoded
LUT weights), for the tests to compare the reloaded checkpoint against."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from compress.pipeline.pass_api import Needs, Pass, PassConfig
from compress.registry import PASSES, register_pass

PRUNED_BLOCK, KEEP_CHANNELS, HEAD_DIM, GROUP = 1, 64, 16, 32


def codebook() -> torch.Tensor:
    t = torch.linspace(-1, 1, 16, dtype=torch.float64)
    return (t.sign() * t.abs() ** 1.5).float()  # denser near 0, like a bell-shaped weight


def lut_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-codebook indices of ``w / scale`` and the per-group absmax scales."""
    out_f, in_f = w.shape
    scale = w.abs().view(out_f, in_f // GROUP, GROUP).amax(-1).clamp_min(1e-8)  # [out, groups]
    x = w / scale.repeat_interleave(GROUP, dim=1)
    idx = (x.unsqueeze(-1) - codebook()).abs().argmin(-1)  # [out, in]
    return idx, scale


def keep_sets() -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Block-relative linear → (kept output rows, kept input columns)."""
    ch, q, kv = torch.arange(KEEP_CHANNELS), torch.arange(2 * HEAD_DIM), torch.arange(HEAD_DIM)
    return {"mlp.gate_proj": (ch, None), "mlp.up_proj": (ch, None), "mlp.down_proj": (None, ch),
            "self_attn.q_proj": (q, None), "self_attn.k_proj": (kv, None), "self_attn.v_proj": (kv, None),
            "self_attn.o_proj": (None, q)}


class PruneLutConfig(PassConfig):
    codebook_bits: int = Field(4, description="index width of the lookup-table linears")


class PruneLutPass(Pass):
    config: PruneLutConfig

    def needs(self) -> Needs:
        return Needs()

    def process_layer(self, ctx, run):  # noqa: ANN001, ANN201
        from compress.modules import LutLinear, PrunedLinear

        if ctx.index == PRUNED_BLOCK:
            for rel, (rows, cols) in keep_sets().items():
                ctx.replace(rel, PrunedLinear.from_dense(ctx.module(rel), rows, cols))
            return []
        down = ctx.module("mlp.down_proj")
        idx, scale = lut_codes(down.weight.detach())
        ctx.replace("mlp.down_proj", LutLinear.from_indices(idx, codebook(), scale, GROUP, down.bias))
        return []


def apply_reference(model: nn.Module) -> None:
    """The same model, built the obvious way: pruned channels zeroed, LUT weights decoded."""
    for i, layer in enumerate(model.model.layers):
        if i == PRUNED_BLOCK:
            for rel, (rows, cols) in keep_sets().items():
                w = layer.get_submodule(rel).weight.data  # [out, in]
                if rows is not None:
                    w[~torch.isin(torch.arange(w.shape[0]), rows)] = 0
                if cols is not None:
                    w[:, ~torch.isin(torch.arange(w.shape[1]), cols)] = 0
            continue
        down = layer.mlp.down_proj
        idx, scale = lut_codes(down.weight.data)
        down.weight.data = (codebook()[idx] * scale.repeat_interleave(GROUP, dim=1)).to(down.weight.dtype)


def register() -> None:
    if "test-prune-lut" not in PASSES:
        register_pass("test-prune-lut", PruneLutConfig, needs_calibration=False, summary="test")(PruneLutPass)
