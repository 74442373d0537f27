"""L2-regularised logistic and softmax regression with a fixed offset, jit- and vmap-able.

One problem (docs/method.md §3) has n examples with features G, offsets o, labels y and
weights w ≥ 0 (0 drops a row, so a task subset is a weight mask over shared arrays):

    F(θ) = Σ_i w_i ℓ(y_i, z_i) + λ‖θ‖²,   z_i = o_i + G_i θ,   θ ∈ R^d

- binary: G (n, d), o (n,), y ∈ {0, 1}, ℓ(y, z) = log(1 + e^z) − y·z (z the log-odds
  of class 1);
- softmax: G (n, K, d) (one feature row per class, e.g. the projected gradient of each
  label-word logit), o (n, K), y ∈ {0..K−1}, ℓ(y, z) = logsumexp(z) − z_y. The usual
  multinomial model with parameters (d', K) is the case G_i = I_K ⊗ x_i, θ = vec(Wᵀ).

Solvers (each returns a :class:`Solution`; vmap them over weights to solve many subsets
in one program, see :func:`solve_many`):

- :func:`newton`: damped Newton, Hessian Σ_i w_i G_iᵀ ∇²ℓ_i G_i + 2λI solved by
  Cholesky, step length from a backtracking grid (Armijo), stopped when the Newton
  decrement (≈ F − min F) is at most tol·F(0) or stalls at float precision;
  O(n·K·d² + d³) per iteration, for d up to a few thousand;
- :func:`lbfgs`: L-BFGS with the same grid line search, stopped when
  ‖∇F‖ ≤ tol·‖∇F(0)‖; O(n·K·d) per iteration, for larger d.

All rows of one problem share a dtype; float32 reaches coefficients within ~1e-4
(relative) of a float64 reference on well-posed problems.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_ensemble.errors import ConfigError

METHODS = ("auto", "newton", "lbfgs")
NEWTON_MAX_DIM = 2048  # "auto" uses Newton up to this many features, L-BFGS beyond
_STEP_SIZES = 0.5 ** np.arange(12.0, dtype=np.float32)  # Newton's backtracking grid: 1, 1/2, ..., 1/2048
_ARMIJO = 1e-4
_FLOAT_NOISE = 8.0  # multiples of eps·|F| below which F differences are rounding


class Solution(NamedTuple):
    """A solved problem (with a leading subset axis when vmapped).

    params: θ̂ (d,); objective: F(θ̂); grad_norm: ‖∇F(θ̂)‖; iterations: steps taken;
    converged: the solver's stopping rule was met within its iteration budget."""

    params: jax.Array
    objective: jax.Array
    grad_norm: jax.Array
    iterations: jax.Array
    converged: jax.Array


def _as_multiclass(features: jax.Array, offsets: jax.Array) -> tuple[jax.Array, jax.Array, bool]:
    """Binary (n, d), (n,) → (n, 1, d), (n, 1); softmax shapes pass through."""
    if features.ndim == 2:
        return features[:, None, :], offsets[:, None], True
    return features, offsets, False


def _example_loss(binary: bool) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """ℓ(z (K,), y) for one example."""
    if binary:
        return lambda z, y: jax.nn.softplus(z[0]) - y * z[0]
    return lambda z, y: jax.nn.logsumexp(z) - jnp.take(z, y.astype(jnp.int32))


