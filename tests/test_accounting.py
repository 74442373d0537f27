"""Analytical FLOPs against XLA's own count of the compiled forward pass."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import pytest
from flax import nnx

from jax_ensemble.core.linearize import forward_flops as xla_flops
from jax_ensemble.models import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from jax_ensemble.models.classification import label_logits
from jax_ensemble.stages.accounting import affinity_solve_flops, forward_flops, newton_solve_flops, peak_memory_bytes

CFG = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
"""One layer: XLA's cost analysis counts a scan's body once, whatever its trip count."""
GPT2_CFG = GPT2Config(vocab_size=512, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                      intermediate_size=160, max_position_embeddings=64)


@pytest.mark.parametrize("rows, length", [(2, 32), (4, 64)])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_forward_flops_match_xla_cost_analysis(rows, length, family):
    cfg, model_class = {"llama": (CFG, LlamaForCausalLM), "gpt2": (GPT2_CFG, GPT2LMHeadModel)}[family]
    model = model_class(cfg, base_dtype="float32", rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    batch = {
        "input_ids": jnp.zeros((rows, length), jnp.int32),
        "attention_mask": jnp.ones((rows, length), jnp.int32),
        "answer_position": jnp.full((rows,), length - 1),
        "label_token_ids": jnp.tile(jnp.array([5, 6]), (rows, 1)),
    }
    counted = xla_flops(lambda s, b: label_logits(nnx.merge(graphdef, s), b), state, batch)
    ours = forward_flops(cfg, rows, length, choices=2)
    assert ours == pytest.approx(counted, rel=0.1)
    deeper = dataclasses.replace(cfg, num_hidden_layers=5)
    head = 2 * cfg.hidden_size * 2 * rows
    assert forward_flops(deeper, rows, length) - head == pytest.approx(5 * (ours - head))


def test_newton_flops_closed_form_and_memory():
    assert newton_solve_flops(2, 10, 1, 3, 4) == 2 * 4 * (10 * 9 + 9)
    # vmapped Newton pads every subset to the largest one's rows; L-BFGS masks all 30 rows
    assert affinity_solve_flops("newton", [10, 6, 8], 30, 1, 3, 4) == 3 * 4 * (10 * 9 + 9)
    assert affinity_solve_flops("lbfgs", [10, 6, 8], 30, 7, 3, 4) == 3 * 4 * 4 * 30 * 7 * 3
    assert peak_memory_bytes()["host_peak_rss"] > 10 * 2**20
