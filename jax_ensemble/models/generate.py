"""Greedy decoding, one jitted program for the whole generation (for checking a model by hand)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jax_ensemble.errors import ConfigError
from jax_ensemble.models.decoder import CausalLM
from jax_ensemble.models.tokenizer import Tokenizer

_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Generation:
    prompt: str
    completion: str
    prompt_ids: list[int]
    new_ids: list[int]


@nnx.jit(static_argnames=("max_new_tokens",))
def _greedy(model: CausalLM, buffer: jax.Array, length: jax.Array, max_new_tokens: int):
    """buffer (1, T) with the prompt in [0, length) → buffer with max_new_tokens appended."""

    def step(i, buf):
        pos = length + i - 1
        logits = model(buf, logit_positions=pos[None])
        next_id = jnp.argmax(logits[0]).astype(buf.dtype)
        return buf.at[0, pos + 1].set(next_id)

    return jax.lax.fori_loop(0, max_new_tokens, step, buffer)


def greedy_generate(model: CausalLM, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 16) -> Generation:
    """Append ``max_new_tokens`` greedy tokens to ``prompt`` (stopping the text at EOS).

    The sequence buffer is padded to a multiple of 16 so prompts of similar length reuse
    one compiled program; the causal mask keeps the padding invisible."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise ConfigError("the prompt is empty")
    total = len(prompt_ids) + max_new_tokens
    if total > model.config.max_position_embeddings:
        raise ConfigError(
            f"prompt ({len(prompt_ids)} tokens) + {max_new_tokens} new tokens exceeds the model's "
            f"context of {model.config.max_position_embeddings}"
        )
    width = -(-total // _BUCKET) * _BUCKET
    buffer = jnp.full((1, width), tokenizer.pad_id, jnp.int32).at[0, : len(prompt_ids)].set(jnp.array(prompt_ids))
    out = _greedy(model, buffer, jnp.int32(len(prompt_ids)), max_new_tokens)
    new_ids = [int(t) for t in out[0, len(prompt_ids) : total]]
    if tokenizer.eos_id is not None and tokenizer.eos_id in new_ids:
        new_ids = new_ids[: new_ids.index(tokenizer.eos_id)]
    return Generation(prompt, tokenizer.decode(new_ids), prompt_ids, new_ids)
