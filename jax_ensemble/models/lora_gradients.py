"""Per-example projected gradients of the LLM's classification output at the base model.

The LoRA edge of :mod:`jax_ensemble.core.linearize`: the studied output f(x; θ) (binary
log-odds or K − 1 log-odds against class 0, :func:`~jax_ensemble.core.linearize.classification_output`)
as a function of the LoRA state, and one jitted program per batch returning the base
outputs f0 and the projected gradients G.

Feature space (docs/method.md §2): at θ0 every ``lora_b`` is zero, so ∂f/∂A = s·x·(∂f/∂y)·Bᵀ
is exactly zero for every ``lora_a``. :func:`lora_feature_split` then differentiates
with respect to the B matrices only (``feature_space = "lora_b"``: p halves and G loses
no information); if any B is non-zero (e.g. after a warm-up) it keeps every LoRA leaf
(``feature_space = "lora"``). The manifest records which.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jax_ensemble.core.linearize import classification_output, logits_of_output, value_and_projected_gradients
from jax_ensemble.core.projection import Projector
from jax_ensemble.models.classification import Batch, lora_label_logits_fn

FEATURE_SPACES = {
    "lora_b": "LoRA B matrices only: every lora_b is zero at the base model, so gradients "
    "with respect to lora_a vanish exactly and are dropped",
    "lora": "every LoRA leaf (A and B): some lora_b is non-zero",
}


def lora_feature_split(lora_state: nnx.State) -> tuple[nnx.State, nnx.State, str]:
    """``(features, fixed, feature_space)``: the LoRA leaves to differentiate, the rest,
    and the name of the feature space (a key of :data:`FEATURE_SPACES`)."""
    b_state, rest = nnx.split_state(lora_state, nnx.PathContains("lora_b"), ...)
    if all(not bool(jnp.any(leaf != 0)) for leaf in jax.tree.leaves(b_state)):
        return b_state, rest, "lora_b"
    return lora_state, nnx.State({}), "lora"


def lora_output_fn(graphdef: nnx.GraphDef) -> Callable[[nnx.State, nnx.State, nnx.State, Batch], jax.Array]:
    """``f(features, fixed, base_state, batch)``: (B,) binary log-odds or (B, K − 1) log-odds
    against class 0 (K > 2) of the model with LoRA state ``merge_state(features, fixed)``."""
    logits_fn = lora_label_logits_fn(graphdef)

    def output(features: nnx.State, fixed: nnx.State, base_state: nnx.State, batch: Batch) -> jax.Array:
        logits = logits_fn(nnx.merge_state(features, fixed), base_state, batch)
        return classification_output(logits, batch["label"])

    return output


@functools.partial(jax.jit, static_argnames=("graphdef", "projector", "strategy", "direction_chunk",
                                             "separate_outputs"))
def batch_gradients(
    features: nnx.State,
    fixed: nnx.State,
    base_state: nnx.State,
    batch: Batch,
    *,
    graphdef: nnx.GraphDef,
    projector: Projector,
    strategy: str,
    direction_chunk: int = 32,
    separate_outputs: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """One batch → (f0 (B,) or (B, K), G (B, d) or (B, K, d)), both float32.

    f0 is the output at the given LoRA state, G its projected per-example gradient with
    respect to ``features`` (the projector must be built for ``features``); for K > 2 both
    are relative to class 0 (f0's column 0 and G's row 0 are 0: K − 1 backward passes,
    :func:`~jax_ensemble.core.linearize.logits_of_output`);
    ``separate_outputs`` as in :func:`~jax_ensemble.core.linearize.value_and_projected_gradients`."""
    output = lora_output_fn(graphdef)
    fn = lambda p, x: output(p, fixed, base_state, x)  # noqa: E731  (binds jit arguments)
    f0, grads = value_and_projected_gradients(
        fn, features, batch, projector, strategy=strategy, direction_chunk=direction_chunk,
        separate_outputs=separate_outputs,
    )
    if f0.ndim == 2:  # K > 2: K − 1 log-odds → K logits relative to class 0 (column 0 is 0)
        f0, grads = logits_of_output(f0), logits_of_output(grads)
    return f0.astype(jnp.float32), grads


def feature_metadata(feature_space: str, features: Any) -> dict[str, Any]:
    """What was differentiated, for the manifest."""
    return {
        "feature_space": feature_space,
        "feature_space_note": FEATURE_SPACES[feature_space],
        "num_features": int(sum(x.size for x in jax.tree.leaves(features))),
    }

