"""Concatenated-matrix SVD: error estimators and error-constrained clustering (arXiv 2601.11626).

Blocks ``A_1 … A_K`` share a row count ``m`` (``A_i [m, n_i]``). For a cluster ``C`` with
``M_C = [A_i]_{i∈C}`` (columns concatenated), the quantity of interest is the relative error of
its best rank-``r`` approximation,

    e(C) = ‖M_C − [M_C]_r‖_F / ‖M_C‖_F = sqrt(1 − E_r(M_C) / ‖M_C‖_F²),

with ``E_r`` the top-``r`` energy ``Σ_{j≤r} σ_j²``. Each estimator below tracks a lower bound or
an estimate ``Ê_r`` of that energy as blocks are added, without forming ``M_C``:

* :class:`MaxNormEstimator` (Weyl / interlacing): ``E_r(M) ≥ E_r(seed)`` for any column
  sub-matrix; the seed's top-``r`` energy is exact (for a seed wider than ``r`` this is *not*
  its Frobenius norm, the pitfall of crediting it in full). O(1) per added block.
* :class:`ResidualEstimator`: residuals of each new block against the span of everything added so
  far are mutually orthogonal; the top ``r`` residual singular values, squared, are captured by
  an orthonormal rank-``r`` projector, hence a lower bound on ``E_r``.
* :class:`GramEstimator`: an incremental truncated eigendecomposition ``M Mᵀ ≈ Q S Qᵀ`` with
  ``r + p`` kept pairs (oversampling ``p``); exact while ``r + p`` ≥ the total column count.

:func:`cluster_blocks` is the greedy loop (seed by norm, candidates in a sorting order, stop at the
first one that breaks ``ε``, patience on singletons), and every final cluster's error is confirmed
by an exact SVD. All arithmetic is float64 on the device of the blocks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol, Union

import torch
from torch import Tensor

EstimatorName = Literal["approx", "residual", "maxnorm"]
Sorting = Literal["residual", "norm"]
#: squared singular values below ``TOL`` times the block's squared norm are treated as zero
#: (above float64 round-off of a Gram, ~1e-16, and dropping at most ~1e-7 of a block's norm)
TOL = 1e-14


def _f64(A: Tensor) -> Tensor:
    if A.dim() != 2:
        raise ValueError(f"blocks must be 2-D [m, n], got {tuple(A.shape)}")
    return A.to(torch.float64)


def _rows(blocks: list[Tensor]) -> int:
    ms = {int(b.shape[0]) for b in blocks}
    if len(ms) != 1:
        raise ValueError(f"blocks must share their row count, got {sorted(ms)}")
    return ms.pop()


def relative_error(total: float, kept: float) -> float:
    """``sqrt(1 − kept / total)`` clipped to [0, 1] (0 for an all-zero matrix)."""
    if total <= 0:
        return 0.0
    return math.sqrt(min(1.0, max(0.0, 1.0 - kept / total)))


def exact_error(blocks: list[Tensor], r: int, grams: list[Tensor] | None = None) -> float:
    """Relative rank-``r`` error of the concatenation, from its exact spectrum.

    With ``grams`` (each block's ``A Aᵀ [m, m]``) the spectrum is the eigenvalues of their sum,
    ``M Mᵀ``: O(m³) per cluster instead of an SVD of ``[m, Σ n_i]``, exact up to float64 round-off
    on the squared values (about ``1e-7`` absolute on the error, far below any useful threshold).
    """
    if grams is None:
        _rows(blocks)
        s2 = torch.linalg.svdvals(torch.cat([_f64(b) for b in blocks], dim=1)).pow(2)  # [min(m, Σ n)]
    else:
        s2 = torch.linalg.eigvalsh(sum(grams)).flip(0).clamp_min(0.0)  # type: ignore[arg-type]
    total = float(s2.sum())
    return math.sqrt(float(s2[r:].sum()) / total) if total > 0 else 0.0  # the tail: no cancellation


def left_factor(R: Tensor, tol: float) -> tuple[Tensor, Tensor]:
    """``R = Q B`` with orthonormal ``Q [m, k]`` spanning the directions whose squared singular
    value exceeds ``tol · ‖R‖_F²``, from the eigendecomposition of ``R Rᵀ [m, m]`` (cheaper than an
    SVD of a wide ``R``); returns ``(Q, σ²)`` with ``σ²`` descending."""
    lam, vec = torch.linalg.eigh(R @ R.T)  # ascending
    lam, vec = lam.flip(0), vec.flip(1)
    keep = lam > tol * max(float((R * R).sum()), 1e-300)
    return vec[:, keep], lam[keep]


# -- estimators --------------------------------------------------------------------------------
class Estimator(Protocol):
    """A functional estimator: ``start`` and ``add`` return new states (inputs are never changed),
    so the clustering loop can try a candidate and drop it."""

    rank: int

    def start(self, blocks: list[Tensor]) -> object: ...

    def add(self, state: object, A: Tensor) -> object: ...

    def error(self, state: object, rank: int | None = None) -> float:
        """The estimated relative error at ``rank`` (default and maximum: the estimator's rank)."""
        ...


@dataclass(frozen=True)
class MaxNormState:
    total: float  # ‖M‖_F² of every block added
    seed: Tensor  # squared singular values of the seed, descending: E_k(seed) ≤ E_k(M)


@dataclass
class MaxNormEstimator:
    """Weyl / max-norm bound: credit the seed's exact top-``r`` energy, count the rest as lost."""

    rank: int

    def start(self, blocks: list[Tensor]) -> MaxNormState:
        _rows(blocks)
        seed = torch.cat([_f64(b) for b in blocks], dim=1)  # [m, Σ n_seed]
        # a seed with ≤ r columns has rank ≤ r: its whole energy is captured; a wider one (a
        # weight matrix) is credited only its own top-r energy, not its Frobenius norm
        lam = _eigvals_desc(seed @ seed.T)[: min(seed.shape)]  # σ², descending
        return MaxNormState(float((seed * seed).sum()), lam)

    def add(self, state: MaxNormState, A: Tensor) -> MaxNormState:
        A = _f64(A)
        return MaxNormState(state.total + float((A * A).sum()), state.seed)

    def error(self, state: MaxNormState, rank: int | None = None) -> float:
        return relative_error(state.total, float(state.seed[: _cap(rank, self.rank)].sum()))


def _cap(rank: int | None, limit: int) -> int:
    if rank is None:
        return limit
    if not 1 <= rank <= limit:
        raise ValueError(f"rank {rank} is outside [1, {limit}] (the estimator's rank)")
    return rank


def _eig_desc(P: Tensor) -> tuple[Tensor, Tensor]:
    lam, vec = torch.linalg.eigh(0.5 * (P + P.T))  # ascending
    return lam.flip(0).clamp_min(0.0), vec.flip(1)


def _eigvals_desc(P: Tensor) -> Tensor:
    return torch.linalg.eigvalsh(0.5 * (P + P.T)).flip(0).clamp_min(0.0)


@dataclass(frozen=True)
class ResidualState:
    Q: Tensor  # [m, q] orthonormal basis of the span of every block before the last
    pending: Tensor  # [m, m] R Rᵀ of the last block's residual: its range joins Q when extended
    values: Tensor  # [≤ r] the largest squared residual singular values so far
    total: float
    cache: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass
class ResidualEstimator:
    """Incremental residual bound: ``Ê_r`` = the top ``r`` squared singular values of the residuals
    ``(I − QQᵀ) A`` of each block against the span of the blocks before it.

    A trial ``add`` needs only the eigenvalues of ``R Rᵀ [m, m]``; the residual's range is
    factored (one ``eigh``) when that state is extended, so a rejected candidate costs one
    ``eigvalsh``. Only directions above ``tol`` join the span and count in the bound.
    """

    rank: int
    tol: float = TOL

    def start(self, blocks: list[Tensor]) -> ResidualState:
        m = _rows(blocks)
        z = torch.zeros(m, 0, dtype=torch.float64, device=blocks[0].device)
        state = ResidualState(z, torch.zeros(m, m, dtype=torch.float64, device=z.device), z[0], 0.0)
        for b in blocks:
            state = self.add(state, b)
        return state

    def _span(self, state: ResidualState) -> Tensor:
        if "span" not in state.cache:
            lam, vec = _eig_desc(state.pending)
            keep = int((lam > self.tol * max(float(lam.sum()), 1e-300)).sum())
            keep = min(keep, state.Q.shape[0] - state.Q.shape[1])  # the span cannot exceed m columns
            state.cache["span"] = torch.cat([state.Q, vec[:, :keep]], dim=1)
        return state.cache["span"]

    def add(self, state: ResidualState, A: Tensor) -> ResidualState:
        A = _f64(A)
        Q = self._span(state)
        R = A - Q @ (Q.T @ A)  # [m, n] residual against the span so far
        R = R - Q @ (Q.T @ R)  # one re-orthogonalisation pass
        RR = R @ R.T
        s2 = _eigvals_desc(RR)
        s2 = s2[: Q.shape[0] - Q.shape[1]]
        s2 = s2[s2 > self.tol * max(float(s2.sum()), 1e-300)]
        values = torch.cat([state.values, s2]).sort(descending=True).values[: self.rank]
        return ResidualState(Q, RR, values, state.total + float((A * A).sum()))

    def error(self, state: ResidualState, rank: int | None = None) -> float:
        return relative_error(state.total, float(state.values[: _cap(rank, self.rank)].sum()))


@dataclass(frozen=True)
class GramState:
    P: Tensor  # [m, m] the kept Gram plus the last block's A Aᵀ (truncated when extended)
    lam: Tensor  # eigenvalues of P, descending
    total: float
    cache: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass
class GramEstimator:
    """Incremental truncated Gram: ``M Mᵀ ≈ Q diag(λ) Qᵀ`` with the top ``r + p`` pairs kept.

    Adding ``A`` gives ``Q diag(λ) Qᵀ + A Aᵀ``; ``Ê_r`` is the sum of its top ``r`` eigenvalues and
    the state keeps its top ``r + p`` pairs. The reference code solves the same eigenproblem on
    the basis ``[Q, Q_r]`` (``Q_r`` the residual's range); for transformer widths the ``[m, m]``
    form is cheaper: a trial needs only ``eigvalsh``, the truncation (one ``eigh``) runs when the
    state is extended. With ``r + p`` ≥ the columns added, nothing is truncated and the estimate
    is the exact error.
    """

    rank: int
    oversample: int = 5

    def start(self, blocks: list[Tensor]) -> GramState:
        m = _rows(blocks)
        state = GramState(torch.zeros(m, m, dtype=torch.float64, device=blocks[0].device),
                          torch.zeros(0, dtype=torch.float64, device=blocks[0].device), 0.0)
        for b in blocks:
            state = self.add(state, b)
        return state

    def _kept(self, state: GramState) -> Tensor:
        """``P`` truncated to its top ``r + p`` eigenpairs."""
        k = self.rank + self.oversample
        if int((state.lam > 0).sum()) <= k:
            return state.P
        if "kept" not in state.cache:
            lam, vec = _eig_desc(state.P)
            V = vec[:, :k]  # [m, k]
            state.cache["kept"] = (V * lam[:k]) @ V.T
        return state.cache["kept"]

    def add(self, state: GramState, A: Tensor) -> GramState:
        A = _f64(A)
        P = self._kept(state) + A @ A.T  # [m, m]
        return GramState(P, _eigvals_desc(P), state.total + float((A * A).sum()))

    def error(self, state: GramState, rank: int | None = None) -> float:
        return relative_error(state.total, float(state.lam[: _cap(rank, self.rank)].sum()))


def make_estimator(name: EstimatorName, rank: int, oversample: int = 5) -> Estimator:
    """The estimator called ``name`` (``approx``: truncated Gram; ``residual``; ``maxnorm``)."""
    if rank < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}")
    if name == "approx":
        return GramEstimator(rank, oversample)
    if name == "residual":
        return ResidualEstimator(rank)
    if name == "maxnorm":
        return MaxNormEstimator(rank)
    raise ValueError(f"unknown estimator {name!r} (approx, residual or maxnorm)")


# -- clustering --------------------------------------------------------------------------------
@dataclass
class Cluster:
    """Member indices (seed first, then in the order they were added), the estimator's error of
    the final cluster and the exact one, at ``rank``, against ``threshold``."""

    members: list[int]
    estimated: float
    exact: float
    rank: int = 0
    threshold: float = 0.0
    #: what ``confirm`` reported (e.g. the error in the cluster's own metric), when it was used
    confirmed: float | None = None


@dataclass
class Clustering:
    """The clusters (singletons included) plus what the search cost."""

    clusters: list[Cluster]
    rank: int  # the largest rank any cluster size gets (the estimator's)
    eps: float | None  # None: a threshold per cluster
    estimator: str
    #: estimator updates on candidates (a plain greedy would run an exact SVD for each)
    evaluations: int = 0
    #: exact SVDs run (one per final cluster, plus one per member dropped by a failed confirmation)
    exact_svds: int = 0
    seconds: float = 0.0
    labels: list[int] = field(default_factory=list)

    @property
    def svds_avoided(self) -> int:
        """Exact SVDs a greedy search with exact errors would have needed beyond those run."""
        return max(0, self.evaluations + len(self.clusters) - self.exact_svds)


def _seed(order: list[int], widths: list[int], rank: int) -> list[int]:
    """The largest block plus the next largest while the seed's column count stays ≤ ``rank``."""
    seed, cols = [order[0]], widths[order[0]]
    for j in order[1:]:
        if cols + widths[j] > rank:
            break
        seed.append(j)
        cols += widths[j]
    return seed


def _seed_basis(blocks: list[Tensor], seed: list[int], rank: int) -> Tensor:
    """Top-``rank`` left singular vectors of the seed (the ``residual`` sorting's reference)."""
    S = torch.cat([_f64(blocks[i]) for i in seed], dim=1)
    U, _ = left_factor(S, TOL)
    return U[:, :rank]


def _candidates(blocks: list[Tensor], rest: list[int], seed: list[int], norms: list[float],
                sorting: Sorting, rank: int) -> list[int]:
    if sorting == "norm":  # smallest-norm blocks first (stable: ties keep index order)
        return sorted(rest, key=lambda j: norms[j])
    if sorting != "residual":
        raise ValueError(f"unknown sorting {sorting!r} (residual or norm)")
    U = _seed_basis(blocks, seed, rank)

    def rel_residual(j: int) -> float:
        A = _f64(blocks[j])
        R = A - U @ (U.T @ A)
        return float(R.norm()) / max(math.sqrt(norms[j]), 1e-300)

    return sorted(rest, key=rel_residual)


RankRule = Union[int, Callable[[int], int]]
#: a fixed ε, or ``(members, base) ↦ ε`` with ``base`` the error of ``members[:-1]`` (None for a seed)
Threshold = Union[float, Callable[[list[int], Union[float, None]], float]]


def cluster_blocks(blocks: list[Tensor], rank: RankRule, eps: Threshold, *, estimator: EstimatorName = "approx",
                   sorting: Sorting = "residual", patience: int = 10, oversample: int = 5,
                   confirm: Callable[[list[int]], tuple[bool, float]] | None = None,
                   max_size: int | None = None) -> Clustering:
    """Greedy error-constrained clustering of ``blocks`` (each ``[m, n_i]``).

    Repeatedly: seed a cluster with the largest remaining block (plus neighbours while the seed
    has ≤ ``rank`` columns), try the other remaining blocks in ``sorting`` order, add each whose
    estimated error stays ≤ ``eps`` and stop at the first that does not. The final cluster is
    confirmed by an exact SVD; while it fails, its last-added member goes back to the pool.
    After ``patience`` singletons in a row every remaining block becomes a singleton.

    ``rank`` is the paper's fixed ``r`` or a rule ``t ↦ r_t`` for a cluster of ``t`` blocks (e.g.
    the rank a cluster can afford under a parameter budget); ``eps`` is the paper's fixed ``ε``
    or a rule ``(members, base) ↦ ε`` given the error ``base`` of the cluster before its last
    member joined (e.g. "adding this block costs no more than keeping it alone").

    ``confirm`` replaces the exact check of a final cluster: ``members ↦ (accepted, exact error)``
    (e.g. the error in a metric the blocks cannot share, such as the cluster's own whitening);
    each call counts as one exact SVD. ``max_size`` caps the blocks in one cluster.
    """
    ranks: Callable[[int], int] = rank if callable(rank) else (lambda t: rank)  # type: ignore[misc,assignment]
    limit: Callable[[list[int], float | None], float] = (
        eps if callable(eps) else (lambda members, base: eps))  # type: ignore[misc,assignment]
    if not callable(eps) and not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    if patience < 1:
        raise ValueError(f"patience must be ≥ 1, got {patience}")
    top = max((ranks(t) for t in range(1, len(blocks) + 1)), default=1)
    fixed = None if callable(eps) else float(eps)
    if not blocks:
        return Clustering([], top, fixed, estimator)
    _rows(blocks)
    t0 = time.perf_counter()
    est = make_estimator(estimator, top, oversample)
    norms = [float(_f64(b).pow(2).sum()) for b in blocks]
    widths = [int(b.shape[1]) for b in blocks]
    grams = [_f64(b) @ _f64(b).T for b in blocks]  # [m, m] each: exact errors by eigenvalues
    remaining = sorted(range(len(blocks)), key=lambda j: (-norms[j], j))
    result = Clustering([], top, fixed, estimator)

    def exact(members: list[int]) -> float:
        result.exact_svds += 1
        return exact_error([], ranks(len(members)), [grams[i] for i in members])

    def close(members: list[int], state: object, err: float, base: float | None,
              confirmed: float | None = None) -> None:
        k = ranks(len(members))
        result.clusters.append(Cluster(members, est.error(state, k), err, k, limit(members, base), confirmed))

    streak = 0
    while remaining:
        if streak >= patience:
            for j in remaining:
                close([j], est.start([blocks[j]]), exact([j]), None)
            break
        seed = _seed(remaining, widths, ranks(1))
        states = [est.start([blocks[i] for i in seed])]  # states[t]: the seed plus t added members
        members = list(seed)
        current = est.error(states[0], ranks(len(seed)))
        if current <= limit(seed, None):
            rest = [j for j in remaining if j not in seed]
            for j in _candidates(blocks, rest, seed, norms, sorting, ranks(1)):
                if max_size is not None and len(members) >= max_size:
                    break
                trial = est.add(states[-1], blocks[j])
                result.evaluations += 1
                err = est.error(trial, ranks(len(members) + 1))
                if err > limit([*members, j], current):
                    break
                states.append(trial)
                members.append(j)
                current = err
        if confirm is not None:
            result.exact_svds += 1
            ok, err = confirm(members)
            while not ok and len(members) > len(seed):
                members.pop()  # the last member goes back to the pool
                states.pop()
                result.exact_svds += 1
                ok, err = confirm(members)
            base = None if len(members) == len(seed) else exact(members[:-1])
            close(members, states[-1], exact(members), base, err)
        else:
            err = exact(members)
            base = exact(members[:-1]) if len(members) > len(seed) else None
            while base is not None and err > limit(members, base):
                members.pop()  # the estimator was optimistic: the last member goes back to the pool
                states.pop()
                err = base
                base = exact(members[:-1]) if len(members) > len(seed) else None
            close(members, states[-1], err, base)
        remaining = [j for j in remaining if j not in members]
        streak = streak + 1 if len(members) == 1 else 0
    labels = [0] * len(blocks)
    for c, cl in enumerate(result.clusters):
        for j in cl.members:
            labels[j] = c
    result.labels = labels
    result.seconds = time.perf_counter() - t0
    return result


def contiguous_groups(n: int, size: int) -> list[list[int]]:
    """Fixed contiguous groups ``[0..size-1], [size..2·size-1], …`` (Basis Sharing's grouping)."""
    if size < 1:
        raise ValueError(f"group size must be ≥ 1, got {size}")
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


# -- shared-basis factorisation ------------------------------------------------------------------
@dataclass
class SharedFactors:
    """``A_i ≈ U C_i`` for every member: ``U [m, k]`` shared, ``coefs[i] [k, n_i]``."""

    U: Tensor
    sigma: Tensor  # all singular values of the concatenation, descending
    coefs: list[Tensor]

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])


