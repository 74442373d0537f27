"""Linearization and per-example projected gradients on a tiny int8 Llama with LoRA.

References: the full Jacobian of the batch (one ``jax.jacrev``) times the dense P built
by ``lift`` of the identity (itself checked against the documented recipe in
test_projection.py), a Python loop of ``jax.grad`` per example, and central finite
differences for f_lin."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_ensemble.config import LoRAConfig
from jax_ensemble.core.linearize import (
    choose_strategy,
    classification_output,
    linearization_errors,
    linearize,
    logits_of_output,
    projected_gradients,
    strategy_costs,
)
from jax_ensemble.core.projection import lift, make_projector
from jax_ensemble.errors import ConfigError
from jax_ensemble.models.classification import lora_label_logits_fn
from jax_ensemble.models.llama.modeling import LlamaConfig, LlamaForCausalLM
from jax_ensemble.models.lora import apply_lora, split_lora
from jax_ensemble.models.lora_gradients import batch_gradients, lora_feature_split, lora_output_fn

CFG = LlamaConfig(vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=6, tie_word_embeddings=True)


@functools.lru_cache(maxsize=1)
def tiny_lora(rank: int = 2):
    model = LlamaForCausalLM(CFG, base_dtype="int8", rngs=nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=rank, alpha=8.0), jax.random.key(1))
    return split_lora(model)


def make_batch(b: int, k: int, t: int = 7, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, t + 1, b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    return {
        "input_ids": jnp.asarray(rng.integers(0, CFG.vocab_size, (b, t)) * mask, jnp.int32),
        "attention_mask": jnp.asarray(mask),
        "answer_position": jnp.asarray(lengths - 1, jnp.int32),
        "label_token_ids": jnp.asarray(np.stack([rng.choice(CFG.vocab_size, k, replace=False) for _ in range(b)]),
                                       jnp.int32),
        "label": jnp.asarray(rng.integers(0, k, b), jnp.int32),
        "weight": jnp.ones((b,), jnp.float32),
    }


def flat(tree, lead: int = 0) -> np.ndarray:
    return np.concatenate([np.asarray(x).reshape(x.shape[:lead] + (-1,)) for x in jax.tree.leaves(tree)], axis=-1)


def perturbed(tree, scale: float, seed: int):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_classification_output():
    logits = jnp.array([[1.0, 3.0], [2.0, -1.0]])
    np.testing.assert_allclose(classification_output(logits, jnp.array([1, 1])), [2.0, -3.0])
    three = jnp.array([[0.5, 1.0, -2.0], [3.0, 4.0, 5.0]])
    relative = classification_output(three, jnp.array([0, 2]))
    np.testing.assert_array_equal(relative, [[0.5, -2.5], [1.0, 2.0]])  # z_k − z_0 by hand
    logits = logits_of_output(relative)  # (0, z_1 − z_0, z_2 − z_0): the same softmax and argmax as z
    np.testing.assert_allclose(jax.nn.softmax(logits), jax.nn.softmax(three), rtol=1e-6)
    np.testing.assert_array_equal(jnp.argmax(logits, axis=1), jnp.argmax(three, axis=1))
    assert logits_of_output(jnp.ones((2, 2, 5))).shape == (2, 3, 5)


def test_a_gradients_vanish_at_b_zero_and_are_dropped():
    graphdef, lora, base = tiny_lora()
    features, fixed, space = lora_feature_split(lora)
    assert space == "lora_b"
    assert all("lora_b" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(features)[0])
    batch = make_batch(3, 2)
    out = lora_output_fn(graphdef)
    grads = jax.jit(jax.grad(lambda l, b: out(l, nnx.State({}), b, batch).sum()))(lora, base)
    a_grads, _ = nnx.split_state(grads, nnx.PathContains("lora_a"), ...)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(a_grads))
    assert lora_feature_split(perturbed(lora, 0.1, 0))[2] == "lora"


@pytest.mark.parametrize("k", [2, 3])
def test_strategies_agree_with_full_jacobian_times_p(k):
    graphdef, lora, base = tiny_lora()
    features, fixed, _ = lora_feature_split(lora)
    batch = make_batch(5, k, seed=k)
    d = 48
    projector = make_projector(features, d, seed=3, block_rows=100)
    out = lora_output_fn(graphdef)
    fn = lambda p, x: out(p, fixed, base, x)  # noqa: E731
    jac = jax.jit(jax.jacrev(fn))(features, batch)  # leaves (B, *out, *shape)
    dense = flat(lift(projector, jnp.eye(d)), 1).T  # (p, d)
    lead = 1 if k == 2 else 2
    reference = flat(jac, lead) @ dense  # (B, [K − 1,] d)
    one = jax.jit(jax.jacrev(lambda p, x: fn(p, x)[0]))
    loop = np.stack([flat(one(features, jax.tree.map(lambda x: x[i:i + 1], batch)), lead - 1) for i in range(5)])
    loop = loop @ dense
    np.testing.assert_allclose(loop, reference, rtol=1e-4, atol=1e-6)
    if k > 2:  # the stage's K logits relative to class 0, from the raw label-word logits' Jacobian
        logits = lambda p, x: lora_label_logits_fn(graphdef)(nnx.merge_state(p, fixed), base, x)  # noqa: E731
        raw = flat(jax.jit(jax.jacrev(logits))(features, batch), 2) @ dense  # (B, K, d)
        np.testing.assert_allclose(reference, raw[:, 1:] - raw[:, :1], rtol=1e-4, atol=1e-4 * np.abs(raw).max())
        reference = raw - raw[:, :1]
    scale = np.max(np.abs(reference))
    for strategy in ("reverse", "forward", "auto") if k == 2 else ("reverse", "forward"):
        f0, g = batch_gradients(features, fixed, base, batch, graphdef=graphdef, projector=projector,
                                strategy=strategy, direction_chunk=20)
        assert g.shape == reference.shape
        assert np.max(np.abs(np.asarray(g) - reference)) <= 1e-4 * scale, strategy
    expected = fn(features, batch) if k == 2 else logits_of_output(fn(features, batch))
    np.testing.assert_allclose(np.asarray(f0), np.asarray(expected), rtol=1e-6)


def test_f_lin_equals_f_at_theta0_and_matches_to_second_order():
    graphdef, lora, base = tiny_lora()
    theta0 = perturbed(lora, 0.05, 1)  # a generic point: B != 0, so A matters too
    out = lora_output_fn(graphdef)
    fn = lambda p, x: out(p, nnx.State({}), base, x)  # noqa: E731
    batch = make_batch(4, 3)
    f_lin = jax.jit(linearize(fn, theta0))
    np.testing.assert_allclose(np.asarray(f_lin(theta0, batch)), np.asarray(fn(theta0, batch)), rtol=1e-6)
    direction = jax.tree.map(lambda a, b: a - b, perturbed(lora, 0.05, 2), lora)
    step = lambda t: jax.tree.map(lambda a, v: a + t * v, theta0, direction)  # noqa: E731
    # JVP against central finite differences
    h = 1e-2
    fd = (np.asarray(fn(step(h), batch)) - np.asarray(fn(step(-h), batch))) / (2 * h)
    jvp = np.asarray(f_lin(step(1.0), batch) - fn(theta0, batch))
    np.testing.assert_allclose(jvp, fd, rtol=2e-3, atol=2e-3 * np.max(np.abs(fd)))
    # the remainder f − f_lin shrinks like t²
    errors = [np.max(np.abs(np.asarray(fn(step(t), batch) - f_lin(step(t), batch)))) for t in (0.4, 0.2, 0.1)]
    assert 3.0 < errors[0] / errors[1] < 5.0 and 3.0 < errors[1] / errors[2] < 5.0, errors


def test_linearization_errors_by_hand():
    f0 = jnp.array([1.0, -2.0, 0.5])
    f = jnp.array([2.0, -1.0, 0.5])
    f_lin = jnp.array([1.5, -1.0, 1.0])
    err = linearization_errors(f, f_lin, f0, weight=jnp.array([1.0, 1.0, 0.0]))
    np.testing.assert_allclose(float(err["relative_output_error"]), 0.5 / 2.0)
    np.testing.assert_allclose(float(err["relative_squared_error"]), ((0.5 / 2.0) ** 2 + 0.0) / 2)


def test_cost_model_and_auto_choice():
    llm = strategy_costs(num_params=115_200, dim=400, batch_size=16, outputs=1, forward_flops=16 * 17e9,
                         direction_chunk=32)
    assert choose_strategy(llm, memory_budget_bytes=2**30) == "reverse"
    huge = strategy_costs(num_params=10**9, dim=8, batch_size=64, outputs=1, forward_flops=1e9, direction_chunk=8)
    assert huge["reverse"]["memory_bytes"] > 2**30
    assert choose_strategy(huge, memory_budget_bytes=2**30) == "forward"


def test_generic_apply_fn_and_bad_strategy():
    """Any apply_fn(params, batch) works: a linear model's per-example gradient is its input."""
    params = {"w": jnp.zeros((6,)), "b": jnp.zeros(())}
    x = jax.random.normal(jax.random.key(0), (4, 6))
    apply_fn = lambda p, xb: xb @ p["w"] + p["b"]  # noqa: E731
    projector = make_projector(params, 5, seed=0)
    dense = flat(lift(projector, jnp.eye(5)), 1).T
    expected = np.concatenate([np.ones((4, 1)), np.asarray(x)], axis=1) @ dense  # leaves sorted: b, w
    for strategy in ("reverse", "forward"):
        got = projected_gradients(apply_fn, params, x, projector, strategy=strategy, direction_chunk=2)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="strategy must be one of"):
        projected_gradients(apply_fn, params, x, projector, strategy="sideways")
