"""Classification losses over label-word logits (B, K), with padded choices and row weights.

Rows mixing tasks with different K pad the missing choices with :data:`NO_CHOICE_LOGIT`
(probability 0, zero gradient); padding rows carry weight 0. See docs/method.md §1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

NO_CHOICE_LOGIT = -1e9
"""Logit given to a padded answer choice: finite, so 0 · logit stays 0 in losses."""


def weighted_cross_entropy(logits: jax.Array, label: jax.Array, weight: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits (B, K), label (B,) int, weight (B,) → (Σ_i w_i·(logsumexp z_i − z_{i,y_i}), Σ_i w_i)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), label)
    weight = weight.astype(jnp.float32)
    return jnp.sum(weight * ce), jnp.sum(weight)


def kl_to_reference(reference_logits: jax.Array, logits: jax.Array) -> jax.Array:
    """(B,) KL(softmax(reference) ‖ softmax(logits)) over the K choices."""
    log_ref = jax.nn.log_softmax(reference_logits.astype(jnp.float32))
    log_model = jax.nn.log_softmax(logits.astype(jnp.float32))
    return jnp.sum(jnp.exp(log_ref) * (log_ref - log_model), axis=-1)
