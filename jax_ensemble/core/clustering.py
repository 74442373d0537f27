"""Group tasks by their affinity matrix T (n × n, symmetric): the SDP relaxation of
docs/method.md §5 and baselines.

- :func:`sdp_cluster_matrix`: maximise ⟨T, X⟩ s.t. X ⪰ 0, X ≥ 0, X·1 = 1, tr X = m
  (an exact m-clustering is X = Σ_k 1_{C_k}1_{C_k}ᵀ/|C_k|) by cvxpy's interior-point
  solvers or, past :data:`AUTO_LOWRANK_ABOVE` tasks, the low-rank factorisation of
  :mod:`jax_ensemble.core.lowrank_sdp`;
- :func:`round_similarity`: m clusters from a similarity matrix by average-linkage
  agglomeration on the cosine distance 1 − S_ij/√(S_ii S_jj), cut at m clusters. It
  looks at values only, never at positions, so permuting the tasks permutes the
  clusters (up to exact ties between unrelated pairs);
- :func:`spectral_similarity`: the normalised spectral embedding of T (shifted to be
  non-negative) as a Gram matrix, rounded the same way (spectral-clustering baseline);
- random partition, one group, one group per task;
- :func:`eigengap_num_groups`: m when not given: the largest gap between consecutive
  eigenvalues of the normalised affinity, over m = 2..⌊n/2⌋.

A partition is an (n,) int array of group ids, numbered by each group's smallest task.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import numpy as np
import scipy.cluster.hierarchy
import scipy.spatial.distance

from jax_ensemble.core import lowrank_sdp
from jax_ensemble.errors import ConfigError, SolverError

METHODS = ("sdp", "spectral", "random", "one", "each")
CVXPY_SOLVERS = ("CLARABEL", "SCS")
LOWRANK_SOLVER = "BURER_MONTEIRO"
SDP_SOLVERS = ("auto", *CVXPY_SOLVERS, LOWRANK_SOLVER)
AUTO_LOWRANK_ABOVE = 60
"""``auto`` uses CLARABEL up to this many tasks (n = 60: seconds) and the low-rank solver beyond."""


class Grouping(NamedTuple):
    """labels: (n,) group id of each task; method; info: solver status, objective,
    solve_seconds (SDP) or the seed (random)."""

    labels: np.ndarray
    method: str
    info: dict[str, Any]

    def groups(self) -> list[list[int]]:
        """The groups as sorted task-index lists, ordered by their smallest task."""
        return [np.flatnonzero(self.labels == g).tolist() for g in range(int(self.labels.max()) + 1)]


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Renumber group ids 0, 1, ... in order of each group's smallest task index."""
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(np.argsort(first))
    return order[np.searchsorted(np.unique(labels), labels)]


def partition_matrix(labels: np.ndarray) -> np.ndarray:
    """The normalised cluster matrix X = Σ_k 1_{C_k} 1_{C_k}ᵀ / |C_k| (n × n)."""
    same = labels[:, None] == labels[None, :]
    return same / same.sum(axis=1, keepdims=True)


def resolve_sdp_solver(solver: str, num_tasks: int) -> str:
    """The solver ``solver`` names for n = ``num_tasks`` (``auto``: by :data:`AUTO_LOWRANK_ABOVE`)."""
    if solver not in SDP_SOLVERS:
        raise ConfigError(f"clustering.solver must be one of {', '.join(SDP_SOLVERS)}; got {solver!r}")
    if solver == "auto":
        return LOWRANK_SOLVER if num_tasks > AUTO_LOWRANK_ABOVE else "CLARABEL"
    return solver


