"""SDP grouping and baselines: planted structure, brute-force optimum, permutation invariance."""

from __future__ import annotations

import numpy as np
import pytest

from jax_ensemble.core import clustering
from jax_ensemble.errors import ConfigError, SolverError


def _planted(sizes=(4, 3, 3), noise=0.3, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    t = np.where(labels[:, None] == labels[None, :], 1.0, -0.5) + noise * rng.normal(size=(len(labels),) * 2)
    t = (t + t.T) / 2
    np.fill_diagonal(t, 0)
    return t, labels


def _partition(labels):
    return {frozenset(np.flatnonzero(labels == g).tolist()) for g in np.unique(labels)}


@pytest.mark.parametrize("method, solver", [("sdp", "CLARABEL"), ("sdp", "SCS"), ("sdp", "BURER_MONTEIRO"),
                                            ("spectral", "CLARABEL")])
def test_planted_groups_recovered_and_permutation_invariant(method, solver):
    t, planted = _planted()
    grouping = clustering.cluster(t, method=method, num_groups=3, solver=solver)
    assert _partition(grouping.labels) == _partition(planted)
    perm = np.random.default_rng(1).permutation(len(t))
    permuted = clustering.cluster(t[np.ix_(perm, perm)], method=method, num_groups=3, solver=solver)
    # task perm[i] of the original is task i of the permuted problem: same groups, relabelled
    assert _partition(permuted.labels[np.argsort(perm)]) == _partition(grouping.labels)
    if method == "sdp":
        status = "converged" if solver == clustering.LOWRANK_SOLVER else "optimal"
        assert grouping.info["status"] == status and grouping.info["solver"] == solver


def _all_partitions(items, m):
    """Every partition of ``items`` into exactly m non-empty blocks (brute force)."""
    if m == 1:
        yield [list(items)]
        return
    if len(items) < m:
        return
    first, rest = items[0], items[1:]
    for p in _all_partitions(rest, m - 1):
        yield [[first]] + p
    for p in _all_partitions(rest, m):
        for i in range(len(p)):
            yield p[:i] + [[first] + p[i]] + p[i + 1 :]


def test_sdp_bounds_brute_force_optimum_and_rounds_to_it():
    t, _ = _planted(sizes=(3, 2, 2), noise=0.6, seed=3)
    n, m = len(t), 3
    best_value, best = -np.inf, None
    for p in _all_partitions(list(range(n)), m):
        labels = np.empty(n, int)
        for g, block in enumerate(p):
            labels[block] = g
        value = float(np.sum(t * clustering.partition_matrix(labels)))
        if value > best_value:
            best_value, best = value, labels
    assert sum(1 for _ in _all_partitions(list(range(n)), m)) == 301  # Stirling S(7, 3)
    x, info = clustering.sdp_cluster_matrix(t, m, solver="CLARABEL")
    assert info["objective"] >= best_value - 1e-6  # a relaxation: never below the best partition
    np.testing.assert_allclose(x.sum(axis=1), 1, atol=1e-6)
    assert np.trace(x) == pytest.approx(m, abs=1e-6) and np.linalg.eigvalsh(x).min() > -1e-6
    rounded = clustering.round_similarity(x, m)
    assert float(np.sum(t * clustering.partition_matrix(rounded))) == pytest.approx(best_value)
    assert _partition(rounded) == _partition(best)
    lowrank, lowrank_info = clustering.sdp_cluster_matrix(t, m, solver=clustering.LOWRANK_SOLVER)
    assert lowrank_info["objective"] == pytest.approx(info["objective"], rel=1e-3)
    assert _partition(clustering.round_similarity(lowrank, m)) == _partition(best)


def test_baselines_and_num_groups():
    t, planted = _planted(sizes=(3, 3, 3, 3), noise=0.1)
    assert clustering.eigengap_num_groups(t) == 4
    auto = clustering.cluster(t, method="sdp")
    assert auto.info["num_groups"] == 4 and auto.info["num_groups_from"] == "eigengap"
    assert _partition(auto.labels) == _partition(planted)
    rand = clustering.cluster(t, method="random", num_groups=5, seed=7)
    assert sorted(np.bincount(rand.labels)) == [2, 2, 2, 3, 3]
    np.testing.assert_array_equal(rand.labels, clustering.cluster(t, method="random", num_groups=5, seed=7).labels)
    assert clustering.cluster(t, method="one").groups() == [list(range(12))]
    assert clustering.cluster(t, method="each").groups() == [[i] for i in range(12)]
    np.testing.assert_array_equal(clustering.canonical_labels(np.array([5, 2, 5, 0, 2])), [0, 1, 0, 2, 1])


def test_errors():
    t, _ = _planted()
    with pytest.raises(SolverError, match="grouping SDP .* try clustering.solver=CLARABEL"):
        clustering.cluster(t, num_groups=3, solver="SCS", solver_options={"max_iters": 2})
    with pytest.raises(ConfigError, match="clustering.method must be one of"):
        clustering.cluster(t, method="kmeans", num_groups=3)
    with pytest.raises(ConfigError, match=r"num_groups must be in \[1, 10\]"):
        clustering.cluster(t, num_groups=11)
    with pytest.raises(ConfigError, match="clustering.solver must be one of"):
        clustering.cluster(t, num_groups=3, solver="MOSEK")
    with pytest.raises(SolverError, match="low-rank grouping SDP did not converge .* try clustering.solver=CLARABEL"):
        clustering.cluster(t, num_groups=3, solver="BURER_MONTEIRO", solver_options={"max_outer": 1})
    with pytest.raises(ConfigError, match="symmetric and finite"):
        clustering.cluster(t + np.triu(np.ones_like(t)), num_groups=3)


@pytest.mark.parametrize("seed", [0, 1])
def test_unstructured_affinity_permutation_invariant(seed):
    """No planted structure: the rounding still depends on values only, not task order."""
    rng = np.random.default_rng(seed)
    t = rng.normal(size=(10, 10))
    t = (t + t.T) / 2
    np.fill_diagonal(t, 0)
    reference = _partition(clustering.cluster(t, num_groups=3).labels)
    for _ in range(2):
        perm = rng.permutation(10)
        permuted = clustering.cluster(t[np.ix_(perm, perm)], num_groups=3)
        assert _partition(permuted.labels[np.argsort(perm)]) == reference
