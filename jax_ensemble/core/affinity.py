"""Task subsets, their estimated fine-tuning outcomes and the task-affinity matrix.

docs/method.md §3–4 over plain arrays. With N examples of n tasks:

- G: (N, d) projected gradients of the binary log-odds, or (N, K, d) of K logits;
- f0: (N,) or (N, K) base outputs; labels: (N,) (binary: 1 where the log-odds favour the
  gold answer, which is every row with the gold-relative log-odds of
  :func:`jax_ensemble.core.linearize.classification_output`);
- task_ids: (N,) in 0..n−1; train_mask, val_mask: (N,) bool.

For each subset S (a row of a (S, n) bool membership matrix) one regression
ŵ_S = argmin Σ_{i ∈ train(S)} b_i ℓ(y_i, f0_i + ⟨g_i, w⟩) + λ‖w‖² (b_i the optional
per-task balancing weight), all subsets in one vmapped solve; each task is then scored on
its validation rows under the linear estimate f0 + ⟨g, ŵ_S⟩ (mean loss and accuracy).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_ensemble.core import solvers
from jax_ensemble.errors import ConfigError, DataError, NumericalError

AFFINITY_METRICS = ("loss", "accuracy")
"""Per-task scores an affinity can average: minus the validation loss, or the accuracy."""


def metric_scores(loss: np.ndarray, accuracy: np.ndarray, metric: str) -> np.ndarray:
    """The per-(subset, task) scores an affinity averages for ``metric`` (one of
    :data:`AFFINITY_METRICS`): minus the validation loss, or the accuracy (higher is better)."""
    return -np.asarray(loss) if metric == "loss" else np.asarray(accuracy)


def subset_size(num_tasks: int, fraction: float) -> int:
    """⌈fraction·n⌉ tasks per subset, at least 2 (a pair) and at most n."""
    return min(num_tasks, max(2, math.ceil(fraction * num_tasks - 1e-9)))


def sample_subsets(num_tasks: int, num_subsets: int, *, fraction: float = 0.3, seed: int = 0,
                   containing: int | None = None) -> np.ndarray:
    """(num_subsets, num_tasks) bool membership matrix of distinct subsets of size
    :func:`subset_size`, deterministic for ``seed``; with ``containing`` = t, every subset
    holds task t and only the pairs (t, j) count for coverage (a task added to a run).

    Pair coverage: while some pair of tasks has not yet appeared together, a new subset
    starts from a uniformly drawn uncovered pair and grows greedily, each added task
    covering the most uncovered pairs with the members (ties drawn at random). Every
    subset then covers at least one new pair, so all n(n−1)/2 pairs co-occur once
    ``num_subsets`` ≥ n(n−1)/2, and in practice near the bound ⌈C(n,2)/C(k,2)⌉ (15 for
    n = 10, k = 3). Afterwards subsets are uniform draws; duplicates are redrawn.
    O(n·k) per subset (uncovered pairs counted per task, gains updated per added task):
    10,000 subsets of 1,000 tasks take about a second."""
    if num_tasks < 2:
        raise DataError(f"task affinity needs at least 2 tasks, got {num_tasks}")
    k = subset_size(num_tasks, fraction)
    distinct = math.comb(num_tasks, k) if containing is None else math.comb(num_tasks - 1, k - 1)
    if num_subsets < 1 or num_subsets > distinct:
        raise ConfigError(
            f"affinity.num_subsets must be in [1, {distinct}] (distinct subsets of {k} of {num_tasks} tasks"
            f"{'' if containing is None else f' holding task {containing}'}), got {num_subsets}"
        )
    rng = np.random.default_rng(seed)
    covered = np.eye(num_tasks, dtype=bool)
    if containing is not None:  # only the pairs of task ``containing`` are to cover
        covered = ~covered
        covered[containing, :] = covered[:, containing] = False
        covered[containing, containing] = True
    row_uncovered = np.triu(~covered, 1).sum(axis=1)  # per task i: uncovered pairs (i, j > i)
    seen: set[tuple[int, ...]] = set()
    subsets = np.zeros((num_subsets, num_tasks), dtype=bool)
    for s in range(num_subsets):
        while True:
            total = int(row_uncovered.sum())
            if total:
                members = list(_uncovered_pair(covered, row_uncovered, int(rng.integers(total))))
                gain = (~covered[:, members[0]]).astype(np.int64) + ~covered[:, members[1]]
                while len(members) < k:
                    score = gain.astype(float)
                    score[members] = -1
                    members.append(int(rng.choice(np.flatnonzero(score == score.max()))))
                    gain += ~covered[:, members[-1]]
            elif containing is None:
                members = list(rng.choice(num_tasks, size=k, replace=False))
            else:
                others = np.delete(np.arange(num_tasks), containing)
                members = [containing, *rng.choice(others, size=k - 1, replace=False)]
            key = tuple(sorted(int(m) for m in members))
            if key not in seen:
                break
        seen.add(key)
        subsets[s, list(key)] = True
        covered[np.ix_(key, key)] = True
        for i in key:
            row_uncovered[i] = np.count_nonzero(~covered[i, i + 1 :])
    return subsets


def _uncovered_pair(covered: np.ndarray, row_uncovered: np.ndarray, index: int) -> tuple[int, int]:
    """The ``index``-th uncovered pair (i < j) in row-major order, in O(n)."""
    ends = np.cumsum(row_uncovered)
    i = int(np.searchsorted(ends, index, side="right"))
    offset = index - int(ends[i] - row_uncovered[i])
    return i, i + 1 + int(np.flatnonzero(~covered[i, i + 1 :])[offset])


def balancing_weights(task_ids: np.ndarray, train_mask: np.ndarray, num_tasks: int) -> np.ndarray:
    """(N,) per-example weights that upsample small tasks: a training row of task t weighs
    max_u N_u / N_t (N_t = training rows of t), so every task's rows sum to the largest
    task's count; other rows weigh 1."""
    counts = np.bincount(task_ids[train_mask], minlength=num_tasks).astype(np.float64)
    scale = counts.max() / np.maximum(counts, 1)
    return np.where(train_mask, scale[task_ids], 1.0).astype(np.float32)