def left_singular(blocks: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Left singular vectors ``U [m, n]`` and singular values ``σ [n]`` (descending,
    ``n = min(m, Σ n_i)``) of the concatenation, from the eigenvectors of ``M Mᵀ = Σ A_i A_iᵀ``
    (float64; the wide ``M`` is never formed)."""
    m = _rows(blocks)
    lam, vec = torch.linalg.eigh(sum(_f64(a) @ _f64(a).T for a in blocks))  # [m, m], ascending
    n = min(m, sum(int(a.shape[1]) for a in blocks))
    return vec.flip(1)[:, :n], lam.flip(0)[:n].clamp_min(0.0).sqrt()


def shared_factors(blocks: list[Tensor], rank: int) -> SharedFactors:
    """Truncated SVD of the concatenation: the top-``rank`` left singular vectors as the shared
    basis and each block's projection onto it as its coefficients (float64)."""
    U, sigma = left_singular(blocks)
    if not 1 <= rank <= sigma.numel():
        raise ValueError(f"rank must be in [1, {sigma.numel()}], got {rank}")
    Uk = U[:, :rank]  # [m, k]
    return SharedFactors(Uk, sigma, [Uk.T @ _f64(a) for a in blocks])


def allocate_ranks(spectra: list[Tensor], costs: list[int], budget: int, *, min_rank: int = 1,
                   max_ranks: list[int] | None = None) -> list[int]:
    """Ranks per unit maximising the captured energy ``Σ_u Σ_{j≤r_u} σ_{u,j}²`` under
    ``Σ_u r_u · cost_u ≤ budget``: every unit starts at ``min_rank``, then the next singular
    direction with the most energy per parameter is added while it fits (greedy; the energies
    of one unit decrease, so this is the optimum of the fractional problem).
    """
    import heapq

    n = len(spectra)
    caps = [min(int(s.numel()), max_ranks[u] if max_ranks else int(s.numel())) for u, s in enumerate(spectra)]
    ranks = [min(min_rank, caps[u]) for u in range(n)]
    left = budget - sum(r * c for r, c in zip(ranks, costs))
    if left < 0:
        raise ValueError(f"budget {budget} is below the minimum {budget - left} (rank {min_rank} everywhere)")
    energy = [(s.double() ** 2).tolist() for s in spectra]
    heap = [(-energy[u][ranks[u]] / costs[u], u) for u in range(n) if ranks[u] < caps[u]]
    heapq.heapify(heap)
    while heap:
        _, u = heapq.heappop(heap)
        if costs[u] > left:
            continue  # this unit no longer fits; cheaper ones still may
        ranks[u] += 1
        left -= costs[u]
        if ranks[u] < caps[u]:
            heapq.heappush(heap, (-energy[u][ranks[u]] / costs[u], u))
    return ranks


# -- whitened weights of one role across layers --------------------------------------------------
def mean_gram(grams: list[Tensor]) -> Tensor:
    """The average of Grams each scaled to mean diagonal 1: one whitening for a role across layers
    that weighs every layer's input distribution equally (float64)."""
    out = None
    for G in grams:
        G = G.to(torch.float64)
        scale = float(G.diagonal().mean())
        if not scale > 0:
            raise ValueError("a Gram matrix has a zero or negative mean diagonal")
        out = G / scale if out is None else out + G / scale
    if out is None:
        raise ValueError("no Gram matrices")
    return out / len(grams)


def refit_coefficients(B: Tensor, W: Tensor, G: Tensor, damp: float = 1e-8) -> Tensor:
    """Coefficients ``C [k, out]`` minimising the output error ``‖X (Wᵀ − B C)‖_F`` for a fixed
    basis ``B [in, k]`` and ``G = XᵀX``: ``C = (BᵀGB)⁻¹ BᵀG Wᵀ`` (float64, damped by
    ``damp · mean diag(BᵀGB)``; least squares when the system stays singular)."""
    B, W, G = B.to(torch.float64), W.to(torch.float64), G.to(torch.float64)
    H = B.T @ G @ B  # [k, k]
    rhs = B.T @ G @ W.T  # [k, out]
    scale = float(H.diagonal().mean())
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError("the basis sees no input energy (BᵀGB has a zero diagonal)")
    H = 0.5 * (H + H.T) + damp * scale * torch.eye(H.shape[0], dtype=torch.float64, device=H.device)
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, L)
    return torch.linalg.lstsq(H, rhs).solution
