"""LoRA ensembles: the engine's stacked members equal members trained one by one, KL penalty,
MC dropout, the training table."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_training import TINY, synthetic_table

from jax_ensemble.core.trees import stack_trees, unstack_tree
from jax_ensemble.data.tables import table_of_splits
from jax_ensemble.models import LlamaForCausalLM
from jax_ensemble.models.classification import label_logits
from jax_ensemble.models.lora import LoRAConfig, init_member_adapters
from jax_ensemble.stages.uq import member_logits_fn
from jax_ensemble.training.engine import train
from jax_ensemble.training.losses import (
    classification_objective,
    kl_regularized_objective,
    objective_loss,
    with_base_logits,
)
from jax_ensemble.training.mesh import make_mesh
from jax_ensemble.training.settings import MeshConfig, TrainingConfig

CONFIG = TrainingConfig(learning_rate=3e-3, warmup_steps=2, max_steps=6, batch_size=4, max_grad_norm=1.0,
                        weight_decay=0.01)


def members(seeds, dropout=0.0):
    model = LlamaForCausalLM(TINY, base_dtype="int8", rngs=nnx.Rngs(0))
    return init_member_adapters(model, LoRAConfig(rank=2, alpha=4.0, dropout=dropout), seeds)


def test_stacked_members_equal_members_trained_one_by_one():
    """The engine's stacked path (M = 2 members, one vmapped step, LoRA dropout on, 2
    micro-batches, validation every 2 steps) against ``train(..., seeds=[s_m])`` of each
    member alone: the same per-step losses, validation losses and (best) adapters, to
    float32 tolerance (only the vmapped reductions' order may differ)."""
    seeds = [3, 11]
    graphdef, loras, base = members(seeds, dropout=0.1)
    table, validation = synthetic_table(24), synthetic_table(8, seed=1)
    config = TrainingConfig(**{**CONFIG.__dict__, "grad_accum_steps": 2, "eval_every": 2, "eval_batch_size": 8})
    objective = classification_objective(graphdef)
    mesh = make_mesh(MeshConfig())
    stacked = train(objective, loras, base, table, config, mesh, seeds=seeds, stacked=True, validation=validation,
                    dropout=True, progress=False)
    assert stacked.step == config.max_steps and len(stacked.history) == config.max_steps
    for m, (seed, lora) in enumerate(zip(seeds, unstack_tree(loras))):
        alone = train(objective, lora, base, table, config, mesh, seeds=[seed], validation=validation, dropout=True,
                      progress=False)
        for a, b in zip(jax.tree.leaves(alone.lora), jax.tree.leaves(unstack_tree(stacked.lora)[m])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
        for key in ("loss", "grad_norm", "val_loss"):
            np.testing.assert_allclose([r[key][m] for r in stacked.history if key in r],
                                       [r[key] for r in alone.history if key in r], rtol=1e-5, err_msg=key)
    first, second = unstack_tree(stacked.lora)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)))
    initial = unstack_tree(loras)[0]
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(initial)))


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
    loss, weight = objective_loss(kl_regularized_objective(graphdef, beta=0.5))(lora, base, batch, None)
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    log_q = base_logits - np.log(np.exp(base_logits).sum(1, keepdims=True))
    ce = -log_p[np.arange(6), table["label"]]
    kl = (np.exp(log_q) * (log_q - log_p)).sum(1)
    assert float(weight) == 6.0
    assert float(loss) == pytest.approx(float((ce + 0.5 * kl).sum()), rel=1e-5)
    zero, _ = objective_loss(kl_regularized_objective(graphdef, beta=0.0))(lora, base, batch, None)
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
    from jax_ensemble.data.batching import TokenizedSplit

    two = TokenizedSplit("a", (np.array([5, 6, 7], np.int32), np.array([8], np.int32)), np.array([1, 2], np.int32),
                         np.array([0, 1], np.int32), 0)
    three = TokenizedSplit("b", (np.arange(40, dtype=np.int32),), np.array([3, 4, 9], np.int32),
                           np.array([2], np.int32), 0)
    table = table_of_splits([two, three], pad_id=0, max_length=128)
    assert table["input_ids"].shape == (3, 64)
    np.testing.assert_array_equal(table["answer_position"], [2, 0, 39])
    np.testing.assert_array_equal(table["label_token_ids"], [[1, 2, -1], [1, 2, -1], [3, 4, 9]])
    np.testing.assert_array_equal(table["task_index"], [0, 0, 1])
    np.testing.assert_array_equal(table["attention_mask"].sum(1), [3, 1, 40])
    assert stack_trees([table, table])["label"].shape == (2, 3)
