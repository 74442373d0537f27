"""Batched logistic/softmax regression against scikit-learn, scipy and each other."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from sklearn.linear_model import LogisticRegression

from jax_ensemble.core import solvers
from jax_ensemble.errors import ConfigError

N, D, K, L2 = 240, 12, 3, 0.3


def _binary(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D)).astype(np.float32)
    y = (x @ rng.normal(size=D) + rng.normal(size=N) > 0).astype(np.float32)
    offsets = rng.normal(size=N).astype(np.float32)
    return x, offsets, y, rng


def _softmax(seed: int = 0):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(N, K, D)).astype(np.float32)
    y = np.argmax(np.einsum("nkd,d->nk", g, rng.normal(size=D)) + rng.gumbel(size=(N, K)), axis=1)
    offsets = rng.normal(size=(N, K)).astype(np.float32)
    return g, offsets, y.astype(np.int32), rng


def _sklearn(x, y, weights, l2):
    """sklearn minimises C·Σ s_i ℓ_i + ½‖W‖²; ours Σ w_i ℓ_i + λ‖θ‖², i.e. C = 1 / (2λ)."""
    return LogisticRegression(C=1.0 / (2.0 * l2), fit_intercept=False, tol=1e-12, max_iter=100_000).fit(
        x, y, sample_weight=weights
    )


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.mark.parametrize("method", ["newton", "lbfgs"])
def test_binary_matches_sklearn_with_weights(method):
    x, _, y, rng = _binary()
    weights = (rng.random(N) < 0.6) * rng.uniform(0.5, 2.0, N)  # a mask times balancing weights
    sol = solvers.solve_many(jnp.array(x), jnp.zeros(N), jnp.array(y), jnp.array(weights[None]), L2, method=method)
    ref = _sklearn(x, y, weights, L2)
    ref_obj = solvers.objective(jnp.array(ref.coef_[0], jnp.float32), x, np.zeros(N), y, weights, L2)
    assert bool(sol.converged[0])
    assert _rel(sol.params[0], ref.coef_[0]) < 1e-4
    assert abs(float(sol.objective[0]) - float(ref_obj)) / float(ref_obj) < 1e-4


@pytest.mark.parametrize("method", ["newton", "lbfgs"])
def test_multinomial_matches_sklearn(method):
    """The usual multinomial model is the softmax problem with block features G_i = I_K ⊗ x_i."""
    x, _, y, rng = _binary(1)
    y = np.argmax(x[:, :K] + rng.gumbel(size=(N, K)), axis=1)
    g = np.einsum("kl,nd->nkld", np.eye(K), x).reshape(N, K, K * D).astype(np.float32)
    sol = solvers.solve_many(jnp.array(g), jnp.zeros((N, K)), jnp.array(y), jnp.ones((1, N)), L2, method=method)
    ref = _sklearn(x, y, None, L2)
    assert _rel(np.asarray(sol.params[0]).reshape(K, D), ref.coef_) < 1e-4


def _scipy_reference(features, offsets, labels, weights, l2):
    """The same objective in float64 by scipy's L-BFGS-B with an analytic gradient."""
    f = np.asarray(features, np.float64)
    f = f[:, None, :] if f.ndim == 2 else f
    o = np.asarray(offsets, np.float64).reshape(f.shape[:2])
    binary = np.asarray(features).ndim == 2

    def fun(theta):
        z = o + f @ theta
        if binary:
            p = 1 / (1 + np.exp(-z[:, 0]))
            loss = np.logaddexp(0, z[:, 0]) - labels * z[:, 0]
            dz = (p - labels)[:, None]
        else:
            lse = scipy.special.logsumexp(z, axis=1)
            loss = lse - z[np.arange(len(z)), labels]
            dz = np.exp(z - lse[:, None]) - np.eye(z.shape[1])[labels]
        grad = np.einsum("nkd,nk->d", f, weights[:, None] * dz) + 2 * l2 * theta
        return np.sum(weights * loss) + l2 * theta @ theta, grad

    res = scipy.optimize.minimize(fun, np.zeros(f.shape[-1]), jac=True, method="L-BFGS-B",
                                  options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10_000})
    return res.x, res.fun


