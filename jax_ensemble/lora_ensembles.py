"""LoRA ensembles: M adapters over one shared frozen base, trained as one program.

Members differ in their LoRA initialisation (``apply_lora`` key) and data order
(``batch_indices`` seed). Their states are stacked on a leading member axis M and one
jitted, vmapped train step advances all of them: batch leaves are (M, A, b, ...). The
base is shared, not copied. Regularisers (METHOD.md §7): weight decay on A/B (the
optimizer's ``weight_decay``), a KL penalty toward the base model's predictive
distribution over the label words (:func:`kl_regularized_loss`), early stopping (the
training loop's patience, for sequential members). The MC-dropout baseline predicts with
LoRA dropout kept on, one key per sample.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jax_ensemble.classification import label_logits
from jax_ensemble.config import LoRAConfig, TrainingConfig
from jax_ensemble.lora import apply_lora, merge_lora, split_lora
from jax_ensemble.training import (
    LossFn, Table, batch_indices, init_state, make_optimizer, make_train_step, num_rows, take_batch, total_steps,
    weighted_cross_entropy,
)


def stack_trees(trees: Sequence[Any]) -> Any:
    """M pytrees of equal structure → one pytree with a leading axis M on every leaf."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack_tree(tree: Any) -> list[Any]:
    """Inverse of :func:`stack_trees`."""
    m = jax.tree.leaves(tree)[0].shape[0]
    return [jax.tree.map(lambda x: x[i], tree) for i in range(m)]


def init_member_adapters(model: nnx.Module, config: LoRAConfig, seeds: Sequence[int]) -> tuple[nnx.GraphDef, Any, nnx.State]:
    """``(graphdef, stacked LoRA (M, …), base)``: member m's adapter initialised from key(seeds[m])."""
    adapters = []
    for seed in seeds:
        apply_lora(model, config, jax.random.key(seed))
        graphdef, lora, base = split_lora(model)
        adapters.append(lora)
    return graphdef, stack_trees(adapters), base


def kl_regularized_loss(graphdef: nnx.GraphDef, beta: float) -> LossFn:
    """Σ_i w_i [CE(z_i, y_i) + β KL(p_base,i ‖ p_θ,i)], Σ_i w_i; the base model's label
    logits come with the batch as ``base_logits`` (B, K)."""

    def loss_fn(lora, base, batch, dropout_key):
        logits = label_logits(merge_lora(graphdef, lora, base), batch, dropout_key=dropout_key)
        ce_sum, weight_sum = weighted_cross_entropy(logits, batch["label"], batch["weight"])
        log_base = jax.nn.log_softmax(batch["base_logits"].astype(jnp.float32))
        log_model = jax.nn.log_softmax(logits.astype(jnp.float32))
        kl = jnp.sum(jnp.exp(log_base) * (log_base - log_model), axis=-1)
        return ce_sum + beta * jnp.sum(batch["weight"] * kl), weight_sum

    return loss_fn


def train_members(
    loss_fn: LossFn,
    loras: Any,
    base: nnx.State,
    train: Table,
    config: TrainingConfig,
    *,
    seeds: Sequence[int],
    dropout: bool = False,
    progress: bool = True,
    desc: str = "members",
) -> Any:
    """Train the stacked adapters ``loras`` (M, …) for ``total_steps`` steps, member m
    reading the table in the order of seed ``seeds[m]`` (dropout keys from it too).
    Returns the stacked trained adapters. One compiled step serves all members."""
    rows = num_rows(train)
    steps = total_steps(config, rows)
    optimizer = make_optimizer(config, steps)
    states = jax.vmap(lambda lora: init_state(lora, optimizer))(loras)
    member_seeds = jnp.asarray(seeds, jnp.int32)

    @jax.jit
    def step(states, base, batches, member_seeds):
        def one(state, batch, seed):
            return make_train_step(loss_fn, optimizer, seed=seed, dropout=dropout)(state, base, batch)

        return jax.vmap(one)(states, batches, member_seeds)

    with tqdm(total=steps, desc=desc, unit="step", file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
        for s in range(steps):
            batches = stack_trees([
                take_batch(train, batch_indices(rows, config.batch_size, seed, s), config.grad_accum_steps)
                for seed in seeds
            ])
            states, metrics = step(states, base, batches, member_seeds)
            bar.set_postfix(loss=f"{float(jnp.mean(metrics['loss'])):.4f}", refresh=False)
            bar.update(1)
    return states.lora


def member_logits_fn(graphdef: nnx.GraphDef) -> Callable[[Any, nnx.State, Any, jax.Array | None], jax.Array]:
    """Jitted ``f(lora, base, batch, dropout_key) -> (B, K)`` for one member (or one
    dropout sample when ``dropout_key`` is given); the same program serves every member."""

    @jax.jit
    def apply(lora, base, batch, dropout_key):
        return label_logits(merge_lora(graphdef, lora, base), batch, dropout_key=dropout_key)

    return apply


def with_base_logits(table: Table, base_logits: np.ndarray) -> Table:
    """The table with a ``base_logits`` (N, K) column (for :func:`kl_regularized_loss`)."""
    return {**table, "base_logits": np.asarray(base_logits, np.float32)}
