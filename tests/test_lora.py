"""LoRA attach/split/merge/count on an int8 base, checked against closed forms and finite differences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_ensemble.config import LoRAConfig
from jax_ensemble.errors import ConfigError
from jax_ensemble.models.classification import label_logits, lora_label_logits_fn
from jax_ensemble.models.layers import QuantizedWeight
from jax_ensemble.models.llama.modeling import LlamaConfig, LlamaForCausalLM
from jax_ensemble.models.lora import apply_lora, count_parameters, merge_lora, split_lora

CFG = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)


def tiny(base_dtype="int8") -> LlamaForCausalLM:
    return LlamaForCausalLM(CFG, base_dtype=base_dtype, rngs=nnx.Rngs(0))


def batch():
    rng = np.random.default_rng(1)
    return {
        "input_ids": jnp.asarray(rng.integers(0, 97, (3, 9)), jnp.int32),
        "attention_mask": jnp.ones((3, 9), jnp.int32),
        "answer_position": jnp.array([8, 8, 8]),
        "label_token_ids": jnp.array([[5, 6], [5, 6], [5, 6]]),
        "label": jnp.array([0, 1, 0]),
        "weight": jnp.ones(3),
    }


def test_b_zero_leaves_logits_unchanged_and_counts():
    model = tiny()
    before = np.asarray(model(batch()["input_ids"]))
    targets = apply_lora(model, LoRAConfig(rank=2, alpha=8.0), jax.random.key(0))
    assert targets == ["layers.self_attn.k_proj", "layers.self_attn.q_proj", "layers.self_attn.v_proj"]
    np.testing.assert_array_equal(np.asarray(model(batch()["input_ids"])), before)
    counts = count_parameters(model)
    # per layer: q (32·2 + 2·32) + k (32·2 + 2·16) + v (same as k), times 3 layers
    assert counts.lora_params == 3 * (128 + 96 + 96)
    assert counts.lora_bytes == 4 * counts.lora_params
    _, _, base = split_lora(model)
    int8_bytes = sum(v[...].size for p, v in nnx.to_flat_state(base) if v[...].dtype == jnp.int8)
    assert int8_bytes > 0.9 * counts.base_params


def test_int8_base_is_int8_everywhere_including_embedding():
    model = tiny()
    _, _, base = split_lora(model)
    flat = dict(nnx.to_flat_state(base))
    assert flat[("embed_tokens", "embedding")][...].dtype == jnp.int8
    assert flat[("embed_tokens", "scale")][...].shape == (97,)
    assert flat[("layers", "self_attn", "q_proj", "scale")][...].shape == (3, 32)
    kernels = [v for p, v in flat.items() if p[-1] in ("kernel", "embedding")]
    assert all(isinstance(v, QuantizedWeight) and v[...].dtype == jnp.int8 for v in kernels)


def test_lora_forward_matches_closed_form():
    """With nonzero B the q projection equals x(W + (α/r) A B) computed by hand."""
    model = tiny("float32")
    apply_lora(model, LoRAConfig(rank=2, alpha=6.0, target_modules=r".*q_proj"), jax.random.key(3))
    layer = model.layers.self_attn.q_proj
    layer.lora_b = nnx.LoRAParam(jax.random.normal(jax.random.key(4), layer.lora_b[...].shape))
    x = jax.random.normal(jax.random.key(5), (2, 32))
    w, a, b = layer.kernel[...][0], layer.lora_a[...][0], layer.lora_b[...][0]
    graphdef, state = nnx.split(layer)
    first = jax.tree.map(lambda v: v[0], state)
    got = nnx.merge(graphdef, first)(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(x @ (w + 3.0 * a @ b)), rtol=1e-5, atol=1e-5)


def test_gradients_reach_only_lora_and_match_finite_differences():
    model = tiny()
    apply_lora(model, LoRAConfig(rank=2, alpha=8.0), jax.random.key(0))
    graphdef, lora, base = split_lora(model)
    f = lora_label_logits_fn(graphdef)
    data = batch()

    def loss(lora_state, base_state):
        logits = f(lora_state, base_state, data)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(3), data["label"]])

    grads = jax.grad(loss)(lora, base)
    assert jax.tree.structure(grads) == jax.tree.structure(lora)
    flat = dict(nnx.to_flat_state(grads))
    for path, g in flat.items():
        if path[-1] == "lora_a":  # B = 0 ⇒ ∂/∂A = 0 exactly
            assert float(jnp.abs(g[...]).max()) == 0.0
        else:
            assert float(jnp.abs(g[...]).max()) > 0.0
    direction = jax.tree.map(lambda g: jax.random.normal(jax.random.key(9), g.shape), grads)
    eps = 1e-3
    plus = jax.tree.map(lambda p, d: p + eps * d, lora, direction)
    minus = jax.tree.map(lambda p, d: p - eps * d, lora, direction)
    fd = (loss(plus, base) - loss(minus, base)) / (2 * eps)
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    assert abs(float(fd) - float(analytic)) <= 2e-3 * max(1.0, abs(float(analytic)))


def test_split_merge_roundtrip_and_label_logits():
    model = tiny()
    apply_lora(model, LoRAConfig(), jax.random.key(0))
    graphdef, lora, base = split_lora(model)
    again = merge_lora(graphdef, lora, base)
    np.testing.assert_array_equal(np.asarray(label_logits(again, batch())), np.asarray(label_logits(model, batch())))
    full = np.asarray(model(batch()["input_ids"]))[:, 8][:, [5, 6]]
    np.testing.assert_allclose(np.asarray(label_logits(model, batch())), full, atol=1e-5)


def test_dropout_only_with_a_key():
    model = tiny("float32")
    apply_lora(model, LoRAConfig(dropout=0.5), jax.random.key(0))
    layer = model.layers.self_attn.q_proj
    layer.lora_b = nnx.LoRAParam(jnp.ones(layer.lora_b[...].shape))
    ids = batch()["input_ids"]
    plain = np.asarray(model(ids))
    np.testing.assert_array_equal(np.asarray(model(ids)), plain)
    assert not np.allclose(np.asarray(model(ids, dropout_key=jax.random.key(1))), plain)


def test_bad_target_regex_is_a_clear_error():
    with pytest.raises(ConfigError, match="matches no module"):
        apply_lora(tiny(), LoRAConfig(target_modules="nothing_here"), jax.random.key(0))
    with pytest.raises(ConfigError, match="not a valid regex"):
        LoRAConfig(target_modules="(")


def test_padded_choices_get_zero_probability_and_no_gradient():
    """A batch mixing a 2-way and a 3-way task pads the 2-way rows' choices with -1."""
    model = tiny()
    apply_lora(model, LoRAConfig(rank=2, alpha=8.0), jax.random.key(0))
    data = dict(batch())
    data["label_token_ids"] = jnp.array([[5, 6, -1], [5, 6, 7], [5, 6, -1]])
    logits = label_logits(model, data)
    full = np.asarray(model(data["input_ids"]))[:, 8]
    np.testing.assert_allclose(np.asarray(logits[1]), full[1, [5, 6, 7]], atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits[0, :2]), full[0, [5, 6]], atol=1e-5)
    probs = jax.nn.softmax(logits)
    assert float(probs[0, 2]) == 0.0 and float(probs[2, 2]) == 0.0
    graphdef, lora, base = split_lora(model)
    f = lora_label_logits_fn(graphdef)
    grads = jax.grad(lambda l: f(l, base, data)[0, 2])(lora)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
