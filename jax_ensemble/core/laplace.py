"""Linearized Laplace: a Gaussian posterior over the projected fine-tuning direction w,
from the gradients the estimates already computed (docs/method.md §8).

The linearized model gives every example logits z = f0 + G w (f0 (K,), G (K, d): the
label-word logits and their projected gradients at θ0, relative to class 0 so row 0 is
zero). With the regression of the estimates,

    ŵ = argmin_w Σ_i ℓ(y_i, z_i) + λ‖w‖²,   H = Σ_i G_iᵀ (diag p_i − p_i p_iᵀ) G_i + 2λI,

(:func:`jax_ensemble.core.solvers.newton`, :func:`jax_ensemble.core.solvers.hessian`;
the outputs are linear in w, so the GGN is the exact Hessian) the Laplace posterior is
w ~ N(ŵ, H⁻¹) and each example's logits are Gaussian: z ~ N(μ, Σ) with μ = f0 + Gŵ and
Σ = G H⁻¹ Gᵀ (K × K). Its predictive probabilities E[softmax z] come from

- :func:`probit_log_probs`: the mean-field probit p_k ∝ exp(μ_k / √(1 + π/8·Σ_kk))
  (for K = 2 with class 0's logit fixed at 0 this is MacKay's σ(μ/√(1 + πσ²/8))), or
- :func:`sample_logits`: Monte Carlo samples of z.

The prior precision 2λ can come from the data: :func:`evidence_l2` picks λ on a grid by
the Laplace approximation of the marginal likelihood (:func:`log_evidence`).

No network pass beyond the gradients: everything is in the d-dimensional projected space.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_ensemble.core import solvers
from jax_ensemble.errors import NumericalError


class LaplacePosterior(NamedTuple):
    """mean: ŵ (d,); precision_cholesky: lower L with H = L Lᵀ (d, d)."""

    mean: jax.Array
    precision_cholesky: jax.Array


def _map_and_precision(features: jax.Array, offsets: jax.Array, labels: jax.Array,
                       l2: float) -> tuple[solvers.Solution, jax.Array]:
    """(the MAP regression's :class:`~jax_ensemble.core.solvers.Solution`, the Cholesky
    factor L of H at ŵ); jit/vmap-able in ``l2``."""
    weights = jnp.ones(labels.shape[0], features.dtype)
    solution = solvers.newton(features, offsets, labels, weights, l2)
    precision = solvers.hessian(solution.params, features, offsets, labels, weights, l2)
    return solution, jnp.linalg.cholesky(precision)


def fit_laplace(features: jax.Array, offsets: jax.Array, labels: jax.Array, l2: float) -> LaplacePosterior:
    """The posterior N(ŵ, H⁻¹) of the module docstring from the training rows' features
    G (n, K, d), offsets f0 (n, K) and labels y (n,) in 0..K−1, prior precision 2λ."""
    solution, cholesky = _map_and_precision(features, offsets, labels, l2)
    if not bool(solution.converged):
        raise NumericalError(f"the Laplace MAP regression did not converge in {int(solution.iterations)} Newton steps")
    return LaplacePosterior(solution.params, cholesky)


PRIOR_GRID = tuple(10.0 ** np.arange(-2.0, 4.5, 0.5))
"""λ candidates of :func:`evidence_l2`: 0.01 … 10⁴, half a decade apart."""


def log_evidence(features: jax.Array, offsets: jax.Array, labels: jax.Array, l2: float) -> jax.Array:
    """The Laplace approximation of log p(y | λ) = log ∫ Π_i p(y_i | w) N(w; 0, (2λ)⁻¹I) dw:

        −F(ŵ) + (d/2)·log 2λ − ½·log det H,   F(w) = Σ_i ℓ(y_i, z_i) + λ‖w‖²

    (MacKay's evidence; jit/vmap-able in ``l2``)."""
    solution, cholesky = _map_and_precision(features, offsets, labels, l2)
    log_det = 2.0 * jnp.sum(jnp.log(jnp.diagonal(cholesky)))
    return -solution.objective + 0.5 * features.shape[-1] * jnp.log(2.0 * l2) - 0.5 * log_det


def evidence_l2(features: jax.Array, offsets: jax.Array, labels: jax.Array,
                grid: Sequence[float] = PRIOR_GRID) -> tuple[float, np.ndarray]:
    """(the λ of ``grid`` with the largest :func:`log_evidence`, every λ's log evidence):
    the prior precision chosen by the data, all λ in one vmapped program."""
    values = jax.jit(jax.vmap(log_evidence, in_axes=(None, None, None, 0)))(
        features, offsets, labels, jnp.asarray(grid, features.dtype))
    values = np.asarray(values)
    return float(grid[int(np.nanargmax(values))]), values


@jax.jit
def logit_moments(posterior: LaplacePosterior, features: jax.Array, offsets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(μ (n, K), Σ (n, K, K)): the mean and covariance of each example's logits."""
    mean = solvers.predictions(posterior.mean, features, offsets)
    # Σ = G H⁻¹ Gᵀ = (L⁻¹Gᵀ)ᵀ(L⁻¹Gᵀ): one triangular solve for all examples and classes
    n, k, d = features.shape
    half = jax.scipy.linalg.solve_triangular(posterior.precision_cholesky, features.reshape(n * k, d).T, lower=True)
    half = half.T.reshape(n, k, d)
    return mean, jnp.einsum("nkd,nld->nkl", half, half)


@jax.jit
def probit_log_probs(mean: jax.Array, covariance: jax.Array) -> jax.Array:
    """(n, K) log predictive probabilities by the mean-field probit approximation."""
    variance = jnp.diagonal(covariance, axis1=-2, axis2=-1)
    return jax.nn.log_softmax(mean / jnp.sqrt(1.0 + math.pi / 8.0 * variance), axis=-1)


def sample_logits(
    posterior: LaplacePosterior, features: jax.Array, offsets: jax.Array, key: jax.Array, num_samples: int
) -> jax.Array:
    """(S, n, K) logits f0 + G w_s for S posterior samples w_s = ŵ + L⁻ᵀ ε_s, ε_s ~ N(0, I)."""
    eps = jax.random.normal(key, (num_samples, posterior.mean.shape[0]), posterior.mean.dtype)
    draws = posterior.mean + jax.scipy.linalg.solve_triangular(posterior.precision_cholesky, eps.T, lower=True,
                                                               trans="T").T
    return solvers.predictions(draws, features, offsets)
