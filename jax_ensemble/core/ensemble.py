"""The grouped ensemble's array-level maths (docs/method.md §7): convex ensemble weights,
combining member logits, boosting residuals and step sizes, the closed-form ridge fit.

Everything here takes arrays; running adapters through a model is
:mod:`jax_ensemble.stages.ensemble`'s job. Shapes: M members; n (or N, B) rows; K label
choices (padded choices carry :data:`~jax_ensemble.core.losses.NO_CHOICE_LOGIT`); T tasks
(rows pick theirs by ``task_index``); b boosting adapters; d projection dimension.

- :func:`fit_convex_weights` / :func:`fit_ensemble_weights` — α_t ∈ Δ^M (α ≥ 0, Σα = 1)
  minimising the validation Σ_i w_i CE(Σ_m α_m z_m(x_i), y_i) of task t (cvxpy, Clarabel).
  Per task is the default: that is what the paper does (each task leans on the groups
  that help it); ``per_task=False`` fits one α for all rows.
- :func:`prune_weights` — α_t with entries below a threshold set to 0, renormalised.
- :func:`combine_logits` — Σ_m α[t_i, m] z_{m,i}; :func:`boosted_logits` — F + Σ_j η[j, t_i] (z_j − z_base).
- :class:`Ensemble` — members, α, boosting adapters and their per-task step sizes (pytrees).
- Routing: :func:`active_calls` (which members, boosters and the base model task t's rows
  need), :func:`restrict` (the ensemble of those only: same logits on t's rows),
  :func:`routed_passes` (adapter passes per row, routed and dense).
- Boosting: :func:`group_losses` (the group with the highest training loss gets the next
  learner), :func:`group_step_sizes`, :func:`boosting_offsets` (the fixed offset F − z_base
  a trained learner sees), and the closed form: :func:`residuals` r = onehot(y) − softmax(F),
  :func:`ridge_fit` w = (Σ_i w_i G_iᵀG_i + λI)⁻¹ Σ_i w_i G_iᵀ r_i on projected label-logit
  gradients G (:func:`logit_features`), :func:`closed_form_step`, :func:`linear_boost`.
  λ belongs on the scale of Σ_i w_i‖G_i‖²/d: too small a λ lets P·w leave the region where
  the network follows its linearization.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import cvxpy as cp
import jax
import jax.numpy as jnp
import numpy as np

from jax_ensemble.core.losses import NO_CHOICE_LOGIT, weighted_cross_entropy
from jax_ensemble.core.solvers import example_losses, predictions
from jax_ensemble.errors import DataError, NumericalError, SolverError

WEIGHTS_SOLVERS = ("CLARABEL", "SCS")
"""cvxpy solvers that fit the ensemble weights (exponential cone)."""

DEFAULT_STEP_SIZE = 0.2
"""η, the official boosting step size."""


def _valid_choices(logits: np.ndarray) -> np.ndarray:
    """(n,) number of real choices per row of logits (M, n, K) (padding is a suffix)."""
    return np.sum(logits[0] > NO_CHOICE_LOGIT / 2, axis=-1)


def ensemble_loss(alpha: np.ndarray, logits: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    """Σ_i w_i CE(Σ_m α_m z_{m,i}, y_i) / Σ_i w_i for α (M,), logits (M, n, K)."""
    z = jnp.einsum("m,mnk->nk", jnp.asarray(alpha, jnp.float32), jnp.asarray(logits, jnp.float32))
    total, weight = weighted_cross_entropy(z, jnp.asarray(labels), jnp.asarray(weights))
    return float(total / weight)


def fit_convex_weights(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray, *,
                       solver: str = "CLARABEL") -> np.ndarray:
    """α (M,) on the simplex minimising Σ_i w_i CE(Σ_m α_m z_{m,i}, y_i) / Σ_i w_i.

    logits (M, n, K) (padded choices NO_CHOICE_LOGIT), labels (n,), weights (n,) ≥ 0 (rows
    of weight 0 are dropped). Each row is shifted by its largest logit (CE is unchanged
    because Σα = 1) and its log-sum-exp runs over its real choices only. When the solver
    reports ``optimal_inaccurate`` (rows that some member separates with huge margins make
    the exponential cone ill-conditioned), the result is the best, by this objective, of its
    solution and the M single members. DataError if no row has positive weight;
    NumericalError on NaN/inf logits; SolverError for any other status."""
    keep = np.asarray(weights) > 0
    if not keep.any():
        raise DataError("no validation rows with positive weight to fit ensemble weights on")
    z = np.asarray(logits, np.float64)[:, keep]
    if not np.isfinite(z).all():
        raise NumericalError("member logits contain NaN/inf: check the adapters before fitting ensemble weights")
    y, w = np.asarray(labels)[keep], np.asarray(weights, np.float64)[keep]
    w = w / w.sum()
    choices = _valid_choices(z)
    m = z.shape[0]
    alpha = cp.Variable(m, nonneg=True)
    terms = []
    for k in np.unique(choices):
        rows = choices == k
        zk = z[:, rows, :k]
        zk = zk - zk.max(axis=(0, 2))[None, :, None]
        r = int(rows.sum())
        mixed = cp.reshape(zk.reshape(m, r * k).T @ alpha, (r, k), order="C")
        gold = zk[:, np.arange(r), y[rows]].T @ alpha
        terms.append(w[rows] @ (cp.log_sum_exp(mixed, axis=1) - gold))
    problem = cp.Problem(cp.Minimize(cp.sum(cp.hstack(terms))), [cp.sum(alpha) == 1])
    try:
        problem.solve(solver=solver)
    except cp.SolverError:
        raise SolverError(f"fitting ensemble weights failed in {solver}; try another cvxpy solver (e.g. SCS)") from None
    if problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) or alpha.value is None:
        raise SolverError(f"fitting ensemble weights ended with status {problem.status!r} in {solver}, not optimal; "
                          "try another cvxpy solver (e.g. SCS)")
    a = np.clip(np.asarray(alpha.value, np.float64), 0.0, None)
    a = a / a.sum()
    if problem.status == cp.OPTIMAL_INACCURATE:  # near-separable rows: keep the better of it and every vertex
        candidates = [a, *np.eye(m)]
        a = min(candidates, key=lambda c: ensemble_loss(c, z, y, w))
    return a


def fit_ensemble_weights(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray, task_index: np.ndarray,
                         num_tasks: int, *, per_task: bool = True, solver: str = "CLARABEL") -> np.ndarray:
    """α (T, M): row t the convex weights used for task t's rows (:func:`fit_convex_weights`
    on task t's validation rows when ``per_task``, else one α fitted on all rows and
    repeated). logits (M, n, K); labels, weights, task_index (n,). DataError names a task
    without validation rows."""
    task_index = np.asarray(task_index)
    if not per_task:
        return np.tile(fit_convex_weights(logits, labels, weights, solver=solver), (num_tasks, 1))
    alphas = []
    for t in range(num_tasks):
        rows = task_index == t
        if not (np.asarray(weights)[rows] > 0).any():
            raise DataError(f"task {t} has no validation rows to fit its ensemble weights on")
        alphas.append(fit_convex_weights(logits[:, rows], labels[rows], weights[rows], solver=solver))
    return np.stack(alphas)


def prune_weights(weights: np.ndarray, threshold: float) -> np.ndarray:
    """α (T, M) with every entry below ``threshold`` set to 0 and each row renormalised to
    sum 1 (a row's largest entry always stays). A member pruned for task t is then not run
    on t's rows at all (:func:`active_calls`); ``threshold`` 0 keeps α as it is."""
    alpha = np.asarray(weights, np.float64)
    keep = (alpha >= threshold) | (alpha == alpha.max(axis=1, keepdims=True))
    alpha = np.where(keep, alpha, 0.0)
    return alpha / alpha.sum(axis=1, keepdims=True)


def combine_logits(member_logits: jax.Array, alpha: jax.Array, task_index: jax.Array) -> jax.Array:
    """Σ_m α[t_i, m] z_{m,i}: member logits (M, B, K), α (T, M), task_index (B,) → (B, K)."""
    return jnp.einsum("mbk,bm->bk", member_logits, jnp.asarray(alpha, member_logits.dtype)[task_index])


class Ensemble(NamedTuple):
    """members: stacked group adapters (M, …); weights: α (T, M) per task;
    boosters: stacked boosting adapters (b, …) (b may be 0); step_sizes: (b, T), η of
    booster j on task t (0 where booster j does not serve task t)."""

    members: Any
    weights: jax.Array
    boosters: Any
    step_sizes: jax.Array


def make_ensemble(members: Any, weights: np.ndarray) -> Ensemble:
    """An ensemble of the stacked ``members`` with α (T, M) and no boosting adapters yet."""
    weights = jnp.asarray(weights, jnp.float32)
    return Ensemble(members, weights, jax.tree.map(lambda x: x[:0], members), jnp.zeros((0, weights.shape[0])))


def add_booster(ensemble: Ensemble, lora: Any, step_sizes: np.ndarray) -> Ensemble:
    """``ensemble`` with one more boosting adapter ``lora`` (unstacked) and its η per task (T,)."""
    boosters = jax.tree.map(lambda s, x: jnp.concatenate([s, x[None]]), ensemble.boosters, lora)
    steps = jnp.concatenate([ensemble.step_sizes, jnp.asarray(step_sizes, jnp.float32)[None]])
    return ensemble._replace(boosters=boosters, step_sizes=steps)


def active_calls(ensemble: Ensemble) -> np.ndarray:
    """(T, M + b + 1) bool: the stacked adapters task t's rows need, in the order members,
    boosters, base model: α[t, m] > 0, η[j, t] ≠ 0, and the base model (z_base of
    :func:`boosted_logits`) when any booster serves t."""
    members = np.asarray(ensemble.weights) > 0
    boosters = np.asarray(ensemble.step_sizes).T != 0
    return np.concatenate([members, boosters, boosters.any(axis=1, keepdims=True)], axis=1)


def restrict(ensemble: Ensemble, active: np.ndarray) -> Ensemble:
    """The ensemble of the members and boosters marked in ``active`` ((M + b + 1,) bool, a row
    of :func:`active_calls`): on the rows of every task whose row of :func:`active_calls`
    is ``active``, its logits are the full ensemble's (the dropped terms are zero there)."""
    m = ensemble.weights.shape[1]
    keep_m, keep_b = np.flatnonzero(active[:m]), np.flatnonzero(active[m:-1])
    return Ensemble(jax.tree.map(lambda x: x[keep_m], ensemble.members), ensemble.weights[:, keep_m],
                    jax.tree.map(lambda x: x[keep_b], ensemble.boosters), ensemble.step_sizes[keep_b])


def routed_passes(ensemble: Ensemble, task_index: np.ndarray) -> dict[str, int]:
    """Adapter passes over rows with ``task_index`` (N,): ``routed`` Σ_i (calls task t_i
    needs), ``dense`` N · (M + b + [b > 0]) (every member and booster, and the base model
    whenever there is a booster, on every row)."""
    calls = active_calls(ensemble)
    m, b = ensemble.weights.shape[1], ensemble.step_sizes.shape[0]
    return {"routed": int(calls.sum(axis=1)[np.asarray(task_index)].sum()),
            "dense": int(len(task_index) * (m + b + (1 if b else 0)))}


def boosted_logits(logits: jax.Array, booster_logits: jax.Array, base_logits: jax.Array, step_sizes: jax.Array,
                   task_index: jax.Array) -> jax.Array:
    """F + Σ_j η[j, t_i] (z_j − z_base): logits (B, K), booster logits (b, B, K), base (B, K),
    step sizes (b, T), task_index (B,) → (B, K). Padded choices stay NO_CHOICE_LOGIT."""
    return logits + jnp.einsum("jb,jbk->bk", step_sizes[:, task_index], booster_logits - base_logits)


def group_losses(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray, task_index: np.ndarray,
                 groups: Sequence[Sequence[int]]) -> np.ndarray:
    """(G,) weighted mean CE(F(x_i), y_i) over the rows of each group's tasks (logits F (n, K));
    DataError names a group without rows."""
    losses = np.asarray(example_losses(jnp.asarray(logits, jnp.float32), jnp.asarray(labels)))
    out = []
    for g, tasks in enumerate(groups):
        w = np.where(np.isin(task_index, tasks), weights, 0.0)
        if not (w > 0).any():
            raise DataError(f"boosting: group {g} (tasks {list(tasks)}) has no training rows")
        out.append(float(np.sum(w * losses) / np.sum(w)))
    return np.asarray(out)


def group_step_sizes(tasks: Sequence[int], num_tasks: int, step_size: float) -> np.ndarray:
    """(T,) η on the group's tasks, 0 elsewhere."""
    return np.where(np.isin(np.arange(num_tasks), tasks), step_size, 0.0).astype(np.float32)


def boosting_offsets(logits: np.ndarray, base_logits: np.ndarray) -> np.ndarray:
    """F − z_base (N, K) float32, 0 on padded choices (where z_base is NO_CHOICE_LOGIT)."""
    return np.where(base_logits > NO_CHOICE_LOGIT / 2, logits - base_logits, 0.0).astype(np.float32)


def residuals(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """r = onehot(y) − softmax(z) (n, K): the negative gradient of CE in the logits (0 on padded choices)."""
    return jax.nn.one_hot(labels, logits.shape[-1]) - jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


@jax.jit


@jax.jit
def ridge_fit(features: jax.Array, targets: jax.Array, weights: jax.Array, l2: float) -> jax.Array:
    """w = argmin Σ_i w_i ‖G_i w − r_i‖² + λ‖w‖² = (Σ_i w_i G_iᵀG_i + λI)⁻¹ Σ_i w_i G_iᵀ r_i
    (Cholesky): features G (n, K, d), targets r (n, K), weights (n,), λ > 0 → (d,)."""
    g = features.astype(jnp.float32)
    w = weights.astype(jnp.float32)
    gram = jnp.einsum("n,nkd,nke->de", w, g, g) + l2 * jnp.eye(g.shape[-1], dtype=jnp.float32)
    rhs = jnp.einsum("n,nkd,nk->d", w, g, targets.astype(jnp.float32))
    return jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(gram, lower=True), rhs)


def logit_features(grads: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Projected gradients of the gradient stage → label-logit features (n, K, d).

    The softmax is shift-invariant, so only each row's centred gradient (mean over the K
    classes removed) matters, and the features are centred: then the ridge fit of the
    residual (whose rows sum to 0) does not depend on which logit the stage measured from.
    Binary tasks store G of the log-odds z_gold − z_other (n, d); ∇(z_1 − z_0) = (2y − 1)·G,
    so the centred rows are ((2y−1)G/2)·(−1, 1). K > 2 stores the logits relative to class 0
    (n, K, d), centred here."""
    grads = np.asarray(grads, np.float32)
    if grads.ndim == 3:
        return grads - grads.mean(axis=1, keepdims=True)
    half = (2.0 * np.asarray(labels) - 1.0)[:, None] * grads / 2.0
    return np.stack([-half, half], axis=1)


def closed_form_step(features: np.ndarray, logits: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                     task_index: np.ndarray, groups: Sequence[Sequence[int]], *,
                     l2: float = 1.0) -> tuple[int, np.ndarray]:
    """One closed-form boosting round: (g, w) with g the group of highest training loss under
    the ensemble logits F (n, K) and w (d,) the ridge fit of the residual onehot(y) − softmax(F)
    on ``features`` G (n, K, d) over group g's rows."""
    g = int(np.argmax(group_losses(logits, labels, weights, task_index, groups)))
    w = np.where(np.isin(task_index, groups[g]), weights, 0.0)
    r = residuals(jnp.asarray(logits), jnp.asarray(labels))
    return g, np.asarray(ridge_fit(jnp.asarray(features), r, jnp.asarray(w), l2))


def linear_boost(logits: np.ndarray, features: np.ndarray, w: np.ndarray,
                 step_size: float = DEFAULT_STEP_SIZE) -> np.ndarray:
    """F + η G w (n, K): the closed-form booster's linear prediction."""
    return np.asarray(predictions(step_size * jnp.asarray(w), jnp.asarray(features), jnp.asarray(logits)))
