"""Low-rank pass: every selected linear becomes a :class:`LowRankLinear` (plain or whitened SVD).

Rank per linear, in order of precedence: an explicit entry in ``ranks`` (full module name →
rank, inline or from a JSON/YAML file, so an allocator can set them), else the parameter
``ratio`` (``r (in + out) ≤ ratio · in · out``), else the ``energy`` threshold on the singular
values (output energy when whitened). A linear whose factors would not be smaller than its
dense weight stays dense. With ``whiten`` the block's calibration inputs give one float64 Gram
matrix per input (fused siblings such as q/k/v share one, and one Cholesky factor).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from compress.algos import svd
from compress.errors import CompressError
from compress.modules.lowrank import LowRankLinear
from compress.pipeline.memory import MemoryShape
from compress.pipeline.pass_api import Needs, Pass, PassConfig, Statistic, read_data_file
from compress.pipeline.stats import group_first, input_gram_statistic, input_grams
from compress.registry import register_pass
from compress.report import LayerRecord

if TYPE_CHECKING:
    from compress.calib.pipeline import LayerContext
    from compress.pipeline.contexts import RunContext


class LowRankConfig(PassConfig):
    """Truncated SVD of every selected linear.

    Args:
        ratio: target parameter ratio of each factored linear, in (0, 1]: factors store at most
            ``ratio`` of the dense weight's parameters (``U`` and ``V`` both counted).
        energy: alternatively, the fraction of squared singular values to keep, in (0, 1].
        ranks: explicit ranks ``{full module name: rank}`` (per head with ``per_head``), or the
            path of a JSON/YAML file holding that mapping. They win over ratio/energy; linears
            not listed follow ratio/energy, or stay dense when neither is set.
        whiten: SVD of ``W L`` with ``L Lᵀ`` the calibration Gram (SVD-LLM): truncation then
            minimises the output error instead of the weight error. Needs calibration data.
        per_head: factor q/k/v head by head (``U [in, heads·r]``, ``V [heads, r, head_dim]``);
            the rank is per head.
        damp: diagonal damping of the Gram, as a fraction of its mean diagonal.
        propagate: what the next block is calibrated on: ``compressed`` re-runs the block after
            factoring it; ``dense`` reuses the forward that collected the Gram matrices.

    Example:
        ``{pass: lowrank, config: {ratio: 0.5, whiten: true}}``
    """

    ratio: float | None = Field(None, gt=0.0, le=1.0, description="target parameter ratio in (0, 1]")
    energy: float | None = Field(None, gt=0.0, le=1.0, description="singular-value energy to keep")
    ranks: dict[str, Annotated[int, Field(ge=1)]] | str | None = Field(
        None, description="per-module ranks, or a JSON/YAML file of {module: rank}")
    whiten: bool = Field(True, description="whitened SVD from calibration data (SVD-LLM)")
    per_head: bool = Field(False, description="factor q/k/v per attention head")
    damp: float = Field(1e-4, ge=0.0, le=10.0, description="Gram damping, fraction of mean diagonal")
    propagate: Literal["compressed", "dense"] = Field("compressed", description=(
        "what calibrates the next block: this block's factored or dense outputs"))

    @field_validator("ranks", mode="before")
    @classmethod
    def _load_ranks(cls, v: object) -> object:
        return load_ranks(v) if isinstance(v, (str, Path)) else v

    @model_validator(mode="after")
    def _one_rule(self) -> LowRankConfig:
        if self.ratio is not None and self.energy is not None:
            raise ValueError("set either ratio or energy, not both")
        if self.ratio is None and self.energy is None and not self.ranks:
            raise ValueError("set one of ratio, energy or ranks")
        return self

    def explicit_ranks(self) -> dict[str, int]:
        return dict(self.ranks) if isinstance(self.ranks, dict) else {}


def load_ranks(path: str | Path) -> dict[str, int]:
    """A ``{module name: rank}`` mapping from a JSON or YAML file (ValueError if malformed)."""
    data = read_data_file(path, "ranks")
    p = Path(path)
    if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(r, int) and not isinstance(r, bool) for k, r in data.items()):
        raise ValueError(f"ranks file {p} must map module names to integer ranks")
    return data


def _heads_of(config: dict, role: str) -> tuple[int, int]:
    """(heads, head_dim) of the q/k/v projection ``role`` from a raw ``config.json``."""
    n_heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // n_heads)
    heads = n_heads if role == "q" else int(config.get("num_key_value_heads") or n_heads)
    return heads, head_dim


@register_pass("lowrank", LowRankConfig, needs_calibration=lambda cfg: cfg.whiten,
               summary="low-rank factorisation: plain or whitened (SVD-LLM) truncated SVD",
               examples=("compress lowrank smollm2-135m --ratio 0.8 -o out/lr80",
                         "compress lowrank smollm2-135m --energy 0.95 --no-whiten -o out/e95",
                         "compress lowrank smollm2-135m --ranks ranks.yaml -o out/lr"))
class LowRankPass(Pass):
    """Factor every selected linear; fused siblings share one Gram matrix and whitening."""

    config: LowRankConfig

    def begin(self, run: RunContext) -> None:
        """Check explicit ranks against the model before any block is touched."""
        self._head_roles = {run.adapter.roles[r]: r for r in ("q", "k", "v") if r in run.adapter.roles}
        self._config = run.config
        wanted = self.config.explicit_ranks()
        if not wanted:
            return
        layers = run.model.get_submodule(run.adapter.layers)
        known = {run.adapter.layer_prefix(i) + rel: (layers[i].get_submodule(rel), rel)
                 for i in range(len(layers)) for rel in run.adapter.linears if self.config.selects(rel)}
        unknown = [n for n in wanted if n not in known]
        if unknown:
            example = next(iter(known), "?")
            raise CompressError(f"ranks name {len(unknown)} unknown or unselected linear(s), e.g. {unknown[0]!r}",
                                f"use full module names such as {example!r}")
        for name, r in wanted.items():
            mod, rel = known[name]
            limit = self._max_rank(mod, rel)
            if r > limit:
                raise CompressError(f"rank {r} for {name} exceeds its maximum {limit}",
                                    "lower the rank (a full-rank factorisation never saves space)")

    def _max_rank(self, mod: nn.Module, rel: str) -> int:
        in_f, out_f = mod.in_features, mod.out_features
        if self.config.per_head and rel in self._head_roles:
            heads, hd = _heads_of(self._config, self._head_roles[rel])
            return min(in_f, hd)
        return min(in_f, out_f)

    def _dense_grams(self) -> bool:
        return self.config.whiten and self.config.propagate == "dense"

    def needs(self) -> Needs:
        """Whitened under ``propagate: dense``: the Grams are dense-model statistics, scanned and
        kept in the work store (shared with GPTQ's ``propagate: dense`` Hessians)."""
        return Needs(scan=True, activations=False) if self._dense_grams() else Needs()

    def statistic(self) -> Statistic | None:
        return input_gram_statistic("float64") if self._dense_grams() else None

    def scan_layer(self, ctx: LayerContext) -> dict[str, Tensor]:
        return input_grams(ctx, "float64")

    def plan_memory(self, shape: MemoryShape) -> dict[str, int]:
        """Whitened: the Grams of one block and, for the widest input, its whitening factor and
        inverse; every factorisation: the float64 SVD of the widest weight (A, U, S, Vᵀ)."""
        out, in_f = shape.widest_linear
        terms = {"SVD workspace (float64)": (3 * out * in_f + in_f * in_f) * 8}
        if self.config.whiten:
            widest_in = max(shape.gram_inputs, default=in_f)
            terms["Gram matrices of one block + whitening"] = shape.gram_bytes + 2 * widest_in * widest_in * 8
        return terms

    def process_layer(self, ctx: LayerContext, run: RunContext) -> list[LayerRecord]:
        names = [n for n in ctx.adapter.linears if self.config.selects(n)
                 and isinstance(ctx.module(n), nn.Linear) and self._wanted(ctx.prefix + n)]
        grams: dict[str, Tensor] = {}
        if ctx.stats is not None:
            grams = {n: ctx.stats[group_first(ctx.adapter, n)] for n in names}
        elif self.config.whiten and names:
            firsts = [g[0] for g in ctx.adapter.groups if any(n in names for n in g)]
            G = ctx.collect(firsts)
            grams = {n: G[g[0]] for g in ctx.adapter.groups for n in g if g[0] in G}
        whites: dict[int, svd.Whitening] = {}
        records = []
        for name in names:
            G = grams.get(name)
            white = None
            if G is not None:
                if id(G) not in whites:
                    whites[id(G)] = svd.whitening(G, self.config.damp)
                white = whites[id(G)]
            records.append(self._factor(ctx, name, G, white))
        return records

    def _wanted(self, full: str) -> bool:
        """Whether a rule asks for this linear (with only explicit ranks, the rest is untouched)."""
        c = self.config
        return c.ratio is not None or c.energy is not None or full in c.explicit_ranks()

    def _factor(self, ctx: LayerContext, name: str, G: Tensor | None,
                white: svd.Whitening | None) -> LayerRecord:
        """Factor one linear (or leave it dense) and describe what happened."""
        t0 = time.perf_counter()
        dense = ctx.module(name)
        W = dense.weight.detach()
        full = ctx.prefix + name
        per_head = self.config.per_head and name in self._head_roles
        if per_head:
            heads, hd = _heads_of(self._config, self._head_roles[name])
            spectra = svd.head_spectra(W, heads, white)
            rank = self._rank(full, W.shape[1], hd, spectra)
            fac: svd.Factors | svd.HeadFactors | None = None
            if rank is not None and svd.saves_params(W.shape[1], hd, rank):
                fac = svd.head_factors(spectra, rank)
            energy = None if rank is None else min(s.energy(rank) for s in spectra)
        else:
            spec = svd.spectrum(W, white)
            rank = self._rank(full, W.shape[1], W.shape[0], [spec])
            fac = None
            if rank is not None and svd.saves_params(W.shape[1], W.shape[0], rank):
                fac = svd.factors(spec, rank)
            energy = None if rank is None else spec.energy(rank)
        if fac is None:
            return self._dense_record(ctx, name, W, rank, time.perf_counter() - t0, G is not None)
        W_r = fac.weight()
        mod = LowRankLinear.from_factors(fac.U, fac.V, dense.bias, W.dtype)
        ctx.replace(name, mod)
        params = mod.U.numel() + mod.V.numel()
        nbytes = params * mod.U.element_size()
        extra: dict[str, float | int | str] = {
            "rank": rank, "max_rank": min(W.shape) if not per_head else min(W.shape[1], W.shape[0] // mod.heads),
            "heads": mod.heads, "param_ratio": params / W.numel(), "energy_kept": float(energy or 0.0)}
        if white is not None:
            extra.update({"damp_shift": white.shift, "whitening": white.method})
        err = None if G is None else svd.relative_output_error(W, W_r, G)
        return LayerRecord(stage=self.name, layer=ctx.index, module=full, kind="lowrank",
                           bits=8 * nbytes / W.numel(), error=err,
                           weight_error=svd.relative_weight_error(W, W_r), time_s=time.perf_counter() - t0,
                           bytes=nbytes, params=params, extra=extra)

    def scheme(self) -> str:
        """``lowrank ratio 0.5 whitened``: the rank rule(s), per-head layout, whitening."""
        c = self.config
        n_ranks = len(c.explicit_ranks())
        rules = [f"ratio {c.ratio:g}" if c.ratio is not None else "",
                 f"energy {c.energy:g}" if c.energy is not None else "",
                 f"{n_ranks} explicit ranks" if n_ranks else "",
                 "per-head" if c.per_head else "", "whitened" if c.whiten else "plain SVD"]
        return " ".join([self.name, *filter(None, rules)])

    def _rank(self, full: str, in_f: int, out_f: int, spectra: list[svd.Spectrum]) -> int | None:
        """Explicit rank, else by ratio, else by energy (max over heads), else None (dense)."""
        c = self.config
        explicit = c.explicit_ranks()
        if full in explicit:
            return explicit[full]
        if c.ratio is not None:
            return svd.rank_for_ratio(in_f, out_f, c.ratio)
        if c.energy is not None:
            return max(svd.rank_for_energy(s.sigma, c.energy) for s in spectra)
        return None

    def _dense_record(self, ctx: LayerContext, name: str, W: Tensor, rank: int | None, t: float,
                      calibrated: bool) -> LayerRecord:
        """A linear left dense: its errors are exactly 0 (the output error only counts as measured
        when calibration data was used, so data-free reports compare weight errors throughout)."""
        nbytes = W.numel() * W.element_size()
        if rank is not None:
            why = f"rank {rank} factors would not be smaller than the dense weight"
        else:
            why = f"no rank ≥ 1 within ratio {self.config.ratio} is smaller than the dense weight"
        return LayerRecord(stage=self.name, layer=ctx.index, module=ctx.prefix + name, kind="dense",
                           bits=8.0 * W.element_size(), error=0.0 if calibrated else None,
                           weight_error=0.0, time_s=t, bytes=nbytes,
                           params=W.numel(), extra={"reason": why})

    def estimate_bytes(self, out_features: int, in_features: int, rel_name: str) -> int | None:
        """fp32 factor bytes under ``ratio`` (energy and explicit ranks depend on the data)."""
        c = self.config
        if not c.selects(rel_name) or c.ratio is None or c.explicit_ranks():
            return None
        if c.per_head and rel_name.rsplit(".", 1)[-1] in _HEAD_LINEARS:
            return None  # needs the head count, which `plan` does not pass
        r = svd.rank_for_ratio(in_features, out_features, c.ratio)
        if r is None:
            return None
        from compress.modules.kinds import entry_bytes
        from compress.modules.lowrank import LowRankEntry

        return entry_bytes(LowRankEntry(in_features=in_features, out_features=out_features, rank=r))


_HEAD_LINEARS = ("q_proj", "k_proj", "v_proj", "query", "key", "value")
