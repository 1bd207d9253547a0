"""A test-only pass that writes every kind a coming pass needs, through the real pipeline:

* q/k/v of block i read one basis ``U [in, r]`` (shared group ``qkv_<i>``: ``lowrank-shared``);
* gate/up of *every* block read one orthogonal input transform ``T`` (group ``mlp_T``, added at
  block 0 and used by all later blocks: ``transformed-input`` around a ``dense`` inner linear);
* o_proj is a mixed-width ``quant`` linear (half its permuted input columns at 4 bits, half at 3).

``register()`` makes it visible (the resume subprocess imports this module to do so)."""

from __future__ import annotations

import torch
from pydantic import Field

from compress.algos.quant import QuantSpec, rtn_quantize
from compress.pipeline.pass_api import Needs, Pass, PassConfig
from compress.registry import PASSES, register_pass


class ShareConfig(PassConfig):
    rank: int = Field(8, description="rank of each block's shared q/k/v basis")


class SharePass(Pass):
    config: ShareConfig

    def needs(self) -> Needs:
        return Needs()

    def process_layer(self, ctx, run):  # noqa: ANN001, ANN201
        from torch import nn

        from compress.modules import MixedQuantLinear, SharedBasisLinear, TransformedInput

        a = ctx.adapter
        qkv = [a.role(r) for r in ("q", "k", "v")]
        w = torch.cat([ctx.module(n).weight.double() for n in qkv])  # [Σ out, in]
        basis = torch.linalg.svd(w, full_matrices=False).Vh[: self.config.rank].T.contiguous()  # [in, r]
        holder = run.add_shared(f"qkv_{ctx.index}", {"U": basis.float()})
        for n in qkv:
            lin = ctx.module(n)
            m = SharedBasisLinear(lin.in_features, lin.out_features, self.config.rank, f"qkv_{ctx.index}", holder)
            m.V.data = (lin.weight.double() @ basis).T.float().contiguous()  # [r, out]: x U V = x U Uᵀ Wᵀ
            ctx.replace(n, m)
        if "mlp_T" not in run.shared:
            width = ctx.module(a.role("gate")).in_features
            g = torch.Generator().manual_seed(5)
            t, _ = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))
            holder = run.add_shared("mlp_T", {"T": t.float()})
        t = holder.get("mlp_T", "T").double()
        for n in (a.role("gate"), a.role("up")):
            lin = ctx.module(n)
            inner = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
            inner.weight.data = (lin.weight.double() @ t).float()  # (x T)(W T)ᵀ = x Wᵀ
            if lin.bias is not None:
                inner.bias.data = lin.bias.data.clone()
            ctx.replace(n, TransformedInput(inner.requires_grad_(False), "mlp_T", holder))
        o = ctx.module(a.role("o"))
        perm = o.weight.norm(dim=0).argsort(descending=True)
        wp = o.weight.detach()[:, perm]
        half = o.in_features // 2
        parts = [rtn_quantize(wp[:, :half], QuantSpec(4, 16)), rtn_quantize(wp[:, half:], QuantSpec(3, 16))]
        ctx.replace(a.role("o"), MixedQuantLinear.from_quantized(parts, o.bias, perm))
        return []


def register() -> None:
    if "test-share" not in PASSES:
        register_pass("test-share", ShareConfig, needs_calibration=False, summary="test")(SharePass)
