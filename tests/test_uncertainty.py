"""Uncertainty metrics against a hand-checkable vector, loops and scikit-learn."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jax_ensemble.core.uncertainty import (
    auroc,
    brier_score,
    calibration_report,
    expected_calibration_error,
    negative_log_likelihood,
    ood_auroc,
    predictive,
    reliability_bins,
)

P1 = np.array([.51, .45, .39, .66, .68, .29, .81, .85])
Y = np.array([0, 0, 0, 1, 0, 1, 1, 1])
PROBS = jnp.asarray(np.stack([1 - P1, P1], axis=1))


def loop_ece(probs: np.ndarray, labels: np.ndarray, num_bins: int) -> float:
    """Direct loop: for each bin (lo, hi], |mean correct − mean confidence| weighted by its share."""
    total = 0.0
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    for b in range(num_bins):
        lo, hi = b / num_bins, (b + 1) / num_bins
        members = [i for i in range(len(labels)) if (lo < conf[i] <= hi) or (b == 0 and conf[i] == 0)]
        if members:
            total += len(members) / len(labels) * abs(correct[members].mean() - conf[members].mean())
    return total


def test_hand_checkable_ece_bins():
    bins = reliability_bins(PROBS, jnp.asarray(Y), num_bins=10)
    np.testing.assert_array_equal(np.asarray(bins.counts), [0, 0, 0, 0, 0, 2, 3, 1, 2, 0])
    # bins 5..8: acc (1/2, 2/3, 0, 1), conf (.53, .65, .71, .83) → ECE = 1.16 / 8
    want = (2 * abs(.5 - .53) + 3 * abs(2 / 3 - .65) + abs(0 - .71) + 2 * abs(1 - .83)) / 8
    assert float(expected_calibration_error(PROBS, jnp.asarray(Y), 10)) == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("num_bins", [5, 10, 15])
def test_ece_matches_loop_on_random_multiclass(num_bins):
    rng = np.random.default_rng(num_bins)
    logits = rng.normal(size=(500, 4)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 4, 500)
    got = float(expected_calibration_error(jnp.asarray(probs), jnp.asarray(labels), num_bins))
    assert got == pytest.approx(loop_ece(probs, labels, num_bins), abs=1e-5)


def test_auroc_matches_sklearn_including_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    neg = np.round(rng.normal(0, 1, 300), 1)
    pos = np.round(rng.normal(0.7, 1, 200), 1)
    want = roc_auc_score(np.r_[np.zeros(300), np.ones(200)], np.r_[neg, pos])
    assert float(auroc(jnp.asarray(neg), jnp.asarray(pos))) == pytest.approx(want, abs=1e-6)


def test_ood_scores_and_identical_member_ensemble():
    rng = np.random.default_rng(1)
    sharp = jnp.asarray(rng.dirichlet([0.2, 0.2, 0.2], 100))
    flat = jnp.asarray(rng.dirichlet([5.0, 5.0, 5.0], 100))
    assert float(ood_auroc(sharp, flat, "max_prob")) > 0.9
    assert float(ood_auroc(sharp, flat, "entropy")) > 0.9
    labels = jnp.asarray(rng.integers(0, 3, 100))
    logits = jnp.asarray(rng.normal(size=(100, 3)))
    members = jnp.stack([logits] * 5)
    assert float(negative_log_likelihood(predictive(members), labels)) == pytest.approx(
        float(negative_log_likelihood(predictive(logits), labels)), rel=1e-6
    )


def test_nll_and_brier_closed_forms():
    probs = jnp.array([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]])
    labels = jnp.array([0, 1])
    assert float(negative_log_likelihood(probs, labels)) == pytest.approx(-(np.log(0.7) + np.log(0.25)) / 2)
    want = ((0.3**2 + 0.2**2 + 0.1**2) + (0.25**2 + 0.75**2 + 0.5**2)) / 2
    assert float(brier_score(probs, labels)) == pytest.approx(want)
    report = calibration_report(probs, labels, from_logits=False)
    assert set(report) == {"accuracy", "ece", "nll", "brier"} and report["accuracy"] == 0.5
