"""FlatQuant pass: learned Kronecker transforms for W4A4 (and a 4-bit KV cache), block by block.

Per block (:mod:`compress.passes.flatquant_block` holds the trainable model):

1. the dense block runs every calibration batch: its outputs are the targets, and the
   per-channel absmax of each site's input gives the SmoothQuant-style initial scaling;
2. the trainable block (transforms, scalings, weight and activation clip factors) is fitted to
   those outputs with AdamW on the normalised MSE, cosine-decayed (FlatQuant's recipe); both the
   dense and the quantised block read the dense model's activations;
3. export, in float64: the scalings fold into the norms (and into up_proj's rows for
   down_proj's), ``P^(−T)`` and the learned clipping into the weights, which are quantised per
   output channel; the factors stay online in ``transformed-input`` modules that quantise the
   activations per token, and the K transform and the KV quantisers go into the attention
   (model transform ``flatquant-attention``);
4. the dense outputs (not the quantised block's) go on to the next block.

``transform`` picks the method or a baseline of the same family: ``none`` (RTN W4A4),
``hadamard`` (fixed random Hadamard rotations at the same sites, QuaRot-style), ``smooth``
(SmoothQuant scaling only), ``flatquant`` (trained). Only ``flatquant`` trains.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from compress.algos.flatquant import condition_number, smooth_scale, weight_scale
from compress.algos.gptq import gptq_quantize
from compress.algos.quant import QuantizedWeight, QuantSpec
from compress.calib.hessian import GramAccumulator
from compress.calib.pipeline import block_output
from compress.errors import CompressError, NumericsError
from compress.modules.flat_attention import KVQuantizer, apply_flat_attention
from compress.modules.kinds import model_shared
from compress.modules.quant_linear import QuantLinear
from compress.modules.transformed import TransformedInput
from compress.passes.flatquant_block import SITE_OF, BlockSpec, FlatBlock
from compress.passes.quantize import QuantConfig
from compress.pipeline.memory import MemoryShape
from compress.pipeline.pass_api import Needs, Pass
from compress.registry import register_pass
from compress.report import LayerRecord

if TYPE_CHECKING:
    from compress.arch import Adapter
    from compress.calib.pipeline import CalibState, LayerContext
    from compress.pipeline.contexts import RunContext

FLAT_ADAPTERS = ("llama",)


class FlatQuantConfig(QuantConfig):
    """FlatQuant W4A4 (weights per output channel, activations per token, optional KV cache).

    Args:
        bits: weight bits (per output channel, symmetric: ``absmax / (2^(b−1) − 1)``).
        act_bits: activation bits, 4 or 8 (per token, symmetric, dynamic).
        kv_bits: K and V cache bits (per token and head, asymmetric); 16 keeps the cache dense.
        transform: ``flatquant`` (learned), or a baseline: ``none`` (RTN), ``hadamard``, ``smooth``.
        parametrization: ``orthogonal`` (U·diag(σ)·Vᵀ, Cayley; exact inverse) or ``direct``
            (a plain matrix, float64 inverse).
        epochs / lr / batch: training per block (the reference's 15, 5e-3, 4); clip factors
            train at ``clip_lr_scale`` × lr; the rate decays by a cosine to lr·1e-3.
        alpha: exponent of the initial scaling ``w_max^(1−α) / x_max^α`` (default 0.3 for
            flatquant, FlatQuant's; 0.5 for smooth, SmoothQuant's).
        lwc / lac: learnable weight / activation (and KV) clipping.
        weights: ``rtn`` (the reference's default) or ``gptq`` on the transformed, clipped weights
            with Hessians of the linears' quantised, transformed calibration inputs.
        learn_scale: train the per-channel scaling (else it keeps its initial value).
        amp: train under bfloat16 autocast (the reference's mixed precision).
    """

    group_size: int | Literal["auto"] | None = Field(None, description="per output channel only (0)")
    act_bits: Literal[4, 8] = Field(4, description="activation bits (per token): 4 or 8")
    kv_bits: Literal[2, 3, 4, 8, 16] = Field(16, description="KV cache bits (per token and head); 16: dense")
    transform: Literal["none", "hadamard", "smooth", "flatquant"] = Field(
        "flatquant", description="learned FlatQuant transforms, or a baseline: none|hadamard|smooth")
    parametrization: Literal["orthogonal", "direct"] = Field(
        "orthogonal", description="transform factors: orthogonal·diag·orthogonal, or direct with an fp64 inverse")
    epochs: int = Field(15, ge=0, le=1000, description="training epochs per block")
    lr: float = Field(5e-3, gt=0, le=1.0, description="learning rate of the transforms")
    clip_lr_scale: float = Field(10.0, gt=0, le=1000, description="clip factors' learning rate / lr")
    batch: int = Field(4, ge=1, le=1024, description="calibration windows per training step")
    alpha: float | None = Field(None, ge=0.0, le=1.0, description="scaling exponent (default 0.3; 0.5 for smooth)")
    lwc: bool = Field(True, description="learnable weight clipping")
    lac: bool = Field(True, description="learnable activation and KV clipping")
    learn_scale: bool = Field(True, description="train the per-channel scaling")
    amp: bool = Field(True, description="train under bfloat16 autocast")
    weights: Literal["rtn", "gptq"] = Field("rtn", description="weight quantiser after the transform: rtn|gptq")
    damp: float = Field(0.01, gt=0.0, le=1.0, description="GPTQ damping, fraction of mean diag(H)")

    @model_validator(mode="after")
    def _per_channel(self) -> FlatQuantConfig:
        if self.group_size is not None:
            raise ValueError("flatquant quantises weights per output channel (group_size 0): "
                             "the int8 product takes one scale per row")
        if not self.symmetric:
            raise ValueError("flatquant's weight quantiser is symmetric (the int8 product has no zero point)")
        if self.mse:
            raise ValueError("flatquant learns its weight clipping (lwc); the MSE grid search does not apply")
        if self.bits > 8:
            raise ValueError("weight bits above 8 do not fit the int8 product")
        return self

    def trains(self) -> bool:
        return self.transform == "flatquant" and self.epochs > 0

    def scaling_alpha(self) -> float:
        return self.alpha if self.alpha is not None else (0.5 if self.transform == "smooth" else 0.3)


@register_pass("flatquant", FlatQuantConfig, needs_calibration=True, cli_name="flatquant",
               summary="FlatQuant: learned Kronecker transforms, W4A4 with an optional 4-bit KV cache",
               examples=("compress quantize smollm2-135m --bits 4 --act-bits 4 --kv-bits 4 --transform flatquant "
                         "-o out/w4a4",
                         "compress flatquant smollm2-135m --transform hadamard --kv-bits 4 -o out/quarot"))
class FlatQuantPass(Pass):
    """Train, fold and quantise every block; see the module docstring."""

    config: FlatQuantConfig
    uses_final_hidden = False

    def needs(self) -> Needs:
        return Needs(gradients=True)

    def check_input(self, adapter: Adapter, manifest: dict) -> None:
        if not adapter.causal:
            what = "KV-cache quantisation" if self.config.kv_bits < 16 else "flatquant"
            raise CompressError(f"{adapter.name} is an encoder: {what} applies to decoders with a KV cache",
                                "use compress quantize --method gptq on encoders")
        if adapter.name not in FLAT_ADAPTERS:
            raise CompressError(f"flatquant supports llama-family decoders (llama, mistral, qwen2, qwen3), "
                                f"not {adapter.name}", "use compress quantize --method gptq for this model")
        if manifest.get("modules") or manifest.get("transforms"):
            raise CompressError("flatquant needs a dense checkpoint (this one is already compressed)",
                                "run flatquant first, on the dense model")

    def scheme(self) -> str:
        c = self.config
        kv = f"KV{c.kv_bits}" if c.kv_bits < 16 else ""
        return f"{c.transform} W{c.bits}A{c.act_bits}{kv}"

    def describe(self) -> str:
        c = self.config
        train = f", {c.epochs} epochs at lr {c.lr:g}" if c.trains() else ""
        return f"flatquant: {self.scheme()} ({c.transform} transforms{train}, {c.weights} weights)"

    def estimate_bytes(self, out_features: int, in_features: int, rel_name: str) -> int | None:
        if not self.config.selects(rel_name):
            return None
        return out_features * math.ceil(in_features * self.config.bits / 32) * 4 + out_features * 4

    def plan_memory(self, shape: MemoryShape) -> dict[str, int]:
        c = self.config
        per_window = shape.activation_bytes // max(shape.windows, 1)
        per_token = per_window // max(shape.seq_len, 1)
        # one step keeps, per token, what backward reads of every transform, quantiser (its masks and
        # scales), bf16 autocast copy, attention and linear of the block: about 48 hidden-wide and 24
        # intermediate-wide fp32 vectors (fitted to SmolLM2's measured peak, 1.47 GiB at brown-512-c32)
        graph = per_token // max(shape.elem, 1) * 4 * shape.seq_len * min(c.batch, shape.batch_size)
        terms = {"dense block outputs (training targets)": shape.activation_bytes,
                 "transformed weights, grads and Adam state of one block": 6 * shape.block_bytes}
        if c.trains():
            widths = int(48 + 24 * shape.intermediate / max(shape.hidden, 1))
            terms["autograd graph of one training step"] = graph * widths
        if c.weights == "gptq":
            terms["Hessians of one block"] = shape.gram_bytes
        return terms

    def begin(self, run: RunContext) -> None:
        c = self.config
        if c.targets or c.ignore:
            raise CompressError("flatquant transforms every linear of every block; --target/--ignore do not apply",
                                "drop --target and --ignore")
        self._seed = torch.initial_seed()  # the recipe's seed (set by the runner just before)
        self._losses: list[tuple[int, float, float]] = []
        self._noted_dense = False
        if c.kv_bits < 16:
            layers = run.model.get_submodule(run.adapter.layers)
            hd = int(layers[0].get_submodule(run.adapter.role("attn")).head_dim)
            run.transforms.append({"kind": "flatquant-attention", "head_dim": hd, "k_bits": c.kv_bits,
                                   "v_bits": c.kv_bits, "k_transform": c.transform not in ("none", "smooth")})

    def carry_state(self) -> dict[str, object]:
        return {"losses": [list(x) for x in self._losses], "noted_dense": self._noted_dense}

    def restore_carry(self, state: dict[str, object]) -> None:
        self._losses = [(int(i), float(b), float(a)) for i, b, a in state.get("losses", [])]  # type: ignore[union-attr]
        self._noted_dense = bool(state.get("noted_dense", False))

    # -- one block ---------------------------------------------------------------------------------
    def process_layer(self, ctx: LayerContext, run: RunContext) -> list[LayerRecord]:
        c, st, layer = self.config, ctx.state, ctx.layer
        assert st is not None
        t0 = time.perf_counter()
        dtype = next(layer.parameters()).dtype
        layer.float()
        for p in layer.parameters():
            p.requires_grad_(False)
        targets = st.scratch()
        absmax = _dense_outputs(ctx, st, targets, need_stats=c.transform in ("smooth", "flatquant"))
        smooth = None
        if c.transform in ("smooth", "flatquant"):
            smooth = _initial_scaling(layer, absmax, c.scaling_alpha())
        spec = BlockSpec(self._mode(), c.bits, c.act_bits, c.kv_bits, c.kv_bits, c.lwc and c.trains(),
                         c.lac and c.trains(), c.learn_scale and c.trains())
        gen = torch.Generator().manual_seed((self._seed + 7919 * (ctx.index + 1)) % 2**63)  # per block: resumable
        with torch.device("cpu"):  # built on the host (its generator's device), then moved
            block = FlatBlock(layer, spec, gen, None if smooth is None else {k: v.cpu() for k, v in smooth.items()})
        block = block.to(st.device or st.hidden.device)
        self._note_dense(block, run)
        before = _block_loss(block, st, targets, c.batch)
        t_train = time.perf_counter()
        if c.trains():
            _train(block, st, targets, c, ctx.index)
        t_train = time.perf_counter() - t_train
        after = _block_loss(block, st, targets, c.batch) if c.trains() else before
        self._losses.append((ctx.index, before, after))
        hessians = _hessians(block, st, targets, c.batch) if c.weights == "gptq" else None
        records = _export(block, ctx, run, c, dtype, hessians)
        st.hidden, targets.hidden = targets.hidden, st.hidden  # the dense outputs go on (FlatQuant's rule)
        ctx.propagated = True
        layer.to(dtype)
        total = time.perf_counter() - t0
        for r in records:
            r.time_s = total / len(records)
            r.extra.update(block_mse_before=before, block_mse_after=after, train_s=round(t_train, 3))
        return records

    def _mode(self) -> str:
        c = self.config
        if c.transform == "flatquant" and c.parametrization == "direct":
            return "flatquant-direct"
        return c.transform

    def _note_dense(self, block: FlatBlock, run: RunContext) -> None:
        """Say once (the output's notes, printed after the run) where a width had no Kronecker form."""
        dense = sorted({f"{name} ({site.n})" for name, site in block.sites.items() if site.dense_fallback})
        if dense and not self._noted_dense:
            self._noted_dense = True
            run.notes["flatquant"] = {"dense_sites": dense}

    def write_reports(self, run: RunContext, directory: Path) -> None:
        if not getattr(self, "_losses", None):
            return
        from matplotlib.figure import Figure

        directory.mkdir(parents=True, exist_ok=True)
        fig = Figure(figsize=(6, 3.5))
        ax = fig.add_subplot(1, 1, 1)
        idx = [i for i, _, _ in self._losses]
        ax.plot(idx, [b for _, b, _ in self._losses], marker="o", ms=3, label="before training")
        if self.config.trains():
            ax.plot(idx, [a for _, _, a in self._losses], marker="o", ms=3, label="after training")
        ax.set_yscale("log")
        ax.set_xlabel("block")
        ax.set_ylabel("MSE of the block output")
        ax.set_title(f"{self.scheme()} on {run.reader.path.name}", fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(directory / "flatquant_loss.png", dpi=100)


# -- calibration data ------------------------------------------------------------------------------
def _sub_batches(st: CalibState, targets: CalibState, size: int):
    """``(x, target, kwargs)`` chunks of at most ``size`` windows (each calibration batch split)."""
    for b in st.batches():
        x, y = st.batch(b), targets.batch(b)
        n = x.shape[0]
        for lo in range(0, n, size):
            hi = min(n, lo + size)
            yield x[lo:hi], y[lo:hi], _slice(st.kwargs[b], lo, hi, n)


def _slice(v: object, lo: int, hi: int, n: int) -> object:
    """``v`` (block kwargs) with every tensor whose first dim is the batch cut to ``[lo, hi)``."""
    if isinstance(v, Tensor):
        return v[lo:hi] if n > 1 and v.dim() and v.shape[0] == n else v
    if isinstance(v, tuple):
        return tuple(_slice(t, lo, hi, n) for t in v)
    if isinstance(v, dict):
        return {k: _slice(t, lo, hi, n) for k, t in v.items()}
    return v


@torch.no_grad()
def _dense_outputs(ctx: LayerContext, st: CalibState, targets: CalibState, need_stats: bool) -> dict[str, Tensor]:
    """Run the dense block on every batch into ``targets``; per-channel absmax of the inputs of
    q_proj (``ln``), gate_proj (``ug``) and down_proj (``down``)."""
    absmax: dict[str, Tensor] = {}

    def hook(site: str):
        def fn(_m: nn.Module, args: tuple) -> None:
            a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            absmax[site] = a if site not in absmax else torch.maximum(absmax[site], a)
        return fn

    handles = []
    if need_stats:
        for rel, site in (("self_attn.q_proj", "ln"), ("mlp.gate_proj", "ug"), ("mlp.down_proj", "down")):
            handles.append(ctx.module(rel).register_forward_pre_hook(hook(site)))
    try:
        for b in st.batches():
            targets.store(b, block_output(st.call(ctx.layer, b, st.batch(b))))
    finally:
        for h in handles:
            h.remove()
    return absmax


def _initial_scaling(layer: nn.Module, absmax: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """SmoothQuant-style ``d`` per site from the weights' and the inputs' per-channel absmax."""
    def wmax(*names: str) -> Tensor:
        return torch.cat([layer.get_submodule(n).weight.detach().float() for n in names], 0).abs().amax(0)

    return {"ln": smooth_scale(wmax("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                               absmax["ln"].clamp(min=1e-5), alpha),
            "ug": smooth_scale(wmax("mlp.gate_proj", "mlp.up_proj"), absmax["ug"].clamp(min=1e-5), alpha),
            "down": smooth_scale(wmax("mlp.down_proj"), absmax["down"].clamp(min=1e-5), alpha)}


# -- training --------------------------------------------------------------------------------------
@torch.no_grad()
def _block_loss(block: FlatBlock, st: CalibState, targets: CalibState, size: int) -> float:
    """Mean squared error of the quantised block's outputs against the dense ones."""
    total, n = 0.0, 0
    for x, y, kw in _sub_batches(st, targets, size):
        total += float(((block(x.float(), **kw) - y.float()) ** 2).sum())
        n += y.numel()
    return total / max(n, 1)


def _train(block: FlatBlock, st: CalibState, targets: CalibState, c: FlatQuantConfig, index: int) -> None:
    """AdamW on ``MSE / MSE.detach()`` with a cosine decay to lr·1e-3, ``c.epochs`` epochs."""
    opt = torch.optim.AdamW(block.trainable(c.lr, c.lr * c.clip_lr_scale))
    steps = c.epochs * sum(1 for _ in _sub_batches(st, targets, c.batch))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=c.lr * 1e-3)
    device = st.device or st.hidden.device
    for epoch in range(c.epochs):
        for x, y, kw in _sub_batches(st, targets, c.batch):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=c.amp):
                out = block(x.float(), **kw)
                loss = nn.functional.mse_loss(out.float(), y.float())
            if not bool(torch.isfinite(loss.detach())):
                raise NumericsError(f"flatquant training diverged in block {index} (epoch {epoch + 1}: loss "
                                    f"{float(loss.detach())})", "lower --lr, or train without --amp")
            opt.zero_grad(set_to_none=True)
            (loss / loss.detach()).backward()
            opt.step()
            sched.step()


# -- export ----------------------------------------------------------------------------------------
@torch.no_grad()
def _hessians(block: FlatBlock, st: CalibState, targets: CalibState, size: int) -> dict[str, Tensor]:
    """Mean ``XᵀX`` (float64) of every linear's quantised, transformed calibration input."""
    block.grams = {n: GramAccumulator(block.layer.get_submodule(n).in_features) for n in SITE_OF}
    try:
        for x, _, kw in _sub_batches(st, targets, size):
            block(x.float(), **kw)
        return {n: g.mean() for n, g in block.grams.items()}
    finally:
        block.grams = None


@torch.no_grad()
def _export(block: FlatBlock, ctx: LayerContext, run: RunContext, c: FlatQuantConfig,
            dtype: torch.dtype, hessians: dict[str, Tensor] | None = None) -> list[LayerRecord]:
    """Fold and quantise in float64; install the transformed-input linears and the attention."""
    block = block.double()
    block.work_dtype = torch.float64
    layer, i, s = ctx.layer, ctx.index, block.sites
    for norm, site in ((layer.input_layernorm, "ln"), (layer.post_attention_layernorm, "ug")):
        if s[site].d is not None:
            norm.weight.copy_((norm.weight.double() * s[site].d).to(norm.weight.dtype))
    groups = {site: _add_group(run, f"l{i}_{site}", s[site].pair()) for site in ("ln", "ug", "down")}
    groups["o"] = _add_group(run, f"l{i}_o", (s["o"].pair()[0], None))
    records = []
    for name, site in SITE_OF.items():
        w, b = block.weight(name)
        if name == "mlp.up_proj" and s["down"].d is not None:  # down's scaling into up's rows
            d = s["down"].d
            w, b = w * d.unsqueeze(1), None if b is None else b * d
        H = None if hessians is None else hessians[name]
        inner, werr = _quantized(w, b, c.bits) if H is None else _gptq(w, b, H, c)
        form, group = groups[site]
        clip = block.act_clip(name)
        mult = (1.0, 1.0) if clip is None else (float(clip[0]), float(clip[1]))
        ctx.replace(name, TransformedInput(inner, group, model_shared(run.model), form, c.act_bits, mult))
        records.append(_record(ctx, name, inner, werr, block, site, mult))
    if c.kv_bits < 16:
        _install_kv(block, layer)
    return records


def _add_group(run: RunContext, group: str, pair: tuple[Tensor | None, Tensor | None]) -> tuple[str, str | None]:
    """Store a site's factors once as shared group ``group``: ``(form, group)``."""
    left, right = pair
    if left is None:
        return "identity", None
    tensors = {"left": left.float().contiguous()}
    if right is not None:
        tensors["right"] = right.float().contiguous()
    run.add_shared(group, tensors)
    return ("kron" if right is not None else "kron-left"), group


def _quantized(w: Tensor, b: Tensor | None, bits: int) -> tuple[QuantLinear, float]:
    """Per-row symmetric RTN of the float64 ``w`` (scales rounded to fp32 first); its relative error."""
    scale = weight_scale(w, bits).float()  # [out, 1]
    codes = torch.clamp(torch.round(w / scale.double()), -(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    qw = QuantizedWeight(codes.to(torch.int8), scale, None, QuantSpec(bits, None, True, False, torch.float32))
    deq = codes * scale.double()
    err = float(((w - deq) ** 2).sum() / (w ** 2).sum().clamp_min(1e-300))
    return QuantLinear.from_quantized(qw, None if b is None else b.float()), err


def _gptq(w: Tensor, b: Tensor | None, H: Tensor, c: FlatQuantConfig) -> tuple[QuantLinear, float]:
    """GPTQ of the transformed weight (per channel, symmetric, fp32 scales); its relative error."""
    qw, _ = gptq_quantize(w.float(), H, QuantSpec(c.bits, None, True, False, torch.float32), percdamp=c.damp)
    deq = qw.dequantize(torch.float64)
    err = float(((w - deq) ** 2).sum() / (w ** 2).sum().clamp_min(1e-300))
    return QuantLinear.from_quantized(qw, None if b is None else b.float()), err


def _record(ctx: LayerContext, name: str, inner: QuantLinear, werr: float, block: FlatBlock, site: str,
            mult: tuple[float, float]) -> LayerRecord:
    nbytes = sum(t.numel() * t.element_size() for t in inner.state_dict().values())
    params = inner.in_features * inner.out_features
    conds = [condition_number(f.matrix()) for f in block.sites[site].factors]
    extra: dict[str, float | int | str] = {"act_clip_max": round(mult[0], 5), "act_clip_min": round(mult[1], 5),
                                           "transform_cond": round(math.prod(conds), 4) if conds else 1.0}
    if block.w_clip is not None:
        theta = block.w_clip[name.replace(".", "_")]
        extra["w_clip_mean"] = round(float(torch.sigmoid(theta).mean()), 5)
    return LayerRecord(stage="flatquant", layer=ctx.index, module=ctx.prefix + name, kind="transformed-input",
                       bits=8 * nbytes / params, weight_error=werr, bytes=nbytes, params=params, extra=extra)


def _install_kv(block: FlatBlock, layer: nn.Module) -> None:
    kv = block.kv
    attn = layer.self_attn
    q = KVQuantizer(int(attn.head_dim), kv.k_bits, kv.v_bits, kv.site is not None and bool(kv.site.factors),
                    device=layer.input_layernorm.weight.device)
    if q.k_transform is not None:
        p = kv.site.factors[0]
        q.k_transform.copy_(p.matrix().float())
        q.k_transform_inv_t.copy_(p.inverse_t().float())
    for name in ("k_clip", "v_clip"):
        theta = getattr(kv, name)
        if theta is not None:
            getattr(q, name).copy_(torch.sigmoid(theta).float())
    apply_flat_attention(attn, q)