def sdp_cluster_matrix(
    affinity: np.ndarray, num_groups: int, *, solver: str = "auto", solver_options: dict[str, Any] | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Solve the SDP relaxation; returns X (n × n) and {solver, status, objective,
    solve_seconds} (the low-rank solver adds infeasibility, rank and iterations).
    ``solver_options`` go to cvxpy's solve or to :func:`lowrank_sdp.burer_monteiro`.
    Raises SolverError unless cvxpy reports ``optimal`` or the low-rank solve converged;
    ``auto`` falls back from a failed cvxpy solve to the low-rank solver (``fallback_from``
    in the info says why)."""
    t = np.asarray(affinity, np.float64)
    n = t.shape[0]
    resolved = resolve_sdp_solver(solver, n)
    if solver == "auto" and resolved != LOWRANK_SOLVER:
        try:
            return sdp_cluster_matrix(t, num_groups, solver=resolved, solver_options=solver_options)
        except SolverError as error:  # e.g. CLARABEL's 'optimal_inaccurate' on a degenerate (planted) instance
            x, info = sdp_cluster_matrix(t, num_groups, solver=LOWRANK_SOLVER)
            return x, {**info, "fallback_from": str(error)}
    solver = resolved
    start = time.perf_counter()
    if solver == LOWRANK_SOLVER:
        solution = lowrank_sdp.burer_monteiro(t, num_groups, **(solver_options or {}))
        x = np.asarray(solution.matrix, np.float64)
        info = {"solver": solver, "status": "converged" if bool(solution.converged) else "not converged",
                "objective": float(solution.objective), "solve_seconds": round(time.perf_counter() - start, 4),
                "infeasibility": float(solution.infeasibility), "rank": int(solution.factor.shape[1]),
                "outer_iterations": int(solution.outer_iterations),
                "inner_iterations": int(solution.inner_iterations)}
        if not solution.converged:
            raise SolverError(
                f"the low-rank grouping SDP did not converge (infeasibility {info['infeasibility']:.2g} after "
                f"{info['outer_iterations']} outer steps); try clustering.solver=CLARABEL, or a larger rank"
            )
        return (x + x.T) / 2, info
    import cvxpy as cp

    x = cp.Variable((n, n), PSD=True)
    problem = cp.Problem(cp.Maximize(cp.sum(cp.multiply(t, x))),
                         [x >= 0, cp.sum(x, axis=1) == 1, cp.trace(x) == num_groups])
    other = next(s for s in CVXPY_SOLVERS if s != solver)
    try:
        problem.solve(solver=solver, **(solver_options or {}))
    except cp.error.SolverError:
        raise SolverError(f"the grouping SDP failed in {solver} (no status); try clustering.solver={other}") from None
    seconds = time.perf_counter() - start
    if problem.status != cp.OPTIMAL:
        raise SolverError(
            f"the grouping SDP ended with status {problem.status!r} in {solver}, not optimal; "
            f"try clustering.solver={other}"
        )
    info = {"solver": solver, "status": problem.status, "objective": float(problem.value),
            "solve_seconds": round(seconds, 4)}
    return (x.value + x.value.T) / 2, info


def round_similarity(similarity: np.ndarray, num_groups: int) -> np.ndarray:
    """(n,) labels: average-linkage agglomeration on 1 − S_ij/√(S_ii S_jj), cut at m groups."""
    s = np.asarray(similarity, np.float64)
    scale = np.sqrt(np.clip(np.diag(s), 1e-12, None))
    distance = np.clip(1.0 - s / np.outer(scale, scale), 0.0, None)
    np.fill_diagonal(distance, 0.0)
    tree = scipy.cluster.hierarchy.linkage(scipy.spatial.distance.squareform((distance + distance.T) / 2), "average")
    return canonical_labels(scipy.cluster.hierarchy.cut_tree(tree, n_clusters=num_groups)[:, 0])


def _normalised_affinity(affinity: np.ndarray) -> np.ndarray:
    """D^{-1/2} A D^{-1/2} with A = T shifted so its off-diagonal minimum is 0, zero diagonal."""
    t = np.asarray(affinity, np.float64)
    off = ~np.eye(len(t), dtype=bool)
    a = np.where(off, t - t[off].min(), 0.0) + 1e-12 * off
    d = 1.0 / np.sqrt(a.sum(axis=1))
    return a * d[:, None] * d[None, :]


def spectral_similarity(affinity: np.ndarray, num_groups: int) -> np.ndarray:
    """U Uᵀ with U the m leading eigenvectors of the normalised affinity, rows scaled to
    unit length (Ng–Jordan–Weiss embedding)."""
    _, vectors = np.linalg.eigh(_normalised_affinity(affinity))
    u = vectors[:, -num_groups:]
    u = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    return u @ u.T


def eigengap_num_groups(affinity: np.ndarray) -> int:
    """argmax over m ∈ 2..⌊n/2⌋ (groups of two tasks on average at least) of μ_m − μ_{m+1},
    μ the normalised affinity's eigenvalues in descending order; 1 for n ≤ 3."""
    n = len(affinity)
    if n <= 3:
        return 1
    mu = np.linalg.eigvalsh(_normalised_affinity(affinity))[::-1]
    top = n // 2
    return int(np.argmax(mu[1:top] - mu[2 : top + 1]) + 2)


def random_partition(num_tasks: int, num_groups: int, seed: int) -> np.ndarray:
    """(n,) labels of a uniformly shuffled split into m groups of sizes differing by ≤ 1."""
    labels = np.arange(num_tasks) % num_groups
    return canonical_labels(np.random.default_rng(seed).permutation(labels))


def cluster(
    affinity: np.ndarray,
    *,
    method: str = "sdp",
    num_groups: int = 0,
    solver: str = "auto",
    seed: int = 0,
    solver_options: dict[str, Any] | None = None,
) -> Grouping:
    """Group the n tasks of ``affinity`` by ``method`` (one of :data:`METHODS`);
    ``num_groups`` 0 picks m by :func:`eigengap_num_groups` (``one``/``each`` ignore it)."""
    t = np.asarray(affinity, np.float64)
    n = t.shape[0]
    if t.shape != (n, n) or not np.allclose(t, t.T) or not np.isfinite(t).all():
        raise ConfigError(f"the affinity matrix must be square, symmetric and finite; got shape {t.shape}")
    if method not in METHODS:
        raise ConfigError(f"clustering.method must be one of {', '.join(METHODS)}; got {method!r}")
    if method == "one":
        return Grouping(np.zeros(n, int), method, {})
    if method == "each":
        return Grouping(np.arange(n), method, {})
    m = num_groups or eigengap_num_groups(t)
    if not 1 <= m <= n:
        raise ConfigError(f"clustering.num_groups must be in [1, {n}] for {n} tasks (0: eigengap), got {m}")
    info: dict[str, Any] = {"num_groups": m, "num_groups_from": "config" if num_groups else "eigengap"}
    if method == "random":
        return Grouping(random_partition(n, m, seed), method, {**info, "seed": seed})
    if method == "spectral":
        return Grouping(round_similarity(spectral_similarity(t, m), m), method, info)
    x, sdp_info = sdp_cluster_matrix(t, m, solver=solver, solver_options=solver_options)
    return Grouping(round_similarity(x, m), method, {**info, **sdp_info})
