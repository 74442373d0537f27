"""The classification output every stage studies: label-word logits at the answer position.

A classification batch is a mapping of arrays (the tasks layer builds it):

- ``input_ids`` (B, T) int32 and ``attention_mask`` (B, T) (1 = token, 0 = padding);
- ``answer_position`` (B,) int32: the position whose next-token logits score the answer
  (the last prompt token);
- ``label_token_ids`` (B, K) int32: the token id scoring each of the K answer choices
  (the first token of each label word); tasks with fewer choices in a batch mixing tasks
  pad with -1, whose logit is :data:`NO_CHOICE_LOGIT` (probability 0, zero gradient);
- ``label`` (B,) int32 gold class; ``weight`` (B,) float32 (0 for padding rows).

``label_logits`` gives z(x; θ) ∈ R^K, the model's next-token logits restricted to the K
label tokens (METHOD.md §1), computing the LM head only for those K rows.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jax_ensemble.lora import merge_lora

Batch = Mapping[str, jax.Array]

NO_CHOICE_LOGIT = -1e9
"""Logit given to a padded (-1) answer choice: finite, so 0 · logit stays 0 in losses."""


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
