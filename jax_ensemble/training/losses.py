"""What an adapter is trained to predict: objectives over a LoRA model's label logits.

An :class:`Objective` is the logits an adapter produces for a batch, ``logits(lora, base,
batch, dropout_key) -> (B, K)``, plus an optional per-row penalty. Its training loss is
Σ_i w_i [CE(z_i, y_i) + penalty_i] (summed; the train step divides by Σ_i w_i), and
validation scores the weighted CE and accuracy of the same logits (dropout off), so
early stopping follows the loss users care about. The objectives of this project:

- :func:`classification_objective`: the adapter's label logits z_θ(x) (docs/method.md §6);
- :func:`boosting_objective`: z_θ(x) + o(x) with the fixed offset o = F − z_base of the
  current ensemble F carried by the batch as ``offset_logits`` (B, K): at B = 0 the
  adapter reproduces F, and training fits the ensemble's functional gradient (§7);
- :func:`kl_regularized_objective`: z_θ(x) with penalty β·KL(p_base ‖ p_θ), the base
  model's label logits carried as ``base_logits`` (B, K) (§8).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_ensemble.core.batch import Batch, Table
from jax_ensemble.core.losses import kl_to_reference, weighted_cross_entropy
from jax_ensemble.models.classification import label_logits
from jax_ensemble.models.lora import merge_lora

LogitsFn = Callable[[Any, Any, Batch, jax.Array | None], jax.Array]
"""``logits(lora, base, batch, dropout_key) -> (B, K)``."""

LossFn = Callable[[Any, Any, Batch, jax.Array | None], tuple[jax.Array, jax.Array]]
"""``loss_fn(params, frozen, batch, dropout_key) -> (Σ w·loss, Σ w)``."""


class Objective(NamedTuple):
    """logits: what the adapter predicts; penalty: optional ``(logits, batch) -> (B,)``."""

    logits: LogitsFn
    penalty: Callable[[jax.Array, Batch], jax.Array] | None = None


def objective_loss(objective: Objective) -> LossFn:
    """(Σ_i w_i [CE(z_i, y_i) + penalty_i], Σ_i w_i) of ``objective`` on a batch."""

    def loss_fn(lora, base, batch, dropout_key):
        logits = objective.logits(lora, base, batch, dropout_key)
        ce_sum, weight_sum = weighted_cross_entropy(logits, batch["label"], batch["weight"])
        if objective.penalty is None:
            return ce_sum, weight_sum
        return ce_sum + jnp.sum(batch["weight"] * objective.penalty(logits, batch)), weight_sum

    return loss_fn


def classification_objective(graphdef: nnx.GraphDef) -> Objective:
    """The adapter's label logits z_θ(x) under CE."""

    def logits(lora, base, batch, dropout_key):
        return label_logits(merge_lora(graphdef, lora, base), batch, dropout_key=dropout_key)

    return Objective(logits)


def boosting_objective(graphdef: nnx.GraphDef) -> Objective:
    """z_θ(x) + ``offset_logits``: a boosting learner over a fixed ensemble (no dropout)."""

    def logits(lora, base, batch, dropout_key):
        del dropout_key  # boosting adapters train without dropout
        return label_logits(merge_lora(graphdef, lora, base), batch) + batch["offset_logits"]

    return Objective(logits)


def kl_regularized_objective(graphdef: nnx.GraphDef, beta: float) -> Objective:
    """z_θ(x) with penalty β·KL(softmax(``base_logits``) ‖ softmax(z_θ))."""
    return Objective(classification_objective(graphdef).logits,
                     lambda z, batch: beta * kl_to_reference(batch["base_logits"], z))


def classification_loss(graphdef: nnx.GraphDef) -> LossFn:
    """The LoRA classification loss ``(lora, base, batch, dropout_key) -> (Σ w·CE, Σ w)``."""
    return objective_loss(classification_objective(graphdef))


def with_base_logits(table: Table, base_logits: np.ndarray) -> dict[str, np.ndarray]:
    """The table with a ``base_logits`` (N, K) column (for :func:`kl_regularized_objective`)."""
    return {**table, "base_logits": np.asarray(base_logits, np.float32)}
