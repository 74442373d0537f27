"""What every causal decoder family shares: masks, the scan over stacked layers, and the
restricted logits (only requested positions and token ids).

A family's model subclasses :class:`CausalLM` and implements ``hidden_states(input_ids,
attention_mask, dropout_key=...) -> (B, T, D)`` and ``logits_from_hidden(h, token_ids)``;
``__call__`` then has the same signature in every family, which is all that
``models.classification``, ``models.generate`` and the stages rely on.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from jax_ensemble.models.layers import Embed, Linear


class DecoderConfig(Protocol):
    """The architecture numbers the shell reads from any family's config."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int

    @property
    def head_dim(self) -> int: ...

    @property
    def layer_matmul_weights(self) -> int:
        """Weights of one decoder layer's matrix multiplications (multiply-adds per token)."""
        ...


def stacked_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """``num_layers`` layers built by ``make_layer(rngs)``, as one module whose every
    variable has a leading (L, …) axis (each layer initialised from its own key)."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def build(rngs: nnx.Rngs) -> nnx.Module:
        return make_layer(rngs)

    return build(rngs)


def dropout_keys(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    """``n`` independent LoRA-dropout keys, or ``n`` Nones when there is no dropout."""
    return [None] * n if key is None else list(jax.random.split(key, n))


def positions_and_mask(attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """attention_mask (B, T) (1 = token, 0 = padding, either side) → positions (B, T) that
    count real tokens only, and the causal ∧ key-padding mask (B, 1, T, T) bool."""
    attention_mask = attention_mask.astype(jnp.bool_)
    t = attention_mask.shape[1]
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
    causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
    return positions, causal[None, None] & attention_mask[:, None, None, :]


def scan_layers(layers: nnx.Module, h: jax.Array, *args: Any, num_layers: int, dropout_key: jax.Array | None) -> jax.Array:
    """Run stacked layers (every variable with a leading (L, …) axis) over h (B, T, D):
    ``h = layer_l(h, *args, key_l)`` for l < L, one compiled layer under ``lax.scan``."""
    graphdef, layer_state = nnx.split(layers)
    keys = None if dropout_key is None else jax.random.split(dropout_key, num_layers)

    # Differentiated, the scan saves only matmul outputs per layer and recomputes the
    # rest, so the float copies of an int8/bf16 base's kernels are not stacked as
    # residuals (they would make an int8 base cost as much memory as a float32 one).
    @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    def one_layer(h, xs):
        state, key = xs
        return nnx.merge(graphdef, state)(h, *args, key), None

    h, _ = jax.lax.scan(one_layer, h, (layer_state, keys))
    return h


def head_logits(embed: Embed, lm_head: Linear | None, h: jax.Array, token_ids: jax.Array | None) -> jax.Array:
    """h (B, P, D) → logits (B, P, V), or (B, P, K) for token_ids (K,) / (B, K), from a
    separate ``lm_head`` or, when it is None, the tied embedding table."""
    if lm_head is None:
        return embed.attend(h, token_ids)
    return lm_head(h, columns=token_ids)


class CausalLM(nnx.Module):
    """Base of every family's model: next-token logits, optionally restricted.

    A subclass sets ``config`` (a :class:`DecoderConfig`) and defines
    ``hidden_states(input_ids (B, T), attention_mask (B, T), *, dropout_key)`` → final-norm
    hidden states (B, T, D), and ``logits_from_hidden(h (B, P, D), token_ids)``
    → (B, P, V), or (B, P, K) for token_ids (K,) / (B, K).
    """

    config: DecoderConfig

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        logit_positions: jax.Array | None = None,
        token_ids: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """Next-token logits.

        input_ids (B, T) int; attention_mask (B, T);
        logit_positions: None (every position), (B,) or (B, P) int: only those positions;
        token_ids: None (full vocabulary), (K,) or (B, K): only those token ids.
        Returns (B, T|P, V|K), or (B, V|K) when logit_positions is (B,).
        """
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.bool_)
        h = self.hidden_states(input_ids, attention_mask, dropout_key=dropout_key)
        single = logit_positions is not None and logit_positions.ndim == 1
        if logit_positions is not None:
            pos = logit_positions[:, None] if single else logit_positions
            h = jnp.take_along_axis(h, pos[..., None].astype(jnp.int32), axis=1)
        logits = self.logits_from_hidden(h, token_ids)
        return logits[:, 0] if single else logits
