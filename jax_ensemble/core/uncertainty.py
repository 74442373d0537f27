"""Accuracy and uncertainty metrics of (ensemble) predictions.

Inputs are member predictions of shape (M, N, K) (M members, N examples, K classes) or a
single prediction (N, K), as logits (``from_logits=True``) or probabilities. An
ensemble predicts with the mean of its members' probabilities, p̄ = (1/M) Σ_m p_m.

- accuracy: mean of [argmax p̄ = y];
- ECE: equal-width bins over the top-label confidence c = max_k p̄_k; bin b holds
  c ∈ ((b−1)/B, b/B] (c = 0 joins the first bin); ECE = Σ_b (n_b / N) |acc_b − conf_b|;
- NLL: mean of −log p̄_y (the averaged prediction's, not the members' average NLL);
- Brier: mean over examples of Σ_k (p̄_k − 1[k = y])²;
- OOD AUROC: probability that an out-of-distribution example scores higher than an
  in-distribution one (ties count ½), for scores −max_k p̄_k or the entropy of p̄.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_ensemble.errors import ConfigError

_TINY = 1e-12


def predictive(pred: jax.Array, *, from_logits: bool = True) -> jax.Array:
    """(M, N, K) or (N, K) logits/probabilities → the (N, K) mean member probability."""
    probs = jax.nn.softmax(pred, axis=-1) if from_logits else pred
    return probs.mean(axis=0) if probs.ndim == 3 else probs


def accuracy(probs: jax.Array, labels: jax.Array) -> jax.Array:
    """probs (N, K), labels (N,) → fraction of argmax hits."""
    return jnp.mean(jnp.argmax(probs, axis=-1) == labels)


class ReliabilityBins(NamedTuple):
    """Per-bin example counts (B,), mean accuracy (B,) and mean confidence (B,) (0 where empty)."""

    counts: jax.Array
    accuracy: jax.Array
    confidence: jax.Array


def reliability_bins(probs: jax.Array, labels: jax.Array, num_bins: int = 15) -> ReliabilityBins:
    """Group examples into equal-width bins of top-label confidence (right-closed)."""
    confidence = jnp.max(probs, axis=-1)
    correct = (jnp.argmax(probs, axis=-1) == labels).astype(jnp.float32)
    index = jnp.clip(jnp.ceil(confidence * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
    counts = jnp.zeros(num_bins).at[index].add(1.0)
    safe = jnp.maximum(counts, 1.0)
    return ReliabilityBins(
        counts=counts,
        accuracy=jnp.zeros(num_bins).at[index].add(correct) / safe,
        confidence=jnp.zeros(num_bins).at[index].add(confidence) / safe,
    )


def expected_calibration_error(probs: jax.Array, labels: jax.Array, num_bins: int = 15) -> jax.Array:
    """ECE with ``num_bins`` equal-width confidence bins (default 15)."""
    bins = reliability_bins(probs, labels, num_bins)
    return jnp.sum(bins.counts * jnp.abs(bins.accuracy - bins.confidence)) / probs.shape[0]


def negative_log_likelihood(probs: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean −log p_y (probabilities floored at 1e-12)."""
    gold = jnp.take_along_axis(probs, labels[:, None], axis=-1)[:, 0]
    return -jnp.mean(jnp.log(jnp.maximum(gold, _TINY)))


def brier_score(probs: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over examples of the squared distance to the one-hot label, summed over classes."""
    onehot = jax.nn.one_hot(labels, probs.shape[-1], dtype=probs.dtype)
    return jnp.mean(jnp.sum((probs - onehot) ** 2, axis=-1))


def entropy(probs: jax.Array) -> jax.Array:
    """(N, K) → (N,) predictive entropy in nats."""
    return -jnp.sum(probs * jnp.log(jnp.maximum(probs, _TINY)), axis=-1)


def auroc(scores_negative: jax.Array, scores_positive: jax.Array) -> jax.Array:
    """P(score_pos > score_neg) + ½ P(equal): the area under the ROC curve (Mann–Whitney U)."""
    greater = (scores_positive[:, None] > scores_negative[None, :]).astype(jnp.float32)
    ties = (scores_positive[:, None] == scores_negative[None, :]).astype(jnp.float32)
    return jnp.mean(greater + 0.5 * ties)


def ood_auroc(probs_in: jax.Array, probs_out: jax.Array, score: str = "max_prob") -> jax.Array:
    """AUROC of telling out-of-distribution (positive) from in-distribution examples by
    ``score``: ``max_prob`` (−max_k p_k) or ``entropy``."""
    if score == "max_prob":
        return auroc(-jnp.max(probs_in, axis=-1), -jnp.max(probs_out, axis=-1))
    if score == "entropy":
        return auroc(entropy(probs_in), entropy(probs_out))
    raise ConfigError(f"unknown OOD score {score!r}: use max_prob or entropy")


def calibration_report(
    pred: jax.Array, labels: jax.Array, *, from_logits: bool = True, num_bins: int = 15
) -> dict[str, float]:
    """accuracy, ece, nll and brier of the (ensemble) prediction, as floats."""
    probs = predictive(pred, from_logits=from_logits)
    return {
        "accuracy": float(accuracy(probs, labels)),
        "ece": float(expected_calibration_error(probs, labels, num_bins)),
        "nll": float(negative_log_likelihood(probs, labels)),
        "brier": float(brier_score(probs, labels)),
    }