def check_inputs(
    features: np.ndarray, offsets: np.ndarray, labels: np.ndarray, task_ids: np.ndarray,
    train_mask: np.ndarray, val_mask: np.ndarray, num_tasks: int,
) -> None:
    """NumericalError on non-finite gradients or outputs; DataError for a task without
    train/validation rows or labels outside the outputs' classes."""
    for name, x in (("projected gradients G", features), ("base outputs f0", offsets)):
        bad = ~np.isfinite(x).reshape(len(x), -1).all(axis=1)
        if bad.any():
            raise NumericalError(
                f"{name} hold NaN/inf in {int(bad.sum())} of {len(x)} rows (first: row {int(np.argmax(bad))}); "
                "recompute the gradients stage (e.g. with model.compute_dtype=float32)"
            )
    for split, mask in (("training", train_mask), ("validation", val_mask)):
        missing = np.setdiff1d(np.arange(num_tasks), task_ids[mask])
        if len(missing):
            raise DataError(f"task {int(missing[0])} has no {split} rows: every task needs both splits")
    if offsets.ndim == 2 and (labels.min() < 0 or labels.max() >= offsets.shape[1]):
        raise DataError(f"labels must lie in 0..{offsets.shape[1] - 1} for {offsets.shape[1]}-way outputs")


class Estimates(NamedTuple):
    """Per-(subset, task) validation estimates under f0 + ⟨g, ŵ_S⟩ (leading axis S).

    loss, accuracy: (S, n) mean validation loss / accuracy of every task (tasks outside
    S too: transfer); solution: the regressions (params (S, d), convergence report)."""

    loss: jax.Array
    accuracy: jax.Array
    solution: solvers.Solution


def subset_rows(subsets: np.ndarray, task_ids: np.ndarray, train_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows (S, m) int32, valid (S, m) bool): each subset's training rows (rows i with
    train_mask[i] and task_ids[i] ∈ S), padded to the largest subset's m with row 0."""
    member = np.asarray(subsets, bool)[:, task_ids] & np.asarray(train_mask, bool)[None, :]
    m = int(member.sum(axis=1).max())
    rows = np.argsort(~member, axis=1, kind="stable")[:, :m]
    return rows.astype(np.int32), np.take_along_axis(member, rows, axis=1)


SOLVE_MEMORY_BYTES = 2 * 1024**3
"""Working set the subsets' solves may take at once (:func:`solve_chunk_size`)."""


