"""Linearized Laplace on a logistic-regression toy: MAP against scikit-learn, the precision
against finite differences of the gradient, the predictive against 1-D quadrature."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.optimize
import scipy.special
import scipy.stats
from sklearn.linear_model import LogisticRegression

from jax_ensemble.core import laplace
from jax_ensemble.errors import NumericalError

L2 = 0.7


def _toy(n=80, d=3, seed=0):
    """Binary rows in the relative-logit form: G (n, 2, d) with class 0's row zero, f0 = 0."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = (rng.random(n) < scipy.special.expit(x @ np.array([1.5, -2.0, 0.5]))).astype(np.int32)
    g = np.stack([np.zeros_like(x), x], axis=1).astype(np.float32)
    return x, y, g, np.zeros((n, 2), np.float32)


def _gradient64(w, x, y):
    """∇F of F(w) = Σ log(1 + e^{xw}) − y·xw + λ‖w‖² in float64, by its closed form."""
    return x.T @ (scipy.special.expit(x @ w) - y) + 2 * L2 * w


def test_posterior_matches_sklearn_and_finite_differences():
    x, y, g, f0 = _toy()
    posterior = laplace.fit_laplace(jnp.asarray(g), jnp.asarray(f0), jnp.asarray(y), L2)
    ref = LogisticRegression(C=1 / (2 * L2), fit_intercept=False, tol=1e-12, max_iter=10_000).fit(x, y)
    np.testing.assert_allclose(posterior.mean, ref.coef_[0], rtol=1e-4, atol=1e-5)
    w, h = ref.coef_[0], 1e-5
    fd = np.stack([(_gradient64(w + h * e, x, y) - _gradient64(w - h * e, x, y)) / (2 * h) for e in np.eye(3)])
    chol = np.asarray(posterior.precision_cholesky, np.float64)
    np.testing.assert_allclose(chol @ chol.T, fd, rtol=1e-4)


def test_binary_predictive_against_quadrature():
    x, y, g, f0 = _toy()
    posterior = laplace.fit_laplace(jnp.asarray(g), jnp.asarray(f0), jnp.asarray(y), L2)
    rng = np.random.default_rng(1)
    x_test = 3.0 * rng.normal(size=(6, 3))  # far from the data too: large predictive variance
    g_test = jnp.asarray(np.stack([np.zeros_like(x_test), x_test], axis=1), jnp.float32)
    f0_test = jnp.zeros((6, 2))
    mean, cov = laplace.logit_moments(posterior, g_test, f0_test)
    chol = np.asarray(posterior.precision_cholesky, np.float64)
    w, precision = np.asarray(posterior.mean, np.float64), chol @ chol.T
    mu, var = x_test @ w, np.einsum("nd,nd->n", x_test @ np.linalg.inv(precision), x_test)
    np.testing.assert_allclose(mean[:, 1], mu, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cov[:, 1, 1], var, rtol=1e-3)
    np.testing.assert_allclose(cov[:, 0], 0, atol=1e-7)  # class 0's logit is the fixed reference
    exact = [scipy.integrate.quad(lambda z, m=m, s=s: scipy.special.expit(z) * scipy.stats.norm.pdf(z, m, s),
                                  m - 12 * s, m + 12 * s)[0] for m, s in zip(mu, np.sqrt(var))]
    probit = np.exp(np.asarray(laplace.probit_log_probs(mean, cov)))[:, 1]
    np.testing.assert_allclose(probit, exact, atol=0.02)  # the probit approximation's own error
    samples = laplace.sample_logits(posterior, g_test, f0_test, jax.random.key(0), 40_000)
    monte_carlo = np.asarray(jax.nn.softmax(samples, axis=-1)[..., 1].mean(axis=0))
    np.testing.assert_allclose(monte_carlo, exact, atol=0.01)  # MC error ≈ 0.5/√40,000


def test_multiclass_samples_have_the_logit_moments():
    rng = np.random.default_rng(2)
    n, k, d = 90, 3, 4
    g = rng.normal(size=(n, k, d)).astype(np.float32)
    g[:, 0] = 0.0
    f0 = np.concatenate([np.zeros((n, 1)), rng.normal(size=(n, k - 1))], axis=1).astype(np.float32)
    y = rng.integers(0, k, n).astype(np.int32)
    posterior = laplace.fit_laplace(jnp.asarray(g), jnp.asarray(f0), jnp.asarray(y), L2)
    mean, cov = laplace.logit_moments(posterior, jnp.asarray(g[:5]), jnp.asarray(f0[:5]))
    chol = np.asarray(posterior.precision_cholesky, np.float64)
    expected = np.einsum("nkd,de,nle->nkl", g[:5], np.linalg.inv(chol @ chol.T), g[:5])
    np.testing.assert_allclose(cov, expected, rtol=1e-3, atol=1e-6)
    samples = np.asarray(laplace.sample_logits(posterior, jnp.asarray(g[:5]), jnp.asarray(f0[:5]),
                                               jax.random.key(1), 50_000), np.float64)
    np.testing.assert_allclose(samples.mean(axis=0), mean, atol=4 * np.sqrt(expected.max() / 50_000) + 1e-6)
    centred = samples - samples.mean(axis=0)
    np.testing.assert_allclose(np.einsum("snk,snl->nkl", centred, centred) / 50_000, expected,
                               rtol=0.05, atol=0.05 * expected.max())
    probit = np.exp(np.asarray(laplace.probit_log_probs(mean, cov)))
    np.testing.assert_allclose(probit.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(probit, np.asarray(jax.nn.softmax(samples, axis=-1).mean(axis=0)), atol=0.03)


def test_map_failure_is_an_error():
    _, y, g, f0 = _toy()
    g[3, 1, 0] = np.nan
    with pytest.raises(NumericalError, match="Laplace MAP regression did not converge"):
        laplace.fit_laplace(jnp.asarray(g), jnp.asarray(f0), jnp.asarray(y), L2)


def test_log_evidence_against_quadrature_in_one_dimension():
    """d = 1: log ∫ Π_i σ(±x_i w) N(w; 0, 1/(2λ)) dw by quadrature against the Laplace
    approximation, over a λ grid; both pick the same λ."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=60)
    y = (rng.random(60) < scipy.special.expit(1.2 * x)).astype(np.int32)
    g = np.stack([np.zeros_like(x), x], axis=1)[:, :, None].astype(np.float32)
    f0 = np.zeros((60, 2), np.float32)
    grid = (0.01, 0.1, 1.0, 10.0, 100.0)

    def exact(l2):
        log_lik = lambda w: np.sum(y * np.log(scipy.special.expit(x * w)) + (1 - y) * np.log(scipy.special.expit(-x * w)))
        peak = scipy.optimize.minimize_scalar(lambda w: -log_lik(w) + l2 * w * w).x
        scale = log_lik(peak)  # integrate exp(log_lik - scale) to stay in range
        value = scipy.integrate.quad(lambda w: np.exp(log_lik(w) - scale) * scipy.stats.norm.pdf(w, 0, np.sqrt(0.5 / l2)),
                                     peak - 10, peak + 10, points=[peak], limit=200)[0]
        return np.log(value) + scale

    best, values = laplace.evidence_l2(jnp.asarray(g), jnp.asarray(f0), jnp.asarray(y), grid)
    expected = np.array([exact(l2) for l2 in grid])
    np.testing.assert_allclose(values, expected, atol=0.05)  # the Laplace approximation's own error, 60 rows
    assert best == grid[int(np.argmax(expected))]
