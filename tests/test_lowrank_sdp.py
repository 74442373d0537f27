"""The low-rank (Burer–Monteiro) grouping SDP against cvxpy's interior point and planted optima."""

from __future__ import annotations

import numpy as np
import pytest
from test_clustering import _planted

from jax_ensemble.core import clustering, lowrank_sdp
from jax_ensemble.errors import ConfigError, SolverError


def _random(num_tasks, seed):
    t = np.random.default_rng(seed).normal(size=(num_tasks, num_tasks))
    t = (t + t.T) / 2
    np.fill_diagonal(t, 0)
    return t


@pytest.mark.parametrize("kind, sizes", [("planted", (10, 10, 10)), ("planted", (12, 10, 10, 8)),
                                         ("random", (8, 8, 8)), ("random", (10, 10, 10, 10))])
def test_matches_interior_point(kind, sizes):
    n, m = sum(sizes), len(sizes)
    t = _planted(sizes, noise=1.5, seed=m)[0] if kind == "planted" else _random(n, seed=n)
    _, reference = clustering.sdp_cluster_matrix(t, m, solver="CLARABEL")
    solution = lowrank_sdp.burer_monteiro(t, m)
    assert bool(solution.converged)
    assert float(solution.objective) == pytest.approx(reference["objective"], rel=0.01)
    x = np.asarray(solution.matrix, np.float64)
    np.testing.assert_allclose(x.sum(axis=1), 1.0, atol=1e-3)
    assert np.trace(x) == pytest.approx(m, rel=1e-3)
    assert x.min() >= -1e-3 * m / n  # X ≥ 0 up to the tolerance, relative to a cluster entry m/n
    assert float(solution.infeasibility) <= 1e-4


def test_planted_partition_at_scale():
    """Past the interior point's reach (auto picks the low-rank solver): the SDP's optimum is
    at least the planted partition's value (its X is feasible) and, with a clear planted
    structure, equal to it; the rounding recovers the planted groups."""
    t, planted = _planted((50,) * 6, noise=1.0, seed=3)
    grouping = clustering.cluster(t, num_groups=6, solver="auto")
    assert grouping.info["solver"] == clustering.LOWRANK_SOLVER and grouping.info["status"] == "converged"
    planted_value = float(np.sum(t * clustering.partition_matrix(planted)))
    assert grouping.info["objective"] == pytest.approx(planted_value, rel=1e-3)
    np.testing.assert_array_equal(grouping.labels, planted)


def test_invariances():
    """A positive scale of T changes nothing but the objective's scale; permuting the tasks
    permutes X."""
    t, _ = _planted((7, 7, 6), noise=0.5, seed=1)
    base = lowrank_sdp.burer_monteiro(t, 3)
    scaled = lowrank_sdp.burer_monteiro(7.0 * t, 3)
    assert float(scaled.objective) == pytest.approx(7.0 * float(base.objective), rel=1e-3)
    perm = np.random.default_rng(0).permutation(20)
    permuted = lowrank_sdp.burer_monteiro(t[np.ix_(perm, perm)], 3)
    assert float(permuted.objective) == pytest.approx(float(base.objective), rel=1e-3)
    np.testing.assert_allclose(np.asarray(permuted.matrix), np.asarray(base.matrix)[np.ix_(perm, perm)], atol=2e-3)


def test_auto_falls_back_from_a_failed_interior_point():
    """A planted instance on which CLARABEL ends 'optimal_inaccurate' (its optimum is a
    degenerate vertex): ``auto`` solves it with the low-rank solver and says why."""
    t, planted = _planted((12, 10, 10, 8), noise=1.2, seed=0)
    with pytest.raises(SolverError, match="optimal_inaccurate"):
        clustering.sdp_cluster_matrix(t, 4, solver="CLARABEL")
    grouping = clustering.cluster(t, num_groups=4, solver="auto")
    assert grouping.info["solver"] == clustering.LOWRANK_SOLVER and "optimal_inaccurate" in grouping.info["fallback_from"]
    _, scs = clustering.sdp_cluster_matrix(t, 4, solver="SCS")
    assert grouping.info["objective"] == pytest.approx(scs["objective"], rel=1e-3)


def test_resolve_and_errors():
    assert clustering.resolve_sdp_solver("auto", clustering.AUTO_LOWRANK_ABOVE) == "CLARABEL"
    assert clustering.resolve_sdp_solver("auto", clustering.AUTO_LOWRANK_ABOVE + 1) == clustering.LOWRANK_SOLVER
    with pytest.raises(ConfigError, match=r"rank must be in \[1, 5\]"):
        lowrank_sdp.burer_monteiro(np.eye(5), 2, rank=6)
    with pytest.raises(ConfigError, match=r"num_groups must be in \[1, 5\]"):
        lowrank_sdp.burer_monteiro(np.eye(5), 0)