def solve_chunk_size(method: str, num_subsets: int, rows: int, classes: int, dim: int) -> int | None:
    """Subsets to solve at once so that their float32 working set stays under
    :data:`SOLVE_MEMORY_BYTES`; None when all ``num_subsets`` fit. Per subset of ``rows``
    rows (Newton: its own rows; L-BFGS: all rows, masked) with K = ``classes`` outputs:
    Newton holds the d × d Hessian and its gathered (rows, K, d) features, L-BFGS a few
    (rows, K) vectors and its 2·10 curvature pairs of d."""
    per_subset = 4 * (dim * dim + 2 * rows * classes * dim if method == "newton" else 4 * rows * classes + 20 * dim)
    if num_subsets * per_subset <= SOLVE_MEMORY_BYTES:
        return None
    return max(1, SOLVE_MEMORY_BYTES // per_subset)


def estimate_subsets(
    features: jax.Array,
    offsets: jax.Array,
    labels: jax.Array,
    task_ids: np.ndarray,
    train_mask: np.ndarray,
    val_mask: np.ndarray,
    subsets: np.ndarray,
    *,
    l2: float,
    example_weights: np.ndarray | None = None,
    method: str = "auto",
    chunk_size: int | None = None,
) -> Estimates:
    """All subsets' regressions and validation scores in one jitted, vmapped program.

    subsets: (S, n) bool; example_weights: (N,) (e.g. :func:`balancing_weights`; None:
    all 1). With Newton, subset S trains on its rows only (:func:`subset_rows`: its Hessian
    costs O(rows·d²)); L-BFGS weighs all N rows by a 0/1 mask instead, so its products with
    G are one matrix product over all subsets. ``chunk_size`` subsets are solved at once
    (None: :func:`solve_chunk_size`, all of them unless that exceeds the memory budget)."""
    base = np.ones(len(task_ids), np.float32) if example_weights is None else np.asarray(example_weights, np.float32)
    resolved = solvers.resolve_method(method, features.shape[-1])
    if resolved == "newton":
        rows, valid = subset_rows(subsets, task_ids, train_mask)
        weights, rows = jnp.asarray(valid * base[rows]), jnp.asarray(rows)
    else:
        weights, rows = jnp.asarray(np.asarray(subsets, bool)[:, task_ids] * (train_mask * base)), None
    if chunk_size is None:
        classes = 1 if features.ndim == 2 else features.shape[1]
        chunk_size = solve_chunk_size(resolved, len(subsets), weights.shape[1], classes, features.shape[-1])
    solution = solvers.solve_many(features, offsets, labels, weights, l2, rows=rows, method=method,
                                  chunk_size=chunk_size)
    val_of_task = np.eye(subsets.shape[1], dtype=np.float32)[task_ids] * np.asarray(val_mask, np.float32)[:, None]
    return _score(solution, features, offsets, labels, jnp.asarray(val_of_task))


@jax.jit
def _score(solution: solvers.Solution, features, offsets, labels, val_of_task) -> Estimates:
    outputs = solvers.predictions(solution.params, features, offsets)  # (S, N) or (S, N, K)
    losses = jax.vmap(solvers.example_losses, in_axes=(0, None))(outputs, labels)
    hits = jax.vmap(solvers.correct, in_axes=(0, None))(outputs, labels).astype(jnp.float32)
    counts = val_of_task.sum(axis=0)  # val_of_task: (N, n) one-hot task of each validation row
    return Estimates(losses @ val_of_task / counts, hits @ val_of_task / counts, solution)


def affinity_matrix(scores: np.ndarray, subsets: np.ndarray) -> np.ndarray:
    """(n, n) symmetric task affinity T from (S, n) scores (higher is better, e.g. minus
    the validation loss) and the (S, n) membership matrix (docs/method.md §4).

    z_i(S) = (score_i(S) − mean_i) / std_i over the subsets containing i (std 0: z = 0);
    A[i, j] = mean of z_i(S) over subsets S ∋ i, j (pairs that never co-occur: 0, the
    neutral value); T = (A + Aᵀ)/2 with a zero diagonal (it carries no information)."""
    scores = np.asarray(scores, np.float64)
    member = np.asarray(subsets, bool)
    count = member.sum(axis=0)
    if (count == 0).any():
        raise DataError(f"task {int(np.argmin(count))} is in no sampled subset: raise affinity.num_subsets")
    mean = np.where(member, scores, 0).sum(axis=0) / count
    std = np.sqrt(np.where(member, (scores - mean) ** 2, 0).sum(axis=0) / count)
    z = np.where(member & (std > 0), (scores - mean) / np.where(std > 0, std, 1), 0.0)
    together = member.T.astype(np.float64) @ member  # (n, n) co-occurrence counts
    a = np.where(together > 0, (z.T @ member) / np.maximum(together, 1), 0.0)
    t = (a + a.T) / 2
    np.fill_diagonal(t, 0.0)
    return t


def pair_coverage(subsets: np.ndarray) -> float:
    """Fraction of task pairs that co-occur in at least one subset."""
    member = np.asarray(subsets, np.int64)
    upper = np.triu_indices(member.shape[1], k=1)
    return float(np.mean((member.T @ member)[upper] > 0))
