"""The classification output every stage studies: label-word logits at the answer position.

``label_logits`` gives z(x; θ) ∈ R^K, the model's next-token logits at each row's
``answer_position`` restricted to the K label tokens (docs/method.md §1), computing the
LM head only for those K rows. Batches follow :mod:`jax_ensemble.core.batch`; padded
(-1) choices get :data:`~jax_ensemble.core.losses.NO_CHOICE_LOGIT`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jax_ensemble.core.batch import Batch
from jax_ensemble.core.losses import NO_CHOICE_LOGIT
from jax_ensemble.models.lora import merge_lora


def label_logits(model: nnx.Module, batch: Batch, *, dropout_key: jax.Array | None = None) -> jax.Array:
    """(B, K) label-word logits of ``model`` on ``batch`` (padded choices: NO_CHOICE_LOGIT)."""
    choices = batch["label_token_ids"]
    logits = model(
        batch["input_ids"],
        batch["attention_mask"],
        logit_positions=batch["answer_position"],
        token_ids=jnp.maximum(choices, 0),
        dropout_key=dropout_key,
    )
    return jnp.where(choices >= 0, logits, NO_CHOICE_LOGIT)


def lora_label_logits_fn(graphdef: nnx.GraphDef) -> Callable[[nnx.State, nnx.State, Batch], jax.Array]:
    """``f(lora_state, base_state, batch) -> (B, K)`` logits: the functional form for jit/grad.

    Pass ``base_state`` as an argument of your jitted function (bind it with
    ``functools.partial`` inside) so the frozen weights are not baked in as constants;
    differentiate with respect to ``lora_state`` only."""

    def apply(lora_state: nnx.State, base_state: nnx.State, batch: Batch) -> jax.Array:
        return label_logits(merge_lora(graphdef, lora_state, base_state), batch)

    return apply
