"""GPT-2-family decoder (GPT-2, DistilGPT-2) in Flax NNX.

Learned position embeddings, pre-LayerNorm (with bias) blocks, a fused q/k/v projection
``c_attn`` and biased ``c_proj`` / ``c_fc`` layers (Hugging Face's ``Conv1D``, whose
weights are stored (in, out), as our kernels are), a GELU MLP (tanh approximation for
``gelu_new``), and an LM head tied to the token embedding (or separate when the config
unties it). Module names follow Hugging Face's ``GPT2LMHeadModel`` (``wte``, ``wpe``,
``attn.c_attn``, ``mlp.c_fc``, ``ln_f``), except that the decoder blocks (HF
``transformer.h``) are stacked on a leading axis under ``layers``, as in every family,
and run with ``lax.scan``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jax_ensemble.errors import CheckpointError
from jax_ensemble.models.biased_layers import BiasedLinear, LayerNorm
from jax_ensemble.models.decoder import (
    CausalLM,
    dropout_keys,
    head_logits,
    positions_and_mask,
    scan_layers,
    stacked_layers,
)
from jax_ensemble.models.layers import Embed, Linear

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}
"""Hugging Face ``activation_function`` names this family implements."""
MODEL_TYPES = ("gpt2",)
"""Hugging Face ``model_type`` values this family loads."""


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Architecture hyper-parameters, named as in the other families (Hugging Face's GPT-2
    ``config.json`` calls the first ones ``n_embd``, ``n_layer``, ``n_head``, ``n_inner``,
    ``n_positions``)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 1024
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(
                f"model config: n_embd={self.hidden_size} is not a multiple of n_head={self.num_attention_heads}"
            )
        if self.activation_function not in ACTIVATIONS:
            raise CheckpointError(
                f"model config: activation_function {self.activation_function!r} is not supported "
                f"({', '.join(ACTIVATIONS)})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def layer_matmul_weights(self) -> int:
        """Weights of one block's matrix multiplications: c_attn 3D² + c_proj D² + c_fc and c_proj 2·D·F."""
        d, f = self.hidden_size, self.intermediate_size
        return 4 * d * d + 2 * d * f

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "GPT2Config":
        """From a Hugging Face GPT-2 ``config.json`` mapping."""
        for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if cfg.get(key):
                raise CheckpointError(f"model config: {key}=true is not supported by the GPT-2 decoder")
        try:
            hidden = int(cfg["n_embd"])
            eos = cfg.get("eos_token_id")
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                num_hidden_layers=int(cfg["n_layer"]),
                num_attention_heads=int(cfg["n_head"]),
                intermediate_size=int(cfg.get("n_inner") or 4 * hidden),
                max_position_embeddings=int(cfg.get("n_positions", 1024)),
                layer_norm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-5)),
                activation_function=str(cfg.get("activation_function", "gelu_new")),
                scale_attn_weights=bool(cfg.get("scale_attn_weights", True)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=eos[0] if isinstance(eos, list) else eos,
                pad_token_id=cfg.get("pad_token_id"),
            )
        except KeyError as e:
            raise CheckpointError(f"model config.json lacks the key {e.args[0]!r}") from None


class Attention(nnx.Module):
    """Multi-head causal self-attention with the fused projection c_attn (D → 3D: q | k | v)."""

    def __init__(self, config: GPT2Config, *, base_dtype: str, compute_dtype: str, rngs: nnx.Rngs):
        d = config.hidden_size
        kw = dict(base_dtype=base_dtype, compute_dtype=compute_dtype, rngs=rngs)
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        self.c_attn = BiasedLinear(d, 3 * d, **kw)
        self.c_proj = BiasedLinear(d, d, **kw)

    def __call__(self, x, mask, dropout_key=None):
        """x (B, T, D), mask (B, 1, T, T) bool → (B, T, D)."""
        b, t, d = x.shape
        ka, kp = dropout_keys(dropout_key, 2)
        q, k, v = (y.reshape(b, t, self.num_heads, self.head_dim)
                   for y in jnp.split(self.c_attn(x, dropout_key=ka), 3, axis=-1))
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=self.scale)
        return self.c_proj(out.reshape(b, t, d), dropout_key=kp)


