"""Concatenated-SVD clustering (``compress share``): error-bounded shared low-rank bases across layers.

For each role (q, k, v, gate, up by default; o and down on request) the weights of every layer
are whitened by one role-wide input Gram (the average of the layers' trace-normalised Grams),
transposed to ``A_l = Lᵀ W_lᵀ [in, out]`` and scaled to unit norm, so a cluster's relative error
is the RMS of its members' relative output errors in that metric. The greedy clustering of
:mod:`compress.algos.concat_svd` groups layers whose joint rank-``r`` error stays under the
threshold; every final cluster is confirmed by an exact SVD.

* A cluster of several layers becomes one shared basis ``B = L⁻ᵀ U_k Σ_k^½ [in, k]`` (stored once,
  manifest ``shared`` group) and one coefficient matrix per layer, refitted in that layer's own
  input metric (``C = (BᵀGB)⁻¹BᵀGWᵀ``); the module is ``lowrank-shared``.
* A singleton becomes a per-layer whitened SVD (SVD-LLM, the ``lowrank`` kind), or stays dense
  when low rank does not pay.

Ranks: with ``ratio`` the targeted linears of each role get ``ratio`` of their parameters in total,
spread over its clusters and singletons by captured energy per parameter; with ``error`` alone
every cluster and singleton takes the smallest rank whose error is at most ``error``.
``grouping: pairs`` replaces the clustering by fixed contiguous groups (Basis Sharing's default)
with the budget split evenly, as a baseline.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from compress.algos import concat_svd as cs
from compress.algos import svd
from compress.errors import CompressError
from compress.modules.kinds import model_shared
from compress.modules.lowrank import LowRankLinear, SharedBasisLinear
from compress.pipeline.pass_api import Needs, Pass, PassConfig, Statistic
from compress.pipeline.stats import group_first
from compress.passes.svd_cluster_plan import RolePlan, SvdClusterPlan, UnitPlan, cluster_figure
from compress.registry import register_pass
from compress.report import LayerRecord

if TYPE_CHECKING:
    from compress.arch import Adapter
    from compress.calib.pipeline import LayerContext
    from compress.pipeline.contexts import RunContext
    from compress.pipeline.memory import MemoryShape
    from compress.pipeline.shapes import ShapePlan
    from compress.pipeline.stats import BlockStats

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
DEFAULT_ROLES = ("q", "k", "v", "gate", "up")


class SvdClusterConfig(PassConfig):
    """Shared low-rank bases for clusters of same-role linears across layers.

    Args:
        error: the clustering threshold ε in (0, 1) on a cluster's relative (whitened) rank-r
            error; alone, it also sets every rank (the smallest meeting ε).
        ratio: parameter budget in (0, 1]: the targeted linears keep at most this fraction of
            their parameters (bases counted once). Without ``error`` the threshold is the median
            per-layer error at the per-layer rank of that budget.
        estimator: how a candidate cluster's error is judged: ``approx`` (incremental truncated
            Gram), ``residual`` or ``maxnorm`` (provable upper bounds).
        roles: which linears share, role by role (default q, k, v, gate, up where the family has
            them; o and down on request); comma-separated on the command line.
        sorting: candidate order: ``residual`` (closest to the seed's subspace first) or ``norm``.
        patience: after this many singletons in a row the rest stay per-layer.
        oversample: extra eigenpairs the ``approx`` estimator keeps (p).
        max_size: the most layers one cluster may hold (default: no limit; 2 pairs any two
            layers, measured worse on SmolLM2, BENCHMARKS.md).
        grouping: ``cluster`` (the search) or ``pairs`` (fixed contiguous groups, the baseline).
        allocation: with ``ratio``: every cluster and singleton gets the rank its share of the
            parameters affords (``uniform``), or the role's budget goes where it captures the
            most whitened energy per parameter (``energy``).
        group_size: layers per group with ``grouping: pairs``.
        refit: per-layer coefficients by least squares in each layer's own input metric
            (otherwise the projection onto the shared basis).
        damp: Gram damping, fraction of the mean diagonal.
        propagate: what calibrates the coefficients and per-layer factors of block i:
            ``compressed`` inputs (a forward through the blocks already shared) or the ``dense`` scan.
        single_layer: a one-layer model has nothing to share: ``refuse`` it, or factor each
            linear on its own (``lowrank``).

    Example:
        ``{pass: svd_cluster, config: {ratio: 0.8}}``
    """

    error: float | None = Field(None, gt=0.0, lt=1.0, description="cluster error threshold ε in (0, 1)")
    ratio: float | None = Field(None, gt=0.0, le=1.0, description="parameter budget in (0, 1]")
    estimator: cs.EstimatorName = Field("approx", description="approx | residual | maxnorm")
    roles: list[str] | None = Field(None, description="roles that share, e.g. q,k,v,gate,up (default)")
    sorting: cs.Sorting = Field("residual", description="candidate order: residual | norm")
    patience: int = Field(10, ge=1, le=1000, description="singletons in a row before the rest stay per-layer")
    oversample: int = Field(5, ge=0, le=4096, description="extra eigenpairs of the approx estimator")
    max_size: int | None = Field(None, ge=2, le=4096, description="most layers in one cluster (default: no limit)")
    grouping: Literal["cluster", "pairs"] = Field("cluster", description="cluster search or fixed contiguous groups")
    group_size: int = Field(2, ge=2, le=1024, description="layers per group with grouping: pairs")
    allocation: Literal["uniform", "energy"] = Field("uniform", description=(
        "ratio: each cluster/singleton its share (uniform) or the role budget by energy per parameter"))
    refit: bool = Field(True, description="least-squares coefficients in each layer's own input metric")
    damp: float = Field(1e-4, ge=0.0, le=10.0, description="Gram damping, fraction of mean diagonal")
    propagate: Literal["compressed", "dense"] = Field("compressed", description=(
        "inputs that fit coefficients and per-layer factors: compressed or dense"))
    single_layer: Literal["refuse", "lowrank"] = Field("refuse", description=(
        "a one-layer model: refuse, or per-layer low rank"))

    @field_validator("roles", mode="before")
    @classmethod
    def _split_roles(cls, v: object) -> object:
        if isinstance(v, str):
            v = [v]
        if isinstance(v, (list, tuple)):
            out = [r.strip() for item in v for r in str(item).split(",") if r.strip()]
            unknown = [r for r in out if r not in ROLES]
            if unknown:
                raise ValueError(f"unknown role {unknown[0]!r} (choose from {', '.join(ROLES)})")
            if len(set(out)) != len(out) or not out:
                raise ValueError("roles must be distinct and not empty")
            return out
        return v

    @model_validator(mode="after")
    def _rules(self) -> SvdClusterConfig:
        if self.error is None and self.ratio is None:
            raise ValueError("set error (a threshold) and/or ratio (a parameter budget)")
        if self.targets or self.ignore:
            raise ValueError("svd_cluster selects linears by roles, not targets/ignore")
        if self.grouping == "pairs" and self.ratio is None:
            raise ValueError("grouping pairs splits a parameter budget: set ratio")
        if self.group_size != 2 and self.grouping != "pairs":
            raise ValueError("group_size applies to grouping pairs only")
        return self


@dataclass
class _Role:
    """One role's statistics across layers: weights ``[out, in]`` and their input Grams."""

    name: str
    linear: str
    weights: list[Tensor]
    grams: list[Tensor]

    @property
    def shape(self) -> tuple[int, int]:
        out, in_f = self.weights[0].shape
        return int(out), int(in_f)


def resolve_roles(config: SvdClusterConfig, adapter: Adapter) -> list[str]:
    """The roles this run shares: the config's, or the defaults the family has."""
    if config.roles is not None:
        return list(config.roles)
    return [r for r in DEFAULT_ROLES if r in adapter.roles]


def _gram_key(adapter: Adapter, linear: str) -> str:
    return "gram:" + group_first(adapter, linear)


# -- the pass ---------------------------------------------------------------------------------------
@register_pass("svd_cluster", SvdClusterConfig, needs_calibration=True, cli_name="share",
               summary="concatenated-SVD clustering: shared low-rank bases across layers under an error bound",
               examples=("compress share smollm2-135m --ratio 0.8 -o out/share80",
                         "compress share smollm2-135m --error 0.3 --estimator residual -o out/share",
                         "compress share smollm2-135m --ratio 0.8 --roles q,k,v,gate,up,o,down -o out/s"))
class SvdClusterPass(Pass):
    """Scan (Grams + weights), plan (cluster, rank), apply (install shared and per-layer factors)."""

    config: SvdClusterConfig

    def check_input(self, adapter: Adapter, manifest: dict) -> None:
        if manifest.get("modules") or manifest.get("transforms"):
            raise CompressError("svd_cluster needs a dense checkpoint (this one is already compressed)",
                                "share bases first, then quantise other linears")
        roles = resolve_roles(self.config, adapter)
        missing = [r for r in roles if r not in adapter.roles]
        if missing or not roles:
            have = [r for r in ROLES if r in adapter.roles]
            what = missing[0] if missing else "q/k/v/gate/up"
            raise CompressError(f"{adapter.name} blocks have no separate {what} linear to share (fused or absent)",
                                "choose --roles from " + (", ".join(have) or "(none)"))

    def resolve(self, linears: list[tuple[str, int, int]]) -> None:
        """Refuse a one-layer model before any work (``linears`` lists every block's linears)."""
        names = [n for n, _, _ in linears]
        layers = names.count(names[0]) if names else 0
        if layers < 2 and self.config.single_layer == "refuse":
            raise CompressError("the model has one layer: there is nothing to share across layers",
                                "use compress lowrank, or pass --single-layer lowrank")

    def needs(self) -> Needs:
        return Needs(scan=True, plan=True, activations=self.config.propagate == "compressed")

    def statistic(self) -> Statistic:
        return Statistic("svd-cluster-scan", 1, {"roles": self.config.roles or list(DEFAULT_ROLES)})

    def scan_layer(self, ctx: LayerContext) -> dict[str, Tensor]:
        """The dense block's input Grams (float64) of every role's input, and the roles' weights."""
        a = ctx.adapter
        linears = {r: a.roles[r] for r in resolve_roles(self.config, a)}
        ctx.hessian_dtype = torch.float64
        grams = ctx.collect(sorted({group_first(a, lin) for lin in linears.values()}), propagate=True)
        out = {"gram:" + k: g for k, g in grams.items()}
        for r, lin in linears.items():
            out["weight:" + r] = ctx.module(lin).weight.detach().to(torch.float32)
        return out

    # -- plan ------------------------------------------------------------------------------------
    def plan(self, stats: BlockStats, run: RunContext) -> SvdClusterPlan:
        n = stats.n_blocks
        blocks = []
        for i in range(n):
            b = stats.block(i)
            if b is None:
                raise CompressError(f"the scan statistics of block {i} are missing", "run again (or with --no-cache)")
            blocks.append({k: t.cpu() for k, t in b.items()})
        a = run.adapter
        roles, units = [], []
        self._bases: dict[str, Tensor] = {}
        for r in resolve_roles(self.config, a):
            lin = a.roles[r]
            data = _Role(r, lin, [b["weight:" + r].double() for b in blocks], [b[_gram_key(a, lin)] for b in blocks])
            role_plan, role_units = self._plan_role(data)
            roles.append(role_plan)
            units.extend(role_units)
        return SvdClusterPlan(mode="ratio" if self.config.ratio is not None else "error", ratio=self.config.ratio,
                              error=self.config.error, estimator=self.config.estimator, grouping=self.config.grouping,
                              roles=roles, units=units, params=sum(u.params for u in units),
                              dense_params=sum(u.dense_params for u in units))

    def _plan_role(self, role: _Role) -> tuple[RolePlan, list[UnitPlan]]:
        """Cluster one role's layers, choose every unit's rank and keep the shared bases."""
        c = self.config
        out_f, in_f = role.shape
        _, A = _whitened(role.weights, role.grams, c.damp)  # [in, out] each, one role-wide metric
        ranks, limit, rule = self._rules(in_f, out_f, [_joint_sigma([x]) for x in A])
        t0 = time.perf_counter()
        if c.grouping == "pairs" or len(A) < 2:
            groups = cs.contiguous_groups(len(A), c.group_size if len(A) >= 2 else 1)
            found = cs.Clustering([cs.Cluster(g, float("nan"), cs.exact_error([A[j] for j in g], ranks(len(g))),
                                              ranks(len(g)), float("nan")) for g in groups], ranks(1), None, "fixed")
        else:
            found = cs.cluster_blocks(A, ranks, limit, estimator=c.estimator, sorting=c.sorting,
                                      patience=c.patience, oversample=c.oversample,
                                      confirm=self._pays(role, ranks) if rule == "pays" else None,
                                      max_size=c.max_size)
        seconds = time.perf_counter() - t0
        units = self._units(role, found)
        spectra = self._rank_units(units, role, ranks)
        for u in units:
            if u.kind == "shared":
                self._bases[u.basis] = spectra[id(u)].basis(u.rank)  # type: ignore[index,arg-type]
        shared = [u for u in units if u.kind == "shared"]
        plan = RolePlan(role=role.name, linear=role.linear, in_features=in_f, out_features=out_f, cluster_rank=ranks(1),
                        threshold=c.error, threshold_rule=rule, clusters=len(shared),
                        shared_layers=sum(len(u.layers) for u in shared), seconds=seconds,
                        evaluations=found.evaluations, exact_svds=found.exact_svds, svds_avoided=found.svds_avoided)
        return plan, units

    def _pays(self, role: _Role, ranks: Callable[[int], int]) -> Callable[[list[int]], tuple[bool, float]]:
        """The exact check of "sharing pays" in the metric the factors will use: the members
        whitened by the mean of their own Grams, at the cluster's rank, lose no more output energy
        (summed over members, each normalised) than each factored alone in its own metric."""
        c = self.config
        out_f, in_f = role.shape
        r1 = ranks(1)
        alone: dict[int, float] = {}

        def single(j: int) -> float:
            if j not in alone:
                alone[j] = _tail(_Spectrum.of([role.weights[j]], [role.grams[j]], c.damp).sigma, r1) ** 2
            return alone[j]

        def check(members: list[int]) -> tuple[bool, float]:
            if len(members) == 1:
                return True, single(members[0]) ** 0.5
            spec = _Spectrum.of([role.weights[j] for j in members], [role.grams[j] for j in members], c.damp)
            err = _tail(spec.sigma, ranks(len(members)))
            return len(members) * err ** 2 <= sum(single(j) for j in members), err

        return check

    def _rules(self, in_f: int, out_f: int, alone: list[Tensor]) -> tuple[
            Callable[[int], int], Callable[[list[int], float | None], float], str]:
        """The clustering rank of a cluster of ``t`` layers and its threshold.

        With ``ratio`` a cluster gets the rank its share of the budget affords,
        ``r_t = ratio · t·in·out / (in + t·out)`` (``r_1`` is the per-layer rank); the threshold is
        ``error`` or, without it, "sharing pays": a layer joins only while the cluster's squared
        error (summed over members) stays within the cluster's before it joined plus the layer's
        own at ``r_1``, so every member added costs no more than factoring it alone at equal
        parameters. With ``error`` alone the rank is the smallest whose median per-layer error
        meets it.
        """
        c = self.config
        if c.ratio is not None:
            ratio = c.ratio
            r1 = svd.rank_for_ratio(in_f, out_f, ratio) or 1

            def ranks(t: int) -> int:
                return max(1, min(in_f, t * out_f, int(ratio * t * in_f * out_f / (in_f + t * out_f) + 1e-9)))

            if c.error is not None:
                return ranks, lambda members, base: c.error, "fixed"  # type: ignore[return-value]
            single = [_tail(s, r1) for s in alone]

            def pays(members: list[int], base: float | None) -> float:
                t, own = len(members), single[members[-1]] ** 2
                before = 0.0 if base is None else (t - 1) * base ** 2  # summed squared error of the rest
                return ((before + own) / t) ** 0.5 * (1 + 1e-9)

            return ranks, pays, "pays"
        eps = c.error
        assert eps is not None
        r0 = next((r for r in range(1, min(in_f, out_f) + 1)
                   if statistics.median(_tail(s, r) for s in alone) <= eps), min(in_f, out_f))
        return (lambda t: r0), (lambda members, base: eps), "fixed"

    def _units(self, role: _Role, found: cs.Clustering) -> list[UnitPlan]:
        out_f, in_f = role.shape
        units = []
        for k, cl in enumerate(found.clusters):
            layers = sorted(cl.members)
            shared = len(layers) > 1
            est = None if cl.estimated != cl.estimated else float(cl.estimated)  # NaN: fixed groups
            units.append(UnitPlan(role=role.name, layers=layers, kind="shared" if shared else "lowrank", rank=None,
                                  basis=f"svd_{role.name}_{k}" if shared else None, estimated_error=est,
                                  exact_error=float(cl.exact),
                                  cluster_threshold=None if cl.threshold != cl.threshold else float(cl.threshold),
                                  own_metric_error=cl.confirmed,
                                  params=0, dense_params=len(layers) * in_f * out_f))
        return units

    def _rank_units(self, units: list[UnitPlan], role: _Role, ranks: Callable[[int], int]) -> dict[int, _Spectrum]:
        """Ranks: ``ratio`` gives each unit its share (``allocation: uniform``) or spreads the
        role's budget by captured energy per parameter (``energy``); ``error`` alone gives each
        the smallest rank meeting it. A unit whose factors would not be smaller stays dense.
        Every unit's spectrum is in its own metric: a cluster's members whitened by the mean of
        their Grams (Basis Sharing), a singleton by its own (SVD-LLM)."""
        c = self.config
        out_f, in_f = role.shape
        spectra = {id(u): _Spectrum.of([role.weights[j] for j in u.layers], [role.grams[j] for j in u.layers], c.damp)
                   for u in units}
        sigma = [spectra[id(u)].sigma for u in units]
        costs = [in_f + len(u.layers) * out_f for u in units]
        caps = [_max_rank(in_f, len(u.layers) * out_f) for u in units]
        if c.ratio is not None and c.allocation == "energy" and c.grouping == "cluster":
            budget = int(c.ratio * sum(u.dense_params for u in units))
            try:
                chosen = cs.allocate_ranks(sigma, costs, budget, max_ranks=caps)
            except ValueError as e:
                raise CompressError(f"--ratio {c.ratio}: {e}", "raise --ratio") from None
        elif c.ratio is not None:
            chosen = [ranks(len(u.layers)) for u in units]
        else:
            assert c.error is not None
            chosen = [_rank_for_error(s, c.error) for s in sigma]
        for u, s, r, cost, cap in zip(units, sigma, chosen, costs, caps):
            if r < 1 or r > cap:
                u.kind, u.rank, u.basis, u.params, u.error = "dense", None, None, u.dense_params, 0.0
            else:
                u.rank, u.params, u.error = r, r * cost, _tail(s, r)
        return spectra

    # -- apply -----------------------------------------------------------------------------------
    def process_layer(self, ctx: LayerContext, run: RunContext) -> list[LayerRecord]:
        plan = run.plan
        assert isinstance(plan, SvdClusterPlan)
        a = ctx.adapter
        roles = [r.role for r in plan.roles]
        if self.config.propagate == "compressed":
            firsts = sorted({group_first(a, a.roles[r]) for r in roles})
            grams = {"gram:" + k: g for k, g in ctx.collect(firsts).items()}
        else:
            assert ctx.stats is not None
            grams = ctx.stats
        return [self._install(ctx, run, plan.unit(r, ctx.index), grams[_gram_key(a, a.roles[r])]) for r in roles]

    def _install(self, ctx: LayerContext, run: RunContext, unit: UnitPlan, G: Tensor) -> LayerRecord:
        t0 = time.perf_counter()
        rel = ctx.adapter.roles[unit.role]
        dense = ctx.module(rel)
        W = dense.weight.detach()
        full = ctx.prefix + rel
        record = dict(stage=self.name, layer=ctx.index, module=full)
        if unit.kind == "dense":
            nbytes = W.numel() * W.element_size()
            return LayerRecord(**record, kind="dense", bits=8.0 * W.element_size(), error=0.0, weight_error=0.0,
                               time_s=time.perf_counter() - t0, bytes=nbytes, params=W.numel(),
                               extra={"reason": "low-rank factors would not be smaller than the dense weight"})
        assert unit.rank is not None
        extra: dict[str, float | int | str] = {"rank": unit.rank, "whitened_error": unit.error}
        if unit.kind == "lowrank":
            fac = svd.factors(svd.spectrum(W, svd.whitening(G, self.config.damp)), unit.rank)
            mod: nn.Module = LowRankLinear.from_factors(fac.U, fac.V, dense.bias, W.dtype)
            W_r, own = fac.weight(), [mod.U, mod.V]
        else:
            mod, W_r, own, basis_bytes = self._shared_module(run, unit, dense, G)
            extra.update({"basis": unit.basis or "", "members": ",".join(map(str, unit.layers))})
            if basis_bytes:
                extra["shared_bytes"] = basis_bytes
        ctx.replace(rel, mod)
        if dense.bias is not None:
            own = [*own, dense.bias]
        nbytes = sum(t.numel() * t.element_size() for t in own) + int(extra.get("shared_bytes", 0))
        params = sum(t.numel() for t in own)
        kind = "lowrank" if unit.kind == "lowrank" else "lowrank-shared"
        return LayerRecord(**record, kind=kind, bits=8 * nbytes / W.numel(),
                           error=svd.relative_output_error(W, W_r, G),
                           weight_error=svd.relative_weight_error(W, W_r), time_s=time.perf_counter() - t0,
                           bytes=nbytes, params=params, extra=extra)

    def _shared_module(self, run: RunContext, unit: UnitPlan, dense: nn.Linear,
                       G: Tensor) -> tuple[nn.Module, Tensor, list[Tensor], int]:
        """The ``lowrank-shared`` module of one member; the basis is stored at its first member."""
        assert unit.basis is not None and unit.rank is not None
        W = dense.weight.detach()
        B = self._bases[unit.basis].to(W.device)  # [in, k] float64
        basis_bytes = 0
        if unit.basis not in run.shared:
            holder = run.add_shared(unit.basis, {"U": B.to(W.dtype).contiguous()})
            basis_bytes = B.numel() * W.element_size()
        else:
            holder = model_shared(run.model)
            assert holder is not None
        Bq = holder.get(unit.basis, "U").to(torch.float64)  # the basis as stored
        if self.config.refit:
            C = cs.refit_coefficients(Bq, W, G)  # [k, out]
        else:
            C = torch.linalg.lstsq(Bq, W.T.to(torch.float64)).solution  # plain projection
        if not torch.isfinite(C).all():
            raise CompressError(f"the coefficients of {unit.role} in layer(s) {unit.layers} are not finite",
                                "raise --damp")
        mod = SharedBasisLinear(dense.in_features, dense.out_features, unit.rank, unit.basis, holder,
                                bias=dense.bias is not None, dtype=W.dtype, device=W.device)
        mod.V.data = C.to(W.dtype).contiguous()
        if dense.bias is not None:
            mod.bias.data = dense.bias.detach().clone()  # type: ignore[union-attr]
        return mod, (Bq @ C).T, [mod.V], basis_bytes

    # -- reports and plans -----------------------------------------------------------------------
    def write_reports(self, run: RunContext, directory: Path) -> None:
        """``clusters.png``: layers × roles, each shared cluster one colour with its rank."""
        assert isinstance(run.plan, SvdClusterPlan)
        directory.mkdir(parents=True, exist_ok=True)
        cluster_figure(run.plan, self.scheme()).savefig(directory / "clusters.png", dpi=100)

    def scheme(self) -> str:
        c = self.config
        rule = [f"ratio {c.ratio:g}" if c.ratio is not None else "", f"error {c.error:g}" if c.error is not None else ""]
        return " ".join(["svd_cluster", c.grouping, c.estimator, *filter(None, rule)])

    def plan_shapes(self, plan: ShapePlan, adapter: Adapter) -> None:
        """Before the scan only ``ratio`` fixes the bytes: ``ratio`` of each targeted linear (fp32)."""
        if self.config.ratio is None:
            return
        rels = {adapter.roles[r] for r in resolve_roles(self.config, adapter) if r in adapter.roles}
        from compress.pipeline.shapes import block_relative

        for name, (o, k) in plan.linears.items():
            if name not in plan.compressed and block_relative(name, adapter) in rels:
                plan.linear_bytes[name] = int(self.config.ratio * o * k) * 4
                plan.compressed.add(name)

    def plan_memory(self, shape: MemoryShape) -> dict[str, int]:
        """Per block, its Grams and role weights (float64), which the plan holds for every block."""
        return {"Grams + role weights of one block (the plan holds all blocks')": shape.gram_bytes
                + 2 * shape.block_bytes}


# -- helpers -------------------------------------------------------------------------------------
def _tail(sigma: Tensor, r: int) -> float:
    """Relative rank-``r`` error from singular values: ``sqrt(Σ_{j>r} σ² / Σ σ²)``."""
    s2 = sigma.double() ** 2
    total = float(s2.sum())
    return float(s2[r:].sum() / total) ** 0.5 if total > 0 else 0.0


def _rank_for_error(sigma: Tensor, eps: float) -> int:
    s2 = sigma.double() ** 2
    total = float(s2.sum())
    tail = (total - torch.cumsum(s2, 0)).clamp_min(0) / max(total, 1e-300)  # tail[r-1] = error² at rank r
    hits = (tail <= eps * eps).nonzero()
    return int(hits[0]) + 1 if hits.numel() else sigma.numel()


def _max_rank(m: int, n: int) -> int:
    """The largest rank whose factors ``r (m + n)`` are smaller than the dense ``m · n``."""
    return max(0, min(m, n, (m * n - 1) // (m + n)))


def _whitened(weights: list[Tensor], grams: list[Tensor], damp: float) -> tuple[Tensor, list[Tensor]]:
    """``L`` with ``L Lᵀ`` the mean of the trace-normalised Grams, and ``Lᵀ W_lᵀ / ‖·‖ [in, out]``."""
    L = svd.whitening(cs.mean_gram(grams), damp).L
    A = [L.T @ W.to(torch.float64).T for W in weights]
    return L, [a / a.norm().clamp_min(1e-300) for a in A]


@dataclass
class _Spectrum:
    """One unit's whitened factorisation: ``L`` of its metric (the mean of its members'
    trace-normalised Grams) and the left singular pairs of its unit-norm whitened blocks (a
    singleton is a cluster of one: its own SVD-LLM spectrum)."""

    L: Tensor
    U: Tensor
    sigma: Tensor

    @staticmethod
    def of(weights: list[Tensor], grams: list[Tensor], damp: float) -> _Spectrum:
        L, A = _whitened(weights, grams, damp)
        U, sigma = cs.left_singular(A)
        return _Spectrum(L, U, sigma)

    def basis(self, rank: int) -> Tensor:
        """``B = L⁻ᵀ U_k Σ_k^½ [in, k]``: the top-``k`` whitened directions in input space."""
        U = self.U[:, :rank] * self.sigma[:rank].sqrt()
        return torch.linalg.solve_triangular(self.L.T, U, upper=True)  # Lᵀ B = U_k Σ^½


def _joint_sigma(blocks: list[Tensor]) -> Tensor:
    """Singular values of ``[A_1 … A_c]`` from the eigenvalues of ``Σ A_i A_iᵀ [m, m]``."""
    lam = torch.linalg.eigvalsh(sum(a @ a.T for a in blocks)).flip(0).clamp_min(0.0)  # type: ignore[arg-type]
    return lam[: min(lam.numel(), sum(a.shape[1] for a in blocks))].sqrt()