def example_losses(outputs: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example ℓ(y_i, z_i): outputs (n,) log-odds of class 1 or (n, K) logits → (n,)."""
    binary = outputs.ndim == 1
    z = outputs[:, None] if binary else outputs
    return jax.vmap(_example_loss(binary))(z, labels)


def correct(outputs: jax.Array, labels: jax.Array) -> jax.Array:
    """(n,) bool: whether the prediction is y_i (binary: [z_i > 0] = y_i; softmax: argmax)."""
    if outputs.ndim == 1:
        return (outputs > 0) == (labels > 0)
    return jnp.argmax(outputs, axis=-1) == labels


def objective(
    params: jax.Array, features: jax.Array, offsets: jax.Array, labels: jax.Array, weights: jax.Array, l2: float
) -> jax.Array:
    """F(θ) = Σ_i w_i ℓ(y_i, o_i + G_i θ) + λ‖θ‖² (shapes in the module docstring)."""
    losses = example_losses(predictions(params, features, offsets), labels)
    return jnp.sum(weights * losses) + l2 * jnp.sum(params**2)


def predictions(params: jax.Array, features: jax.Array, offsets: jax.Array) -> jax.Array:
    """The fitted outputs o + Gθ: (n,) log-odds (binary) or (n, K) logits; ``params`` may
    carry leading batch axes (..., d) → (..., n) or (..., n, K)."""
    return offsets + jnp.tensordot(params, features, axes=([-1], [-1]))


def _tolerance_reached(grad_norm: jax.Array, grad_norm0: jax.Array, tol: float) -> jax.Array:
    """L-BFGS's stopping rule: ‖∇F‖ ≤ tol·‖∇F(0)‖ (always true when ∇F(0) = 0)."""
    return grad_norm <= tol * grad_norm0


def _objective_fns(g: jax.Array, labels: jax.Array, w: jax.Array, l2: float, binary: bool):
    """(value(z, θ), gradient(z, θ)) of F at θ given its outputs z = o + Gθ (g: (n, K, d))."""
    loss = _example_loss(binary)

    def value(z: jax.Array, theta: jax.Array) -> jax.Array:
        return jnp.sum(w * jax.vmap(loss)(z, labels)) + l2 * jnp.sum(theta**2)

    def gradient(z: jax.Array, theta: jax.Array) -> jax.Array:
        dz = jax.vmap(jax.grad(loss))(z, labels) * w[:, None]  # (n, K)
        return jnp.einsum("nkd,nk->d", g, dz) + 2.0 * l2 * theta

    return value, gradient


def _grid_step(value: Callable, theta: jax.Array, z: jax.Array, delta: jax.Array, dz: jax.Array, val: jax.Array,
               slope: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(t, F(θ + tΔ)): the largest t in {1, 1/2, ..., 1/2048} with F(θ + tΔ) ≤ F(θ) +
    10⁻⁴·t·slope + 8·eps·|F| (the last term is F's rounding, so near the optimum t = 1),
    else the t of the lowest F. z moves along dz = G·Δ, so every t costs O(n·K)."""
    steps = jnp.asarray(_STEP_SIZES, z.dtype)
    values = jax.vmap(lambda t: value(z + t * dz, theta + t * delta))(steps)
    noise = _FLOAT_NOISE * jnp.finfo(z.dtype).eps * jnp.abs(val)
    accept = values <= val + _ARMIJO * steps * slope + noise
    first = jnp.where(jnp.any(accept), jnp.argmax(accept), jnp.argmin(values))
    return steps[first], values[first]


def _hessian_at(g: jax.Array, z: jax.Array, labels: jax.Array, w: jax.Array, l2: float, loss: Callable) -> jax.Array:
    """Σ_i w_i G_iᵀ ∇²_z ℓ(y_i, z_i) G_i + 2λI (d, d) at outputs z (n, K), g (n, K, d)."""
    curv = jax.vmap(jax.hessian(loss))(z, labels) * w[:, None, None]  # (n, K, K)
    eye = jnp.eye(g.shape[-1], dtype=g.dtype)
    return jnp.einsum("nkd,nke->de", g, jnp.einsum("nkl,nle->nke", curv, g)) + 2.0 * l2 * eye


def hessian(
    params: jax.Array, features: jax.Array, offsets: jax.Array, labels: jax.Array, weights: jax.Array, l2: float
) -> jax.Array:
    """∇²F(θ) (d, d) = Σ_i w_i G_iᵀ ∇²_z ℓ(y_i, z_i) G_i + 2λI, z = o + Gθ (the outputs are
    linear in θ, so this Gauss–Newton form is F's exact Hessian)."""
    g, o, binary = _as_multiclass(features, offsets)
    z = o + jnp.einsum("nkd,d->nk", g, params)
    return _hessian_at(g, z, labels, weights.astype(g.dtype), l2, _example_loss(binary))


def newton(
    features: jax.Array,
    offsets: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    l2: float,
    *,
    max_iter: int = 50,
    tol: float = 1e-10,
) -> Solution:
    """Minimise F by damped Newton from θ = 0 (see the module docstring).

    Each step solves (Σ_i w_i G_iᵀ H_i G_i + 2λI) Δ = −∇F with H_i = ∇²_z ℓ(y_i, z_i)
    (σ(1−σ) binary, diag(p) − ppᵀ softmax) by Cholesky, then takes the largest t in
    {1, 1/2, ..., 1/2048} with F(θ + tΔ) ≤ F(θ) + 10⁻⁴·t·⟨∇F, Δ⟩ + 8·eps·|F| (F along
    the line costs O(n·K) per t, so all t are tried at once; the last term is F's
    rounding, so near the optimum full steps are taken). Stops after the step whose
    Newton decrement ½·⟨−∇F, Δ⟩ (≈ F(θ) − min F) is at most tol·F(0), or that no longer
    shrank 4-fold while below 10⁻⁶·F(0) (float precision reached). Requires λ > 0."""
    g, o, binary = _as_multiclass(features, offsets)
    loss = _example_loss(binary)
    d = g.shape[-1]
    w = weights.astype(g.dtype)
    value, gradient = _objective_fns(g, labels, w, l2, binary)

    def step(carry):
        theta, z, grad, val, gap, _, it = carry
        hess = _hessian_at(g, z, labels, w, l2, loss)
        delta = -jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(hess, lower=True), grad)
        dz = jnp.einsum("nkd,d->nk", g, delta)
        slope = jnp.vdot(grad, delta)
        t, new_val = _grid_step(value, theta, z, delta, dz, val, slope)
        theta, z = theta + t * delta, z + t * dz
        new_gap = -0.5 * slope
        floor = (new_gap > 0.25 * gap) & (new_gap <= 1e-6 * val0)  # no quadratic progress left: float precision
        return theta, z, gradient(z, theta), new_val, new_gap, floor, it + 1

    theta0 = jnp.zeros((d,), g.dtype)
    grad0 = gradient(o, theta0)
    val0 = value(o, theta0)
    gap0 = jnp.where(jnp.any(grad0 != 0), jnp.inf, 0.0).astype(g.dtype)
    done = lambda gap, floor: (gap <= tol * val0) | floor  # noqa: E731
    carry = (theta0, o, grad0, val0, gap0, jnp.array(False), jnp.int32(0))
    keep_going = lambda c: (c[-1] < max_iter) & ~done(c[4], c[5])  # noqa: E731
    theta, _, grad, val, gap, floor, it = jax.lax.while_loop(keep_going, step, carry)
    return Solution(theta, val, jnp.linalg.norm(grad), it, done(gap, floor))


def lbfgs(
    features: jax.Array,
    offsets: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    l2: float,
    *,
    max_iter: int = 500,
    tol: float = 1e-5,
    memory_size: int = 10,
) -> Solution:
    """Minimise F by L-BFGS from θ = 0; stops when ‖∇F‖ ≤ tol·‖∇F(0)‖ or after ``max_iter``
    iterations.

    The direction Δ = −H∇F comes from the two-loop recursion over the last ``memory_size``
    curvature pairs (s, y) with H₀ = ⟨s, y⟩/⟨y, y⟩; the first step is the exact minimiser of
    the quadratic bound of F along −∇F (curvature of ℓ bounded by ¼ binary, ½ softmax).
    The step length is the largest t in {1, 1/2, ..., 1/2048} meeting Armijo's condition
    (as in :func:`newton`, z moves along G·Δ, so all t cost one product with G); z is then
    recomputed as o + Gθ (accumulating z + t·G·Δ drifts in float32 over hundreds of steps
    and stalls the gradient). An iteration is three products with G and no nested loop, so
    a vmapped batch of problems runs in lockstep (a zoom line search per problem would not)."""
    g, o, binary = _as_multiclass(features, offsets)
    d = g.shape[-1]
    w = weights.astype(g.dtype)
    value, gradient = _objective_fns(g, labels, w, l2, binary)

    def direction(grad, s_hist, y_hist, rho, gamma, newest):
        order = (newest - jnp.arange(memory_size)) % memory_size  # newest pair first; empty slots have rho 0

        def backward(q, i):
            alpha = rho[i] * jnp.vdot(s_hist[i], q)
            return q - alpha * y_hist[i], alpha

        q, alphas = jax.lax.scan(backward, grad, order)

        def forward(r, args):
            i, alpha = args
            return r + (alpha - rho[i] * jnp.vdot(y_hist[i], r)) * s_hist[i], None

        r, _ = jax.lax.scan(forward, gamma * q, (order[::-1], alphas[::-1]))
        return -r

    def step(carry):
        theta, z, grad, val, s_hist, y_hist, rho, gamma, pairs, it = carry
        delta = direction(grad, s_hist, y_hist, rho, gamma, (pairs - 1) % memory_size)
        dz = jnp.einsum("nkd,d->nk", g, delta)
        slope = jnp.vdot(grad, delta)
        t, new_val = _grid_step(value, theta, z, delta, dz, val, slope)
        new_theta = theta + t * delta
        new_z = predictions(new_theta, g, o)  # exact: accumulated z + t·dz drifts over hundreds of steps
        new_grad = gradient(new_z, new_theta)
        s, y = new_theta - theta, new_grad - grad
        sy, yy = jnp.vdot(s, y), jnp.vdot(y, y)
        keep = sy > jnp.finfo(g.dtype).eps * yy  # F is strictly convex, so this fails only at rounding level
        slot = pairs % memory_size
        s_hist = jnp.where(keep, s_hist.at[slot].set(s), s_hist)
        y_hist = jnp.where(keep, y_hist.at[slot].set(y), y_hist)
        rho = jnp.where(keep, rho.at[slot].set(1.0 / jnp.where(keep, sy, 1.0)), rho)
        gamma = jnp.where(keep, sy / jnp.where(keep, yy, 1.0), gamma)
        return new_theta, new_z, new_grad, new_val, s_hist, y_hist, rho, gamma, pairs + keep, it + 1

    theta0 = jnp.zeros((d,), g.dtype)
    grad0 = gradient(o, theta0)
    norm0 = jnp.linalg.norm(grad0)
    bound = 0.25 if binary else 0.5
    curvature = bound * jnp.sum(w * jnp.sum(jnp.einsum("nkd,d->nk", g, grad0) ** 2, axis=1)) + 2.0 * l2 * norm0**2
    gamma0 = jnp.where(norm0 > 0, norm0**2 / jnp.where(norm0 > 0, curvature, 1.0), 1.0)
    history = jnp.zeros((memory_size, d), g.dtype)
    carry = (theta0, o, grad0, value(o, theta0), history, history, jnp.zeros((memory_size,), g.dtype),
             gamma0.astype(g.dtype), jnp.int32(0), jnp.int32(0))
    keep_going = lambda c: (c[-1] < max_iter) & ~_tolerance_reached(jnp.linalg.norm(c[2]), norm0, tol)  # noqa: E731
    theta, _, grad, val, *_, it = jax.lax.while_loop(keep_going, step, carry)
    norm = jnp.linalg.norm(grad)
    return Solution(theta, val, norm, it, _tolerance_reached(norm, norm0, tol))


def resolve_method(method: str, dim: int) -> str:
    """``newton`` or ``lbfgs``; ``auto`` is Newton up to :data:`NEWTON_MAX_DIM` features."""
    if method not in METHODS:
        raise ConfigError(f"solver must be one of {', '.join(METHODS)}; got {method!r}")
    if method == "auto":
        return "newton" if dim <= NEWTON_MAX_DIM else "lbfgs"
    return method


def solve_many(
    features: jax.Array,
    offsets: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    l2: float,
    *,
    rows: jax.Array | None = None,
    method: str = "auto",
    max_iter: int | None = None,
    tol: float | None = None,
    chunk_size: int | None = None,
) -> Solution:
    """Many problems over shared G, o, y in one jitted program.

    weights (S, n): problem s weighs row i by weights[s, i]. With rows (S, m) int,
    problem s sees only rows[s] (weighted by weights (S, m); pad with weight 0), which is
    cheaper when each problem uses a fraction of the rows. The S problems are vmapped,
    ``chunk_size`` at a time if given (bounds memory). ``max_iter``/``tol`` None: the
    solver's defaults. Returns a :class:`Solution` whose fields have a leading axis S."""
    method = resolve_method(method, features.shape[-1])
    return _solve_many(features, offsets, labels, weights, rows, l2, method=method, max_iter=max_iter, tol=tol,
                       chunk_size=chunk_size)


@functools.partial(jax.jit, static_argnames=("method", "max_iter", "tol", "chunk_size"))
def _solve_many(features, offsets, labels, weights, rows, l2, *, method, max_iter, tol, chunk_size):
    solver = newton if method == "newton" else lbfgs
    kwargs = {k: v for k, v in (("max_iter", max_iter), ("tol", tol)) if v is not None}

    def one(args):
        w, r = args
        if r is None:
            return solver(features, offsets, labels, w, l2, **kwargs)
        return solver(features[r], offsets[r], labels[r], w, l2, **kwargs)

    if chunk_size is None:
        return jax.vmap(one)((weights, rows))
    return jax.lax.map(one, (weights, rows), batch_size=chunk_size)
