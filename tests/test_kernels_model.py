"""The model with the Pallas kernels (interpreted on CPU) equals the plain-XLA model: logits and
LoRA gradients of a tiny int8 Llama in float32 and bfloat16; and the ``model.kernels`` choice."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_kernels import close

from jax_ensemble.config import LoRAConfig, load_config
from jax_ensemble.errors import ConfigError
from jax_ensemble.kernels.backend import resolve_kernels
from jax_ensemble.models.classification import lora_label_logits_fn
from jax_ensemble.models.layers import select_kernels
from jax_ensemble.models.llama.modeling import LlamaConfig, LlamaForCausalLM
from jax_ensemble.models.lora import apply_lora, split_lora

TINY = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=12, tie_word_embeddings=True)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_model_logits_and_lora_gradients_with_kernels_equal_without(compute_dtype):
    model = LlamaForCausalLM(TINY, base_dtype="int8", compute_dtype=compute_dtype, rngs=nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, target_modules=".*"), jax.random.key(1))
    graphdef, lora, base = split_lora(model)
    lora = jax.tree.map(lambda v: v + 0.05, lora)  # B ≠ 0, so every LoRA branch contributes
    rng = np.random.default_rng(0)
    data = {"input_ids": jnp.asarray(rng.integers(0, 97, (3, 11)), jnp.int32),
            "attention_mask": jnp.asarray(np.r_[np.ones((2, 11)), [[0] * 3 + [1] * 8]], jnp.int32),
            "answer_position": jnp.array([10, 10, 10]), "label_token_ids": jnp.array([[5, 6]] * 3),
            "label": jnp.array([0, 1, 0]), "weight": jnp.ones(3)}

    def loss_and_grads(kernels):
        model = nnx.merge(graphdef, lora, base)
        select_kernels(model, kernels)
        gd, lo, ba = split_lora(model)
        f = lora_label_logits_fn(gd)

        def loss(lo):
            logits = f(lo, ba, data).astype(jnp.float32)
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(3), data["label"]]), logits

        (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(lo)
        assert ("pallas_call" in str(jax.make_jaxpr(loss)(lo))) == (kernels == "pallas")
        return logits, grads

    dtype = jnp.float32 if compute_dtype == "float32" else jnp.bfloat16
    logits, grads = loss_and_grads("pallas")
    logits_ref, grads_ref = loss_and_grads("xla")
    close(logits, logits_ref, dtype)
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        close(g, g_ref, jnp.float32 if dtype == jnp.float32 else jnp.bfloat16)


def test_kernel_choice_resolves_per_backend_and_bad_choice_is_a_config_error():
    on_gpu = jax.default_backend() in ("cuda", "rocm", "gpu")
    assert resolve_kernels("auto", "projection") == ("pallas" if on_gpu else "xla")
    assert resolve_kernels("auto", "matmul") == "xla"  # measured slower than XLA on an H200
    assert resolve_kernels("pallas", "matmul") == "pallas"
    config = load_config("tiny", ["model.kernels=pallas"])
    assert config.model.kernels == "pallas"
    assert config.model.cache_identity() == load_config("tiny").model.cache_identity()
    with pytest.raises(ConfigError, match="model.kernels"):
        load_config("tiny", ["model.kernels=triton"])
