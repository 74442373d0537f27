"""The grouping SDP at scale: a Burer–Monteiro factorisation solved by an augmented
Lagrangian, in one jitted JAX program.

The relaxation of :func:`jax_ensemble.core.clustering.sdp_cluster_matrix` (docs/method.md §5),

    max ⟨T, X⟩  s.t.  X ⪰ 0,  X ≥ 0,  X·1 = 1,  tr X = m,

over X = V Vᵀ with V ∈ R^{n×r}: X ⪰ 0 holds by construction and the rank is at most r
(the m-clustering optimum Σ_k 1_{C_k}1_{C_k}ᵀ/|C_k| has rank m). The other constraints
enter the augmented Lagrangian (minimised over V, multipliers y ∈ Rⁿ, z ∈ R, M ∈ R^{n×n}_+)

    L_ρ(V) = −⟨T̃, X⟩ + yᵀa + z·b + ρ/2 (‖a‖² + b²) + 1/(2ρ) Σ_ij (max(0, M_ij − ρX_ij)² − M_ij²)

with a = X·1 − 1, b = tr X − m and T̃ = T/‖T‖₂ (so ⟨T̃, X⟩ ≤ m); the last term is
Rockafellar's form of X ≥ 0. Each outer step minimises L_ρ over V by L-BFGS (optax), then
y += ρa, z += ρb, M = max(0, M − ρX), and multiplies ρ by 4 when the infeasibility did
not fall to a quarter. Every step costs O(n²r) time and O(n²) memory (X and M), against
an interior-point method's O(n⁶) per iteration: n = 1,000 takes 0.5–3 minutes on a 2-core CPU.

The factorised problem is not convex; with r ≥ m + a few and a random start it reaches
the interior-point objective within 1% on the planted and random instances of the tests.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_ensemble.errors import ConfigError

_PENALTY_GROWTH = 4.0
_PENALTY_MAX = 1e6


class LowRankSolution(NamedTuple):
    """matrix: X = VVᵀ (n, n); factor: V (n, r); objective: ⟨T, X⟩ (T as given);
    infeasibility: max(‖X·1 − 1‖_∞, |tr X − m|/m, max(0, −min X)·n/m) (the last
    relative to a cluster entry's size m/n); outer_iterations, inner_iterations (L-BFGS
    steps in all); converged: infeasibility ≤ tol and the objective settled."""

    matrix: jax.Array
    factor: jax.Array
    objective: jax.Array
    infeasibility: jax.Array
    outer_iterations: jax.Array
    inner_iterations: jax.Array
    converged: jax.Array


def default_rank(num_tasks: int, num_groups: int) -> int:
    """r = min(n, max(2m + 4, 20)): room above the clustering optimum's rank m for the
    descent to escape spurious stationary points (random affinities at n = 60 have an
    optimum of rank ~20; rank 14 ended 0.8% below it, rank 20 within 1e-5)."""
    return min(num_tasks, max(2 * num_groups + 4, 20))


def burer_monteiro(
    affinity: np.ndarray | jax.Array,
    num_groups: int,
    *,
    rank: int = 0,
    seed: int = 0,
    tol: float = 1e-4,
    max_outer: int = 100,
    max_inner: int = 1000,
) -> LowRankSolution:
    """Solve the grouping SDP for the (n, n) symmetric ``affinity`` T with m = ``num_groups``
    by the factorisation X = VVᵀ, V (n, ``rank``) (0: :func:`default_rank`), from a
    random non-negative start drawn with ``seed``."""
    t = jnp.asarray(affinity, jnp.float32)
    n = t.shape[0]
    if t.ndim != 2 or t.shape != (n, n):
        raise ConfigError(f"the affinity matrix must be square; got shape {t.shape}")
    if not 1 <= num_groups <= n:
        raise ConfigError(f"num_groups must be in [1, {n}] for {n} tasks, got {num_groups}")
    r = rank or default_rank(n, num_groups)
    if not 1 <= r <= n:
        raise ConfigError(f"the factor rank must be in [1, {n}] for {n} tasks, got {r}")
    start = jax.random.uniform(jax.random.key(seed), (n, r), jnp.float32)
    start = start * jnp.sqrt(num_groups) / jnp.linalg.norm(start)
    return _solve(t, start, float(num_groups), tol=tol, max_outer=max_outer, max_inner=max_inner)


def _residuals(x: jax.Array, m: float) -> tuple[jax.Array, jax.Array]:
    """a = X·1 − 1 (n,), b = tr X − m."""
    return x.sum(axis=1) - 1.0, jnp.trace(x) - m


def _infeasibility(x: jax.Array, m: float) -> jax.Array:
    a, b = _residuals(x, m)
    n = x.shape[0]
    return jnp.maximum(jnp.maximum(jnp.abs(a).max(), jnp.abs(b) / m), jnp.maximum(0.0, -x.min()) * n / m)


@functools.partial(jax.jit, static_argnames=("tol", "max_outer", "max_inner"))
def _solve(t: jax.Array, start: jax.Array, m: float, *, tol: float, max_outer: int, max_inner: int) -> LowRankSolution:
    n = t.shape[0]
    scale = jnp.maximum(jnp.linalg.norm(t, ord=2), 1e-12)
    t_scaled = (t + t.T) / (2 * scale)
    optimizer = optax.lbfgs()

    def lagrangian(v, y, z, mult, rho):
        x = v @ v.T
        a, b = _residuals(x, m)
        slack = jnp.maximum(0.0, mult - rho * x)
        return (-jnp.vdot(t_scaled, x) + y @ a + z * b + rho / 2 * (a @ a + b * b)
                + jnp.sum(slack * slack - mult * mult) / (2 * rho))

    def minimise(v, y, z, mult, rho):
        fun = functools.partial(lagrangian, y=y, z=z, mult=mult, rho=rho)
        value_and_grad = optax.value_and_grad_from_state(fun)

        def step(carry):
            v, state, _, k = carry
            value, grad = value_and_grad(v, state=state)
            updates, state = optimizer.update(grad, state, v, value=value, grad=grad, value_fn=fun)
            return optax.apply_updates(v, updates), state, optax.tree.norm(grad), k + 1

        def going(carry):
            _, _, grad_norm, k = carry
            return (k < max_inner) & (grad_norm > tol * jnp.sqrt(n))

        v, _, _, k = jax.lax.while_loop(going, step, (v, optimizer.init(v), jnp.inf, 0))
        return v, k

    def outer(carry):
        v, y, z, mult, rho, infeasible, objective, k, inner, _ = carry
        v, steps = minimise(v, y, z, mult, rho)
        x = v @ v.T
        a, b = _residuals(x, m)
        new_infeasible = _infeasibility(x, m)
        new_objective = jnp.vdot(t_scaled, x)
        settled = (new_infeasible <= tol) & (jnp.abs(new_objective - objective) <= tol * jnp.maximum(1.0, jnp.abs(new_objective)))
        y, z, mult = y + rho * a, z + rho * b, jnp.maximum(0.0, mult - rho * x)
        rho = jnp.where(new_infeasible > 0.25 * infeasible, jnp.minimum(rho * _PENALTY_GROWTH, _PENALTY_MAX), rho)
        return v, y, z, mult, rho, new_infeasible, new_objective, k + 1, inner + steps, settled

    def going(carry):
        *_, k, _, settled = carry
        return (k < max_outer) & ~settled

    init = (start, jnp.zeros(n), jnp.zeros(()), jnp.zeros((n, n)), jnp.ones(()), jnp.inf, jnp.inf, 0, 0, False)
    v, *_, infeasible, _, k, inner, settled = jax.lax.while_loop(going, outer, init)
    x = v @ v.T
    return LowRankSolution(x, v, jnp.vdot(t, x), infeasible, k, inner, settled)