@pytest.mark.parametrize("kind", ["binary", "softmax"])
def test_offsets_match_scipy_and_gradient_vanishes(kind):
    features, offsets, labels, rng = _binary(2) if kind == "binary" else _softmax(2)
    weights = (rng.random(N) < 0.5).astype(np.float64)
    sol = solvers.newton(jnp.array(features), jnp.array(offsets), jnp.array(labels), jnp.array(weights), L2)
    theta, fun = _scipy_reference(features, offsets, labels, weights, L2)
    assert _rel(sol.params, theta) < 1e-4
    assert abs(float(sol.objective) - fun) / fun < 1e-5
    # the offset matters: ignoring it gives a different optimum
    no_offset = solvers.newton(jnp.array(features), jnp.zeros_like(offsets), jnp.array(labels), jnp.array(weights), L2)
    assert _rel(no_offset.params, theta) > 1e-2
    grad0 = jax.grad(solvers.objective)(jnp.zeros(D), features, offsets, labels, weights, L2)
    assert float(sol.grad_norm) <= 1e-5 * float(jnp.linalg.norm(grad0))


@pytest.mark.parametrize("kind", ["binary", "softmax"])
def test_newton_and_lbfgs_agree_and_vmap_matches_one_by_one(kind):
    features, offsets, labels, rng = _binary(3) if kind == "binary" else _softmax(3)
    masks = (rng.random((4, N)) < 0.4).astype(np.float32)
    args = (jnp.array(features), jnp.array(offsets), jnp.array(labels))
    newton = solvers.solve_many(*args, jnp.array(masks), L2, method="newton")
    lbfgs = solvers.solve_many(*args, jnp.array(masks), L2, method="lbfgs")
    assert bool(newton.converged.all()) and bool(lbfgs.converged.all())
    assert _rel(lbfgs.params, newton.params) < 1e-3
    assert np.allclose(lbfgs.objective, newton.objective, rtol=1e-5)
    single = jax.jit(solvers.newton, static_argnames=("l2",))
    for s in range(len(masks)):
        one = single(*args, jnp.array(masks[s]), l2=L2)
        np.testing.assert_allclose(one.params, newton.params[s], rtol=1e-4, atol=1e-5)


def test_softmax_solves_are_invariant_to_measuring_logits_from_class_0():
    """The gradient stage stores z − z_0 (K − 1 backward passes): every solve, loss and
    prediction must equal the one on the K logits, since softmax(z) = softmax(z − z_0)."""
    g, offsets, labels, rng = _softmax(5)
    masks = (rng.random((3, N)) < 0.5).astype(np.float32)
    full = solvers.solve_many(jnp.array(g), jnp.array(offsets), jnp.array(labels), jnp.array(masks), L2)
    rel_g, rel_o = g - g[:, :1], offsets - offsets[:, :1]
    relative = solvers.solve_many(jnp.array(rel_g), jnp.array(rel_o), jnp.array(labels), jnp.array(masks), L2)
    np.testing.assert_allclose(relative.params, full.params, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(relative.objective, full.objective, rtol=1e-5)
    for s in range(3):
        z_full = solvers.predictions(full.params[s], jnp.array(g), jnp.array(offsets))
        z_rel = solvers.predictions(relative.params[s], jnp.array(rel_g), jnp.array(rel_o))
        np.testing.assert_allclose(solvers.example_losses(z_rel, jnp.array(labels)),
                                   solvers.example_losses(z_full, jnp.array(labels)), rtol=1e-4, atol=1e-6)


def test_degenerate_problems_are_defined():
    x, _, _, _ = _binary(4)
    x_sep = np.concatenate([x[:, :1] * 10, x[:, 1:]], axis=1)
    y_sep = (x[:, 0] > 0).astype(np.float32)  # linearly separable
    weights = np.stack([np.ones(N), np.zeros(N), (y_sep == 1).astype(np.float32)])  # all, none, one class
    for method in ("newton", "lbfgs"):
        sol = solvers.solve_many(jnp.array(x_sep), jnp.zeros(N), jnp.array(y_sep), jnp.array(weights), 1e-3,
                                 method=method)
        assert np.isfinite(np.asarray(sol.params)).all() and bool(sol.converged.all())
        np.testing.assert_array_equal(sol.params[1], 0.0)  # all rows masked: θ = 0, F = 0
        assert float(sol.objective[1]) == 0.0
    newton = solvers.solve_many(jnp.array(x_sep), jnp.zeros(N), jnp.array(y_sep), jnp.array(weights), 1e-3)
    assert int(newton.iterations[1]) == 0
    ref = _sklearn(x_sep, y_sep, None, 1e-3)  # weakly regularised and separable: the same optimum
    ref_obj = solvers.objective(jnp.array(ref.coef_[0], jnp.float32), x_sep, np.zeros(N), y_sep, np.ones(N), 1e-3)
    assert abs(float(newton.objective[0]) - float(ref_obj)) <= 1e-4 * float(ref_obj)


def test_unknown_method():
    with pytest.raises(ConfigError, match="solver must be one of"):
        solvers.resolve_method("cg", 10)
    assert solvers.resolve_method("auto", 400) == "newton"
    assert solvers.resolve_method("auto", 10_000) == "lbfgs"
