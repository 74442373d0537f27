"""LoRA ensembles: stacked-member training equals members trained one by one, KL penalty, MC dropout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tiny_training import TINY, synthetic_table
from jax_ensemble.classification import label_logits
from jax_ensemble.config import LoRAConfig, MeshConfig, TrainingConfig
from jax_ensemble.lora_ensembles import (
    init_member_adapters, kl_regularized_loss, member_logits_fn, stack_trees, train_members, unstack_tree,
    with_base_logits,
)
from jax_ensemble.models import LlamaForCausalLM
from jax_ensemble.sharding import make_mesh
from jax_ensemble.tasks.tables import training_table
from jax_ensemble.training import classification_loss, train_adapter

CONFIG = TrainingConfig(learning_rate=3e-3, warmup_steps=2, max_steps=6, batch_size=4, max_grad_norm=1.0,
                        weight_decay=0.01)


def members(seeds, dropout=0.0):
    model = LlamaForCausalLM(TINY, base_dtype="int8", rngs=nnx.Rngs(0))
    return init_member_adapters(model, LoRAConfig(rank=2, alpha=4.0, dropout=dropout), seeds)


def test_stacked_members_equal_members_trained_one_by_one():
    """Reference: the sequential training loop (training.train_adapter on a 1-device mesh)."""
    seeds = [3, 11]
    graphdef, loras, base = members(seeds)
    table = synthetic_table(24)
    stacked = train_members(classification_loss(graphdef), loras, base, table, CONFIG, seeds=seeds, progress=False)
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    for m, (seed, lora) in enumerate(zip(seeds, unstack_tree(loras))):
        alone = train_adapter(graphdef, lora, base, table, None, CONFIG, mesh, seed=seed, progress=False).lora
        for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(unstack_tree(stacked)[m])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    first, second = unstack_tree(stacked)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)))


def test_kl_penalty_matches_closed_form():
    graphdef, loras, base = members([0])
    lora = unstack_tree(loras)[0]
    lora = jax.tree.map(lambda x: x + 0.1, lora)
    table = synthetic_table(6)
    batch = {k: jnp.asarray(v) for k, v in table.items()}
    model = nnx.merge(graphdef, lora, base)
    logits = np.asarray(label_logits(model, batch), np.float64)
    base_logits = np.random.default_rng(0).normal(size=logits.shape)
    batch = with_base_logits(batch, base_logits)
    loss, weight = kl_regularized_loss(graphdef, beta=0.5)(lora, base, batch, None)
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    log_q = base_logits - np.log(np.exp(base_logits).sum(1, keepdims=True))
    ce = -log_p[np.arange(6), table["label"]]
    kl = (np.exp(log_q) * (log_q - log_p)).sum(1)
    assert float(weight) == 6.0
    assert float(loss) == pytest.approx(float((ce + 0.5 * kl).sum()), rel=1e-5)
    zero, _ = kl_regularized_loss(graphdef, beta=0.0)(lora, base, batch, None)
    assert float(zero) == pytest.approx(float(ce.sum()), rel=1e-5)


def test_mc_dropout_samples_differ_only_with_keys():
    graphdef, loras, base = members([0], dropout=0.3)
    lora = jax.tree.map(lambda x: x + 0.2, unstack_tree(loras)[0])
    batch = {k: jnp.asarray(v) for k, v in synthetic_table(5).items()}
    f = member_logits_fn(graphdef)
    plain = np.asarray(f(lora, base, batch, None))
    np.testing.assert_array_equal(np.asarray(f(lora, base, batch, None)), plain)
    a = np.asarray(f(lora, base, batch, jax.random.key(1)))
    b = np.asarray(f(lora, base, batch, jax.random.key(2)))
    assert not np.allclose(a, b) and not np.allclose(a, plain)


def test_training_table_pads_rows_and_choices():
    from jax_ensemble.tasks.batching import TokenizedSplit

    two = TokenizedSplit("a", (np.array([5, 6, 7], np.int32), np.array([8], np.int32)), np.array([1, 2], np.int32),
                         np.array([0, 1], np.int32), 0)
    three = TokenizedSplit("b", (np.arange(40, dtype=np.int32),), np.array([3, 4, 9], np.int32),
                           np.array([2], np.int32), 0)
    table = training_table([two, three], pad_id=0, max_length=128)
    assert table["input_ids"].shape == (3, 64)
    np.testing.assert_array_equal(table["answer_position"], [2, 0, 39])
    np.testing.assert_array_equal(table["label_token_ids"], [[1, 2, -1], [1, 2, -1], [3, 4, 9]])
    np.testing.assert_array_equal(table["task_index"], [0, 0, 1])
    np.testing.assert_array_equal(table["attention_mask"].sum(1), [3, 1, 40])
    assert stack_trees([table, table])["label"].shape == (2, 3)
