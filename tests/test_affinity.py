"""Subset sampling, per-subset estimates (against scikit-learn fits) and the affinity matrix."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from jax_ensemble.core import affinity, solvers
from jax_ensemble.errors import ConfigError, DataError, NumericalError


def test_subsets_distinct_sized_seeded_and_cover_pairs():
    subsets = affinity.sample_subsets(10, 50, fraction=0.3, seed=3)
    assert subsets.shape == (50, 10) and (subsets.sum(axis=1) == 3).all()
    assert len({tuple(row) for row in subsets}) == 50
    np.testing.assert_array_equal(subsets, affinity.sample_subsets(10, 50, fraction=0.3, seed=3))
    assert not np.array_equal(subsets, affinity.sample_subsets(10, 50, fraction=0.3, seed=4))
    assert affinity.pair_coverage(subsets[:20]) == 1.0  # 45 pairs, 3 per subset: the bound is 15
    assert affinity.pair_coverage(affinity.sample_subsets(30, 50, seed=0)) == 1.0  # k = 9: 435 pairs, 36 per subset
    every_pair = affinity.sample_subsets(6, 15, fraction=0.3, seed=0)  # k = 2: the 15 subsets are the 15 pairs
    assert affinity.pair_coverage(every_pair) == 1.0 and len({tuple(r) for r in every_pair}) == 15
    with pytest.raises(ConfigError, match="num_subsets must be in"):
        affinity.sample_subsets(6, 16, fraction=0.3)
    assert affinity.subset_size(10, 0.3) == 3 and affinity.subset_size(11, 0.3) == 4 and affinity.subset_size(3, 0.1) == 2


def test_subsets_at_scale_draw_only_uncovered_pairs():
    """Pairs of 200 tasks, as many subsets as pairs: each subset starts from an uncovered
    pair (found by per-task counts, not a scan of the n × n matrix), so the 19,900 subsets
    are the 19,900 pairs, each once."""
    pairs = affinity.sample_subsets(200, math.comb(200, 2), fraction=0.01, seed=0)
    assert (pairs.sum(axis=1) == 2).all() and affinity.pair_coverage(pairs) == 1.0
    assert len({tuple(np.flatnonzero(row)) for row in pairs}) == math.comb(200, 2)
    large = affinity.sample_subsets(1000, 200, fraction=0.005, seed=0)  # k = 5: 10 new pairs per subset
    together = large.T.astype(int) @ large
    assert together[np.triu_indices(1000, 1)].max() == 1  # no pair twice while most are uncovered


def test_subsets_containing_a_task_cover_its_pairs_first():
    held = affinity.sample_subsets(11, 4, fraction=0.3, seed=0, containing=10)  # k = 4: 3 partners each
    assert held[:, 10].all() and (held.sum(axis=1) == 4).all()
    assert held[:, :10].any(axis=0).sum() == 10  # 10 partners in ⌈10/3⌉ = 4 subsets: every pair (10, j)
    every = affinity.sample_subsets(11, math.comb(10, 3), fraction=0.3, seed=1, containing=10)
    assert len({tuple(np.flatnonzero(row)) for row in every}) == math.comb(10, 3) and every[:, 10].all()
    with pytest.raises(ConfigError, match=r"\[1, 120\] .* holding task 10"):
        affinity.sample_subsets(11, 121, fraction=0.3, containing=10)


def test_solve_chunk_size_bounds_the_working_set():
    per_subset = 4 * (400 * 400 + 2 * 100 * 400)  # Newton, d = 400, 100 rows, binary
    chunk = affinity.solve_chunk_size("newton", 10_000, 100, 1, 400)
    assert chunk * per_subset <= affinity.SOLVE_MEMORY_BYTES < (chunk + 1) * per_subset
    assert affinity.solve_chunk_size("newton", 50, 100, 1, 400) is None
    assert affinity.solve_chunk_size("lbfgs", 10_000, 30_000, 1, 400) is not None


def _tasks(num_tasks=5, per_task=(60, 30, 90, 45, 75), d=8, seed=0):
    """Binary tasks whose labels follow task-specific directions (tasks 0-1 and 2-4 share one)."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(2, d))
    task_ids = np.repeat(np.arange(num_tasks), per_task)
    g = rng.normal(size=(len(task_ids), d)).astype(np.float32)
    w = directions[(task_ids >= 2).astype(int)]
    labels = ((g * w).sum(1) + 0.5 * rng.normal(size=len(task_ids)) > 0).astype(np.float32)
    val_mask = np.zeros(len(task_ids), bool)
    for t in range(num_tasks):
        val_mask[np.flatnonzero(task_ids == t)[: per_task[t] // 3]] = True
    return g, labels, task_ids, ~val_mask, val_mask


@pytest.mark.parametrize("method", ["newton", "lbfgs"])  # rows gathered per subset / masked shared rows
@pytest.mark.parametrize("balance", [False, True])
def test_estimates_match_sklearn_fits_subset_by_subset(balance, method):
    g, labels, task_ids, train, val = _tasks()
    subsets = affinity.sample_subsets(5, 6, fraction=0.4, seed=1)
    weights = affinity.balancing_weights(task_ids, train, 5) if balance else np.ones(len(labels), np.float32)
    l2 = 0.5
    est = affinity.estimate_subsets(jnp.array(g), jnp.zeros(len(labels)), jnp.array(labels), jnp.array(task_ids),
                                    jnp.array(train), jnp.array(val), jnp.array(subsets), l2=l2,
                                    example_weights=jnp.array(weights), method=method,
                                    chunk_size=4 if balance else None)  # balanced: also the chunked (lax.map) path
    assert bool(est.solution.converged.all())
    for s, members in enumerate(subsets):
        rows = train & members[task_ids]
        ref = LogisticRegression(C=1 / (2 * l2), fit_intercept=False, tol=1e-12, max_iter=10_000)
        ref.fit(g[rows].astype(np.float64), labels[rows], sample_weight=weights[rows])
        np.testing.assert_allclose(est.solution.params[s], ref.coef_[0], rtol=1e-4, atol=1e-5)
        for t in range(5):
            v = val & (task_ids == t)
            expected_loss = log_loss(labels[v], ref.predict_proba(g[v])[:, 1], labels=[0, 1])
            assert float(est.loss[s, t]) == pytest.approx(expected_loss, rel=1e-4)
            assert float(est.accuracy[s, t]) == pytest.approx(np.mean(ref.predict(g[v]) == labels[v]))


def test_balancing_weights_equalise_tasks():
    _, _, task_ids, train, _ = _tasks()
    w = affinity.balancing_weights(task_ids, train, 5)
    totals = np.bincount(task_ids[train], weights=w[train])
    np.testing.assert_allclose(totals, totals.max())
    assert (w[~train] == 1).all()


def test_softmax_estimates_match_one_by_one_solves_on_sliced_rows():
    rng = np.random.default_rng(2)
    n_ex, k, d = 120, 3, 6
    g = rng.normal(size=(n_ex, k, d)).astype(np.float32)
    f0 = rng.normal(size=(n_ex, k)).astype(np.float32)
    labels = rng.integers(0, k, n_ex).astype(np.int32)
    task_ids = np.arange(n_ex) % 4
    val = np.arange(n_ex) % 3 == 0
    subsets = affinity.sample_subsets(4, 2, fraction=0.5, seed=0)
    est = affinity.estimate_subsets(jnp.array(g), jnp.array(f0), jnp.array(labels), jnp.array(task_ids),
                                    jnp.array(~val), jnp.array(val), jnp.array(subsets), l2=0.2)
    for s, members in enumerate(subsets):
        rows = ~val & members[task_ids]
        one = solvers.newton(jnp.array(g[rows]), jnp.array(f0[rows]), jnp.array(labels[rows]),
                             jnp.ones(int(rows.sum())), 0.2)
        np.testing.assert_allclose(est.solution.params[s], one.params, rtol=1e-4, atol=1e-5)
        z = f0 + np.einsum("nkd,d->nk", g, np.asarray(one.params))
        nll = -(z[np.arange(n_ex), labels] - np.log(np.exp(z).sum(1)))
        for t in range(4):
            v = val & (task_ids == t)
            assert float(est.loss[s, t]) == pytest.approx(nll[v].mean(), rel=1e-4)
            assert float(est.accuracy[s, t]) == pytest.approx(np.mean(z[v].argmax(1) == labels[v]))


def _affinity_by_definition(scores, subsets):
    n = subsets.shape[1]
    z = np.zeros_like(scores)
    for i in range(n):
        rows = subsets[:, i]
        std = scores[rows, i].std()
        z[rows, i] = (scores[rows, i] - scores[rows, i].mean()) / std if std > 0 else 0
    a = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            both = subsets[:, i] & subsets[:, j]
            a[i, j] = z[both, i].mean() if both.any() else 0.0
    t = (a + a.T) / 2
    np.fill_diagonal(t, 0)
    return t


def test_affinity_matrix_definition_and_planted_groups():
    rng = np.random.default_rng(0)
    n = 8
    subsets = affinity.sample_subsets(n, 40, fraction=0.4, seed=0)
    group = np.arange(n) // 4
    # task i does better with every same-group partner in the subset
    same = (subsets[:, :, None] & subsets[:, None, :] & (group[:, None] == group[None, :])[None]).sum(2)
    scores = same + 0.1 * rng.normal(size=same.shape) + rng.normal(size=n) * 5  # task-specific offsets
    t = affinity.affinity_matrix(scores, subsets)
    np.testing.assert_allclose(t, _affinity_by_definition(scores, subsets), atol=1e-12)
    np.testing.assert_allclose(t, t.T)
    within = t[group[:, None] == group[None, :]][~np.eye(n, dtype=bool)[group[:, None] == group[None, :]]]
    assert within.min() > t[group[:, None] != group[None, :]].max()


def test_bad_inputs_are_reported():
    g, labels, task_ids, train, val = _tasks()
    g[7, 3] = np.nan
    with pytest.raises(NumericalError, match=r"projected gradients G hold NaN/inf in 1 of .* row 7"):
        affinity.check_inputs(g, np.zeros(len(labels)), labels, task_ids, train, val, 5)
    g[7, 3] = 0
    with pytest.raises(DataError, match="task 2 has no validation rows"):
        affinity.check_inputs(g, np.zeros(len(labels)), labels, task_ids, train, val & (task_ids != 2), 5)
    with pytest.raises(DataError, match="task 4 is in no sampled subset"):
        affinity.affinity_matrix(np.zeros((3, 5)), np.eye(5, dtype=bool)[[0, 1, 2]] | np.eye(5, dtype=bool)[[1, 2, 3]])
    assert math.isclose(affinity.pair_coverage(np.ones((1, 4), bool)), 1.0)
