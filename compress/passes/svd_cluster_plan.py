"""The plan of the ``svd_cluster`` pass (``plan.json``) and its cluster map figure."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class UnitPlan(BaseModel):
    """One cluster (kind ``shared``) or singleton (``lowrank`` or ``dense``) of one role."""

    role: str
    layers: list[int]
    kind: Literal["shared", "lowrank", "dense"]
    rank: int | None
    basis: str | None = None
    #: the estimator's error of the cluster at the clustering rank (None for fixed groups)
    estimated_error: float | None = None
    #: the exact error of the cluster at the clustering rank
    exact_error: float | None = None
    #: the threshold this cluster was held to
    cluster_threshold: float | None = None
    #: "sharing pays": the exact error in the cluster's own whitening at the clustering rank
    own_metric_error: float | None = None
    #: the exact whitened relative error at the final rank (0 for dense)
    error: float = 0.0
    params: int
    dense_params: int


class RolePlan(BaseModel):
    """How one role was clustered: threshold, clustering rank and what the search cost."""

    role: str
    linear: str
    in_features: int
    out_features: int
    cluster_rank: int
    #: the fixed threshold ε, or None when each cluster is held to its members' own errors
    threshold: float | None
    threshold_rule: Literal["fixed", "pays"]
    clusters: int
    shared_layers: int
    seconds: float
    evaluations: int
    exact_svds: int
    svds_avoided: int


class SvdClusterPlan(BaseModel):
    """The whole model's clusters and ranks (``plan.json``)."""

    mode: Literal["ratio", "error"]
    ratio: float | None
    error: float | None
    estimator: str
    grouping: str
    roles: list[RolePlan]
    units: list[UnitPlan]
    params: int
    dense_params: int

    def unit(self, role: str, layer: int) -> UnitPlan:
        return next(u for u in self.units if u.role == role and layer in u.layers)

    def summary(self) -> list[str]:
        """What ``compress plan`` prints: per role the clusters found and their cost."""
        rule = f"ratio {self.ratio:g}" if self.ratio is not None else f"error {self.error:g}"
        lines = [f"svd_cluster ({self.grouping}, {self.estimator}, {rule}): {self.params:,} of "
                 f"{self.dense_params:,} parameters ({self.params / max(1, self.dense_params):.3f})"]
        for r in self.roles:
            units = [u for u in self.units if u.role == r.role]
            shared = [u for u in units if u.kind == "shared"]
            desc = ", ".join(f"{{{','.join(map(str, u.layers))}}} r{u.rank}" for u in shared[:8])
            more = f" (+{len(shared) - 8} more)" if len(shared) > 8 else ""
            rule = f"threshold {r.threshold:g}" if r.threshold is not None else "sharing pays"
            lines.append(f"  {r.role}: {rule} (per-layer rank {r.cluster_rank}); "
                         f"{len(shared)} shared cluster(s) over {r.shared_layers} layers {desc}{more}; "
                         f"{sum(u.kind == 'lowrank' for u in units)} per-layer low rank, "
                         f"{sum(u.kind == 'dense' for u in units)} dense; {r.seconds:.1f} s, "
                         f"{r.svds_avoided} exact SVDs avoided")
        return lines



def cluster_figure(plan: SvdClusterPlan, title: str) -> Figure:
    """Layers × roles; each shared cluster a colour (its rank written in the cell), per-layer low
    rank grey, dense white."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    n = 1 + max((max(u.layers) for u in plan.units), default=0)
    roles = [r.role for r in plan.roles]
    img = np.ones((len(roles), n, 3))
    fig = Figure(figsize=(max(6, 0.3 * n + 2), 0.6 * len(roles) + 1.5))
    ax = fig.add_subplot(1, 1, 1)
    cmap = colormaps["tab20"]
    k = 0
    for u in plan.units:
        row = roles.index(u.role)
        colour = (0.8, 0.8, 0.8) if u.kind == "lowrank" else (1.0, 1.0, 1.0)
        if u.kind == "shared":
            colour, k = cmap(k % 20)[:3], k + 1
        for j in u.layers:
            img[row, j] = colour
            if u.rank is not None:
                ax.text(j, row, str(u.rank), ha="center", va="center", fontsize=6)
    ax.imshow(img, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(roles)), roles)
    ax.set_xlabel("layer")
    ax.set_title(f"{title}: shared clusters (colour) and ranks; grey per-layer, white dense", fontsize=9)
    return fig
