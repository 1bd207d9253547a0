"""SliceGPT pass: rotate the residual stream into its principal directions and slice it.

Computational invariance: once every RMSNorm scale γ is folded into the linears that read the
norm, the blocks are invariant to an orthogonal change of basis ``Q`` of the residual stream
(RMS normalisation commutes with ``Q``). Each residual *point* — the embedding output, the
mid-block residual (after attention) and the block output — gets the basis of its calibration
activations' principal directions; keeping the first ``d`` of them slices the point.

The pass runs inside the layer-streaming pipeline and owns the propagation of activations:

* ``begin``: PCA of the embedding outputs; the embedding table is rotated (and, unless a tied
  head needs it whole, sliced) and the activations are moved into that basis;
* per block (one partial and one full forward): fold γ, rotate/slice q/k/v by the input basis;
  run attention with the residual mapped back to the original basis and take the PCA of the
  mid-block residual; rotate/slice ``o``, gate/up; run the block again (now with the mid
  slicing in place, so the PCA sees that error) and take the PCA of its outputs; rotate/slice
  ``down``; shortcuts ``AᵀB`` carry the residual between consecutive bases;
* ``finish``: the final norm's γ and the last basis go into the head. A tied head stays tied:
  the full rotated table serves both, and the final norm maps the last residual basis into the
  table's basis with one ``[d_head, d_last]`` matrix.

Points that keep their full width are left in the original basis (no PCA, no shortcut) unless
``rotate_unsliced`` asks otherwise, so 0 % slicing returns the dense function and parameter
count. The manifest records every width; :func:`compress.modules.sliced.apply_slicing`
rebuilds the structure at load time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from compress.algos.slicegpt import (
    PCA, basis_of, head_map, pca, read_side, rms_norm_at_width, rotate_rows, shortcut_weight, sliced_width,
    unit_rows, write_side)
from compress.calib.hessian import GramAccumulator
from compress.calib.pipeline import CalibState, block_output
from compress.errors import CompressError
from compress.model import get_module, set_module
from compress.modules.sliced import (
    ProjectedRMSNorm, SlicedEmbedding, block_linears, block_paths, make_sliced_block, norm_eps, set_linear,
    set_norm, set_shortcut)
from compress.pipeline.pass_api import Pass, PassConfig, read_data_file
from compress.pipeline.memory import MemoryShape
from compress.pipeline.shapes import ShapePlan
from compress.registry import register_pass
from compress.report import LayerRecord

if TYPE_CHECKING:
    from compress.arch import Adapter
    from compress.calib.pipeline import LayerContext
    from compress.pipeline.contexts import RunContext

Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


class SliceConfig(PassConfig):
    """SliceGPT slicing of the residual stream.

    Args:
        sparsity: fraction of the residual width removed at every point, in [0, 1).
        schedule: per-block fractions (block i's mid-block and output points; block 0's also
            sets the embedding), inline or the path of a JSON/YAML file holding the list. It
            replaces ``sparsity``.
        embedding_sparsity: fraction sliced at the embedding point (block 0's input). By default
            0 when the head is tied (the table is stored whole anyway, so keeping the point whole
            costs only block 0's q/k/v width and saves the head map; SmolLM2 20 %: PPL 135.8 vs
            136.7 with fewer parameters), else block 0's fraction.
        round_to: sliced widths are rounded down to a multiple of this.
        slice_head: also slice the last block's output (and, for a tied head, the stored
            embedding table) instead of keeping them at full width.
        damp: damping of each PCA, as a fraction of the mean diagonal of the second moment.
        rotate_unsliced: rotate points that keep their full width too (function preserving;
            adds shortcuts; for invariance checks).

    Example:
        ``{pass: slicegpt, config: {sparsity: 0.25}}``
    """

    sparsity: float = Field(0.25, ge=0.0, lt=1.0, description="fraction of the residual width removed, in [0, 1)")
    schedule: list[Fraction] | str | None = Field(
        None, description="per-block fractions, or a JSON/YAML file of them (replaces sparsity)")
    embedding_sparsity: float | None = Field(
        None, ge=0.0, lt=1.0, description="fraction sliced at the embedding point (default: 0 if the head is tied, else block 0's)")
    round_to: int = Field(8, ge=1, le=4096, description="round sliced widths down to a multiple of this")
    slice_head: bool = Field(False, description="slice the last block's output and a tied table too")
    damp: float = Field(0.01, gt=0.0, le=1.0, description="PCA damping, fraction of mean diagonal")
    rotate_unsliced: bool = Field(False, description="rotate full-width points too (invariance checks)")
    token_weighting: bool = Field(False, description="PCA of per-token normalised activations")
    compensate_norms: bool = Field(True, description="norms add back the mean sliced-off energy")

    @field_validator("schedule", mode="before")
    @classmethod
    def _load_schedule(cls, v: object) -> object:
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str) and not _is_number(v[0]):
            v = v[0]
        return load_schedule(v) if isinstance(v, (str, Path)) else v

    @model_validator(mode="after")
    def _consistent(self) -> SliceConfig:
        if self.targets or self.ignore:
            raise ValueError("slicegpt rotates every linear of every block; targets/ignore cannot select a subset")
        if self.schedule is not None and "sparsity" in self.model_fields_set:
            raise ValueError("set either sparsity or schedule, not both")
        return self

    def fractions(self, n_layers: int) -> list[float]:
        """The fraction of every block (a CompressError if the schedule does not fit)."""
        if self.schedule is None:
            return [self.sparsity] * n_layers
        sched = list(self.schedule)  # a str was turned into a list by the validator
        if len(sched) != n_layers:
            raise CompressError(f"the slicing schedule has {len(sched)} fractions but the model has "
                                f"{n_layers} blocks", f"give exactly {n_layers} fractions, one per block")
        return [float(s) for s in sched]


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def load_schedule(path: str | Path) -> list[float]:
    """Per-block fractions from a JSON or YAML file holding a list (ValueError if malformed)."""
    data = read_data_file(path, "schedule")
    p = Path(path)
    if not isinstance(data, list) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in data):
        raise ValueError(f"schedule file {p} must hold a list of fractions, one per block")
    return [float(x) for x in data]


class _Moments(GramAccumulator):
    """Second moment of residual activations, optionally of each token's unit direction
    (``x/‖x‖·√D``), so tokens with massive norms do not dominate the PCA."""

    def __init__(self, dim: int, per_token: bool) -> None:
        super().__init__(dim)
        self.per_token = per_token

    def add(self, x: Tensor) -> None:
        super().add(unit_rows(x) if self.per_token else x)


@dataclass
class _Point:
    """A residual point: its basis (``[D, d]`` float64, None = identity at full width)."""

    basis: Tensor | None
    width: int
    kept: float = 1.0
    dropped: float = 0.0  # mean energy per token of the sliced-off directions


@register_pass("slicegpt", SliceConfig, needs_calibration=True, cli_name="slice",
               summary="SliceGPT: rotate the residual stream by PCA and slice it",
               examples=("compress slice smollm2-135m --sparsity 0.25 -o out/s25",
                         "compress slice smollm2-135m --schedule schedule.yaml -o out/s"))
class SliceGPTPass(Pass):
    """Rotate-and-slice every block; see the module docstring."""

    config: SliceConfig
    needs_embeddings_at_finish = False  # the table is final after begin; finish needs its basis only
    uses_final_hidden = False

    # -- begin: checks, widths, embeddings -------------------------------------------------
    def begin(self, run: RunContext) -> None:
        self._check(run)
        st = run.state
        assert st is not None
        a = run.adapter
        layers = get_module(run.model, a.layers)
        self._full = int(st.hidden.shape[-1])
        self._eps = norm_eps(layers[0].get_submodule(a.attn_norm))
        self._tied = _tied(run)
        self._plan_widths(len(layers))
        t0 = time.perf_counter()
        emb = get_module(run.model, a.token_embedding)
        d0 = self._emb_width
        acc = self._gram(st) if self._rotates(d0) else None
        p = None if acc is None else pca(acc.mean(), self.config.damp)
        stored = self._full if (self._tied and not self.config.slice_head) else d0
        self._head_basis = None if p is None else basis_of(p, stored)
        E = emb.weight.detach()
        table = E if self._head_basis is None else rotate_rows(E, self._head_basis)
        new = SlicedEmbedding(emb.num_embeddings, stored, d0, emb.padding_idx, device="meta", dtype=E.dtype)
        new.weight = nn.Parameter(table, requires_grad=False)
        set_module(run.model, a.token_embedding, new)
        self._stored = stored
        self._current = self._point_of(p, d0)
        _project(st, self._current.basis)
        self._spec: dict = {"kind": "slicegpt", "version": 1, "hidden_size": self._full,
                            "rms_norm_eps": self._eps, "tied_head": self._tied,
                            "embedding": {"width": d0, "stored": stored}, "layers": []}
        run.records.append(LayerRecord(
            stage=self.name, layer=-1, module=a.token_embedding, kind="sliced", error=1 - self._current.kept,
            time_s=time.perf_counter() - t0, bytes=table.numel() * table.element_size(), params=table.numel(),
            extra={"width": d0, "stored_width": stored, "explained_variance": self._current.kept}))

    def check_input(self, adapter: Adapter, manifest: dict) -> None:
        """A pre-norm RMSNorm decoder with a final norm and a head, not sliced yet, with no
        compressed module (a rotation cannot pass through codes or factors)."""
        a = adapter
        if not a.pre_norm:
            raise CompressError(f"{a.name} blocks are post-norm (the norm follows the residual add), so "
                                "rotating the residual stream would change the function",
                                "slicegpt needs a pre-norm decoder (llama, mistral, qwen2)")
        if a.branch_norms:
            raise CompressError(f"{a.name} blocks normalise each branch's output before the residual add, so "
                                "rotating the residual stream would change the function",
                                "slicegpt needs x + f(norm(x)) blocks (llama, mistral, qwen2, qwen3, phi3)")
        if a.norm_kind != "rms" or a.final_norm is None or a.head is None:
            raise CompressError(f"slicegpt supports RMSNorm decoders with a final norm and a head; "
                                f"{a.name} is not one", "use a llama-family checkpoint")
        if any(t.get("kind") == "slicegpt" for t in manifest.get("transforms", [])):
            raise CompressError("this checkpoint is already sliced", "slice the original checkpoint instead")
        modules = manifest.get("modules", {})
        if modules:
            kinds = sorted({str(e.get("kind")) for e in modules.values()})
            raise CompressError(f"the checkpoint has compressed modules ({', '.join(kinds)}) that cannot be rotated",
                                "run slicegpt before quantisation or factorisation stages")

    def _check(self, run: RunContext) -> None:
        self.check_input(run.adapter, {"transforms": run.transforms, "modules": run.modules})
        if run.state is None:
            raise CompressError("slicegpt needs calibration data", "give a calibration protocol")

    def _plan_widths(self, n_layers: int) -> None:
        """Width of the embedding point and of every block's mid and output points."""
        D, c = self._full, self.config
        fr = c.fractions(n_layers)
        w = [sliced_width(D, f, c.round_to) for f in fr]
        emb = c.embedding_sparsity
        if emb is None:  # a tied table is stored whole anyway: keeping the point whole is nearly free
            emb = 0.0 if self._tied else fr[0]
        self._emb_width = sliced_width(D, emb, c.round_to)
        self._widths = [(w[i], w[i] if (i < n_layers - 1 or c.slice_head) else D) for i in range(n_layers)]

    def _moments(self) -> _Moments:
        return _Moments(self._full, self.config.token_weighting)

    def _gram(self, st: CalibState) -> _Moments:
        acc = self._moments()
        for b in st.batches():
            acc.add(st.batch(b))
        return acc

    def _rotates(self, width: int) -> bool:
        return width < self._full or self.config.rotate_unsliced

    def _point(self, acc: _Moments | None, width: int) -> _Point:
        if acc is None:
            return _Point(None, width)
        return self._point_of(pca(acc.mean(), self.config.damp), width)

    def _point_of(self, p: PCA | None, width: int) -> _Point:
        if p is None:
            return _Point(None, width)
        dropped = p.dropped(width) if self.config.compensate_norms else 0.0
        return _Point(basis_of(p, width), width, p.kept(width), dropped)

    def plan_memory(self, shape: MemoryShape) -> dict[str, int]:
        """The residual's second moments and their eigendecomposition (float64, ``D × D``: sum,
        mean, eigenvectors, the projected copy) and the rotated weights and shortcuts of a block."""
        d = shape.hidden
        return {"residual covariance + PCA (float64)": 5 * d * d * 8,
                "rotated weights + shortcuts": shape.block_bytes + 2 * d * d * shape.elem}

    # -- blocks ----------------------------------------------------------------------------
    def process_layer(self, ctx: LayerContext, run: RunContext) -> list[LayerRecord]:
        layer, a, st = ctx.layer, ctx.adapter, ctx.state
        assert st is not None
        lin = block_linears(a)
        for rel in (n for group in lin.values() for n in group):
            if type(ctx.module(rel)) is not nn.Linear:
                raise CompressError(f"{ctx.prefix}{rel} is a {type(ctx.module(rel)).__name__}, not a dense linear",
                                    "run slicegpt before other compression stages")
        d_mid, d_out = self._widths[ctx.index]
        p_in = self._current
        t0 = time.perf_counter()
        mid, attn_params = self._attention_half(ctx, lin, p_in, d_mid)
        t1 = time.perf_counter()
        out, mlp_params = self._mlp_half(ctx, lin, mid, d_out, last=ctx.index == len(self._widths) - 1)
        t2 = time.perf_counter()
        ctx.propagated = True  # the activations were moved into the output basis above
        self._current = out
        self._spec["layers"].append({"in": p_in.width, "mid": mid.width, "out": out.width,
                                     "eps_in": self._eps_in, "eps_mid": self._eps_mid,
                                     "attn_shortcut": layer.attn_shortcut is not None,
                                     "mlp_shortcut": layer.mlp_shortcut is not None})
        elem = layer.get_submodule(lin["attn_out"][0]).weight.element_size()
        return [self._record(ctx, a.role("attn"), p_in, mid, attn_params, elem, t1 - t0, layer.attn_shortcut),
                self._record(ctx, a.role("mlp"), mid, out, mlp_params, elem, t2 - t1, layer.mlp_shortcut)]

    def _attention_half(self, ctx: LayerContext, lin: dict[str, list[str]], p_in: _Point,
                        d_mid: int) -> tuple[_Point, int]:
        """Fold γ₁, rotate q/k/v into the input basis, find the mid-block basis, rotate ``o``."""
        layer, a, D = ctx.layer, ctx.adapter, self._full
        norm1, norm2 = ctx.module(a.attn_norm), ctx.module(a.mlp_norm)
        g1, g2 = norm1.weight.detach().clone(), norm2.weight.detach().clone()
        dtype = norm1.weight.dtype
        for rel in lin["attn_in"]:
            m = ctx.module(rel)
            set_linear(m, read_side(m.weight.detach(), p_in.basis, g1), m.bias)
        for rel in lin["mlp_in"]:
            m = ctx.module(rel)
            set_linear(m, read_side(m.weight.detach(), None, g2), m.bias)
        self._eps_in = self._resize_norm(norm1, p_in, dtype)
        self._resize_norm(norm2, _Point(None, D), dtype)  # γ₂ folded; the mid point is still the original basis
        make_sliced_block(layer, block_paths(a))
        set_shortcut(layer, "attn_shortcut", _cast(shortcut_weight(p_in.basis, None, D), dtype))
        set_shortcut(layer, "mlp_shortcut", None)
        acc = None
        if self._rotates(d_mid):
            acc = self._moments()
            ctx.run({a.mlp_norm: acc.add}, stop_at=a.mlp_norm)
        mid = self._point(acc, d_mid)
        o = ctx.module(lin["attn_out"][0])
        set_linear(o, *write_side(o.weight.detach(), None if o.bias is None else o.bias.detach(), mid.basis))
        set_shortcut(layer, "attn_shortcut", _cast(shortcut_weight(p_in.basis, mid.basis, D), dtype))
        self._eps_mid = self._resize_norm(norm2, mid, dtype)
        params = sum(ctx.module(r).weight.numel() for r in (*lin["attn_in"], *lin["attn_out"]))
        return mid, params + _numel(layer.attn_shortcut) + norm1.weight.numel()

    def _mlp_half(self, ctx: LayerContext, lin: dict[str, list[str]], mid: _Point, d_out: int,
                  last: bool) -> tuple[_Point, int]:
        """Rotate gate/up into the mid basis, find the output basis from the block's outputs
        (computed with the mid slicing in place), rotate ``down``, move the activations."""
        layer, D, st = ctx.layer, self._full, ctx.state
        assert st is not None
        dtype = ctx.module(lin["attn_out"][0]).weight.dtype
        for rel in lin["mlp_in"]:
            m = ctx.module(rel)
            set_linear(m, read_side(m.weight.detach(), mid.basis), m.bias)
        set_shortcut(layer, "mlp_shortcut", _cast(shortcut_weight(mid.basis, None, D), dtype))
        acc = self._moments() if self._rotates(d_out) else None
        if acc is not None or not last:
            with torch.no_grad():
                for b in st.batches():
                    y = block_output(st.call(layer, b, st.batch(b)))  # (batch, seq, D), original basis
                    if acc is not None:
                        acc.add(y)
                    st.store(b, y)
            st.set_width(D)
        out = self._point(acc, d_out)
        down = ctx.module(lin["mlp_out"][0])
        set_linear(down, *write_side(down.weight.detach(), None if down.bias is None else down.bias.detach(),
                                     out.basis))
        set_shortcut(layer, "mlp_shortcut", _cast(shortcut_weight(mid.basis, out.basis, D), dtype))
        if not last:
            _project(st, out.basis)
        params = sum(ctx.module(r).weight.numel() for r in (*lin["mlp_in"], *lin["mlp_out"]))
        return out, params + _numel(layer.mlp_shortcut) + ctx.module(ctx.adapter.mlp_norm).weight.numel()

    def _resize_norm(self, norm: nn.Module, point: _Point, dtype: torch.dtype) -> float:
        """A weightless RMSNorm over the point's width that divides by the original width
        (adding back the point's sliced-off energy); returns its eps."""
        scale, eps = rms_norm_at_width(self._full, point.width, self._eps, point.dropped)
        dev = next(t.device for t in (*norm.parameters(), *norm.buffers()))  # the run's device
        set_norm(norm, torch.full((point.width,), scale, dtype=dtype, device=dev), eps)
        return eps

    def _record(self, ctx: LayerContext, rel: str, src: _Point, dst: _Point, params: int, elem: int,
                t: float, shortcut: nn.Module | None) -> LayerRecord:
        return LayerRecord(
            stage=self.name, layer=ctx.index, module=ctx.prefix + rel, kind="sliced", error=1 - dst.kept,
            time_s=t, bytes=params * elem, params=params,
            extra={"in_width": src.width, "out_width": dst.width, "explained_variance": dst.kept,
                   "shortcut_params": _numel(shortcut)})

    # -- resume --------------------------------------------------------------------------------
    def carry_state(self) -> dict[str, object]:
        """The residual point after the last block (its basis, width and energies) and the
        per-block layout recorded so far."""
        cur = self._current
        state: dict[str, object] = {"width": cur.width, "kept": cur.kept, "dropped": cur.dropped,
                                    "layers": list(self._spec["layers"])}
        if cur.basis is not None:
            state["basis"] = cur.basis
        return state

    def restore_carry(self, state: dict[str, object]) -> None:
        basis = state.get("basis")
        self._current = _Point(basis if isinstance(basis, Tensor) else None, int(state["width"]),  # type: ignore[call-overload]
                               float(state["kept"]), float(state["dropped"]))  # type: ignore[arg-type]
        self._spec["layers"] = list(state["layers"])  # type: ignore[call-overload]

    # -- finish: final norm and head ---------------------------------------------------------
    def finish(self, run: RunContext) -> None:
        t0 = time.perf_counter()
        a, last = run.adapter, self._current
        norm = get_module(run.model, a.final_norm)
        gamma = norm.weight.detach().clone()
        dtype = gamma.dtype
        head = get_module(run.model, a.head)
        proj, eps = None, self._eps
        if self._tied:
            if last.basis is not None or self._head_basis is not None:
                M = head_map(last.basis, gamma, self._head_basis)  # (stored width, last width)
                scale, eps = rms_norm_at_width(self._full, last.width, self._eps, last.dropped)
                new = ProjectedRMSNorm(last.width, M.shape[0], eps, device="meta", dtype=dtype)
                new.weight = nn.Parameter(torch.full((last.width,), scale, dtype=dtype, device=M.device),
                                          requires_grad=False)
                new.proj.weight = nn.Parameter(M.to(dtype), requires_grad=False)
                set_module(run.model, a.final_norm, new)
                proj = M.shape[0]
            head.in_features = self._stored
            head_in = self._stored
        else:
            set_linear(head, read_side(head.weight.detach(), last.basis, gamma),
                       None if head.bias is None else head.bias.detach())
            eps = self._resize_norm(norm, last, dtype)
            head_in = last.width
        self._spec["final_norm"] = {"width": last.width, "proj": proj, "eps": eps}
        self._spec["head"] = {"tied": self._tied, "in": head_in}
        run.transforms.append(self._spec)
        params = 0 if proj is None else proj * last.width
        run.records.append(LayerRecord(
            stage=self.name, layer=-1, module=a.final_norm, kind="sliced", error=0.0,
            time_s=time.perf_counter() - t0, bytes=params * gamma.element_size(), params=params,
            extra={"in_width": last.width, "out_width": head_in, "tied_head": int(self._tied)}))

    def scheme(self) -> str:
        """``slicegpt 25% sliced`` or ``slicegpt schedule 10%–40% sliced``, plus ``slice-head``."""
        c = self.config
        if isinstance(c.schedule, list):
            lo, hi = min(c.schedule, default=0.0), max(c.schedule, default=0.0)
            amount = f"schedule {lo:.0%}–{hi:.0%}" if lo != hi else f"schedule {lo:.0%}"
        else:
            amount = f"{c.sparsity:.0%}"
        return " ".join([self.name, amount, "sliced", *(["slice-head"] if c.slice_head else [])])

    def plan_shapes(self, plan: ShapePlan, adapter: Adapter) -> None:
        """Every point's width as :meth:`begin` and :meth:`process_layer` will choose it: the
        block linears narrowed on their residual side, norms at their point's width, the two
        shortcuts of each block (``[d_mid, d_in]``, ``[d_out, d_mid]``, present when either end
        is rotated), the embedding table at its stored width and the head or head map."""
        cfg, e = plan.config, plan.elem
        D, V, n = int(cfg["hidden_size"]), int(cfg["vocab_size"]), int(cfg["num_hidden_layers"])
        self._full, self._tied = D, plan.tied_head
        self._plan_widths(n)
        d0 = self._emb_width
        stored = D if (self._tied and not self.config.slice_head) else d0
        extra = V * (stored - D)  # the embedding table
        lin = block_linears(adapter)
        d_in = d0
        for i in range(n):
            d_mid, d_out = self._widths[i]
            pre = adapter.layer_prefix(i)
            for rel, side in (*((r, "in") for r in lin["attn_in"]), (lin["attn_out"][0], "mid_out"),
                              *((r, "mid_in") for r in lin["mlp_in"]), (lin["mlp_out"][0], "out")):
                o, k = plan.linears[pre + rel]
                o, k = {"in": (o, d_in), "mid_out": (d_mid, k), "mid_in": (o, d_mid), "out": (d_out, k)}[side]
                plan.reshape(pre + rel, o, k)
            extra += (d_in - D) + (d_mid - D)  # the two norms
            rot_in, rot_mid, rot_out = (self._rotates(w) for w in (d_in, d_mid, d_out))
            extra += d_mid * d_in if (rot_in or rot_mid) else 0
            extra += d_out * d_mid if (rot_mid or rot_out) else 0
            d_in = d_out
        if self._tied:
            if self._rotates(d_in) or self._rotates(d0):
                extra += (d_in - D) + stored * d_in  # ProjectedRMSNorm: weight + head map
        else:
            extra += (d_in - D) + V * (d_in - D)  # final norm and head at the last width
        plan.other_bytes += extra * e
        plan.transforms.append("slicegpt")


def _tied(run: RunContext) -> bool:
    """Whether the head shares the token embedding (the runner decides the same way)."""
    a = run.adapter
    return bool(run.config.get("tie_word_embeddings")) and f"{a.head}.weight" not in run.reader




def _project(st: CalibState, basis: Tensor | None) -> None:
    """Move the activations into ``basis`` (``x ← x·B``, narrowing the state's width)."""
    if basis is None:
        return
    B = basis.to(st.hidden.dtype)
    with torch.no_grad():
        for b in st.batches():
            st.store(b, st.batch(b) @ B)
    st.set_width(B.shape[1])


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def _numel(m: nn.Module | None) -> int:
    return 0 if m is None else sum(p.numel() for p in m.parameters())