class MLP(nnx.Module):
    """c_proj(act(c_fc(x)))."""

    def __init__(self, config: GPT2Config, *, base_dtype: str, compute_dtype: str, rngs: nnx.Rngs):
        kw = dict(base_dtype=base_dtype, compute_dtype=compute_dtype, rngs=rngs)
        self.activation_function = config.activation_function
        self.c_fc = BiasedLinear(config.hidden_size, config.intermediate_size, **kw)
        self.c_proj = BiasedLinear(config.intermediate_size, config.hidden_size, **kw)

    def __call__(self, x, dropout_key=None):
        kf, kp = dropout_keys(dropout_key, 2)
        hidden = ACTIVATIONS[self.activation_function](self.c_fc(x, dropout_key=kf))
        return self.c_proj(hidden, dropout_key=kp)


class Block(nnx.Module):
    """Pre-norm block: h + attn(ln_1(h)), then h + mlp(ln_2(h))."""

    def __init__(self, config: GPT2Config, *, base_dtype: str, compute_dtype: str, rngs: nnx.Rngs):
        kw = dict(base_dtype=base_dtype, compute_dtype=compute_dtype, rngs=rngs)
        norm = dict(eps=config.layer_norm_epsilon, compute_dtype=compute_dtype)
        self.ln_1 = LayerNorm(config.hidden_size, **norm)
        self.attn = Attention(config, **kw)
        self.ln_2 = LayerNorm(config.hidden_size, **norm)
        self.mlp = MLP(config, **kw)

    def __call__(self, h, mask, dropout_key=None):
        ka, km = dropout_keys(dropout_key, 2)
        h = h + self.attn(self.ln_1(h), mask, ka)
        return h + self.mlp(self.ln_2(h), km)


class GPT2LMHeadModel(CausalLM):
    """The GPT-2 decoder with its LM head.

    ``base_dtype`` (``int8`` | ``bfloat16`` | ``float32``) is how frozen weights (kernels,
    token and position embeddings) are stored; biases and LayerNorms stay float32;
    ``compute_dtype`` is the activation dtype.
    """

    def __init__(
        self,
        config: GPT2Config,
        *,
        base_dtype: str = "float32",
        compute_dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.base_dtype = base_dtype
        self.compute_dtype = compute_dtype
        kw = dict(base_dtype=base_dtype, compute_dtype=compute_dtype)
        self.wte = Embed(config.vocab_size, config.hidden_size, **kw, rngs=rngs)
        self.wpe = Embed(config.max_position_embeddings, config.hidden_size, **kw, rngs=rngs)
        self.layers = stacked_layers(lambda r: Block(config, **kw, rngs=r), config.num_hidden_layers, rngs)
        self.ln_f = LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon, compute_dtype=compute_dtype)
        self.lm_head = (
            None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size, **kw, rngs=rngs)
        )

    def hidden_states(
        self, input_ids: jax.Array, attention_mask: jax.Array, *, dropout_key: jax.Array | None = None
    ) -> jax.Array:
        """input_ids (B, T), attention_mask (B, T) (1 = token, 0 = padding, either side)
        → ln_f hidden states (B, T, D). Positions count real tokens only, so a
        left-padded row gets the position embeddings of its unpadded self."""
        positions, mask = positions_and_mask(attention_mask)
        h = self.wte(input_ids) + self.wpe(positions)
        h = scan_layers(self.layers, h, mask, num_layers=self.config.num_hidden_layers, dropout_key=dropout_key)
        return self.ln_f(h)

    def logits_from_hidden(self, h: jax.Array, token_ids: jax.Array | None = None) -> jax.Array:
        """h (B, P, D) → logits (B, P, V), or (B, P, K) for token_ids (K,) / (B, K)."""
        return head_logits(self.wte, self.lm_head, h, token_ids)
