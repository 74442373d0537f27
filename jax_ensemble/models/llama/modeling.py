"""Llama-family decoder (Llama 2/3, SmolLM, Mistral-style) in Flax NNX.

Grouped-query attention, rotary embeddings (with the config's theta and scaling),
RMSNorm, SwiGLU MLP, tied or separate LM head. Module names follow Hugging Face's
``LlamaForCausalLM`` (``layers.self_attn.q_proj`` …) so LoRA target regexes and PEFT
export read the same. The decoder layers are stacked on a leading axis (L, …) and run
with ``lax.scan``: one compiled layer whatever the depth.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_ensemble.errors import CheckpointError
from jax_ensemble.models.layers import Embed, Linear, RMSNorm


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture hyper-parameters (Hugging Face ``config.json`` names)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"model config: num_attention_heads={self.num_attention_heads} is not a multiple "
                f"of num_key_value_heads={self.num_key_value_heads}"
            )
        scaling = dict(self.rope_scaling or ())
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ("default", "linear", "llama3"):
            raise CheckpointError(f"model config: rope_scaling type {kind!r} is not supported (default, linear, llama3)")

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "LlamaConfig":
        """From a Hugging Face ``config.json`` mapping (Llama/Mistral/SmolLM)."""
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise CheckpointError("model config: attention/MLP biases are not supported by the Llama decoder")
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            eos = cfg.get("eos_token_id")
            scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
            theta = cfg.get("rope_theta") or (scaling or {}).get("rope_theta", 10000.0)
            if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
                scaling = None
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=float(theta),
                rope_scaling=_freeze(scaling),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=eos[0] if isinstance(eos, list) else eos,
                pad_token_id=cfg.get("pad_token_id"),
            )
        except KeyError as e:
            raise CheckpointError(f"model config.json lacks the key {e.args[0]!r}") from None

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], hf_tensor_names: set[str]) -> "LlamaConfig":
        """From GGUF key/values (``llama.*``, ``tokenizer.ggml.*``) and the file's tensor
        names mapped to Hugging Face names (an LM head present means untied)."""
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise CheckpointError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
        try:
            heads = int(meta["llama.attention.head_count"])
            hidden = int(meta["llama.embedding_length"])
            head_dim = int(meta.get("llama.rope.dimension_count") or hidden // heads)
            scaling = None
            if meta.get("llama.rope.scaling.type") == "linear":
                scaling = (("rope_type", "linear"), ("factor", float(meta["llama.rope.scaling.factor"])))
            return cls(
                vocab_size=int(meta.get("llama.vocab_size") or len(meta["tokenizer.ggml.tokens"])),
                hidden_size=hidden,
                intermediate_size=int(meta["llama.feed_forward_length"]),
                num_hidden_layers=int(meta["llama.block_count"]),
                num_attention_heads=heads,
                num_key_value_heads=int(meta.get("llama.attention.head_count_kv") or heads),
                head_dim=head_dim,
                rms_norm_eps=float(meta["llama.attention.layer_norm_rms_epsilon"]),
                rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
                rope_scaling=scaling,
                tie_word_embeddings="lm_head.weight" not in hf_tensor_names,
                max_position_embeddings=int(meta.get("llama.context_length", 2048)),
                bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
                pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
            )
        except KeyError as e:
            raise CheckpointError(f"GGUF metadata lacks the key {e.args[0]!r}") from None


def _freeze(d: dict[str, Any] | None) -> tuple[tuple[str, Any], ...] | None:
    return None if not d else tuple(sorted((k, v) for k, v in d.items() if not isinstance(v, (list, dict))))


def rope_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """Per-pair rotation frequencies θ^(-2i/Dh), i < Dh/2, after the config's scaling."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = dict(config.rope_scaling or ())
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * np.pi / inv
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv / factor + smooth * inv
        inv = np.where(wavelen > old_len / low, inv / factor, np.where(wavelen < old_len / high, inv, smoothed))
    return inv.astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """positions (B, T) → cos, sin (B, T, Dh) in the Hugging Face half-split layout."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (B, T, N, Dh): x·cos + rotate_half(x)·sin, rotate_half(x) = (−x₂, x₁)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


def _keys(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    return [None] * n if key is None else list(jax.random.split(key, n))


class Attention(nnx.Module):
    """Grouped-query self-attention: H query heads share H/KV key/value heads."""

    def __init__(self, config: LlamaConfig, *, base_dtype: str, compute_dtype: str, rngs: nnx.Rngs):
        d, h, kv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        kw = dict(base_dtype=base_dtype, compute_dtype=compute_dtype, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        self.q_proj = Linear(d, h * hd, **kw)
        self.k_proj = Linear(d, kv * hd, **kw)
        self.v_proj = Linear(d, kv * hd, **kw)
        self.o_proj = Linear(h * hd, d, **kw)

    def __call__(self, x, cos, sin, mask, dropout_key=None):
        """x (B, T, D), mask (B, 1, T, T) bool → (B, T, D)."""
        b, t, _ = x.shape
        kq, kk, kv, ko = _keys(dropout_key, 4)
        q = self.q_proj(x, dropout_key=kq).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x, dropout_key=kk).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, dropout_key=kv).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim), dropout_key=ko)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, config: LlamaConfig, *, base_dtype: str, compute_dtype: str, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        kw = dict(base_dtype=base_dtype, compute_dtype=compute_dtype, rngs=rngs)
        self.gate_proj = Linear(d, f, **kw)
        self.up_proj = Linear(d, f, **kw)
        self.down_proj = Linear(f, d, **kw)

    def __call__(self, x, dropout_key=None):
        kg, ku, kd = _keys(dropout_key, 3)
        hidden = jax.nn.silu(self.gate_proj(x, dropout_key=kg)) * self.up_proj(x, dropout_key=ku)
        return self.down_proj(hidden, dropout_key=kd)


class DecoderLayer(nnx.Module):
    """Pre-norm block: h + attn(norm(h)), then h + mlp(norm(h))."""

    def __init__(self, config: LlamaConfig, *, base_dtype: str, compute_dtype: str, rngs: nnx.Rngs):
        kw = dict(base_dtype=base_dtype, compute_dtype=compute_dtype, rngs=rngs)
        norm = dict(eps=config.rms_norm_eps, compute_dtype=compute_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, **norm)
        self.self_attn = Attention(config, **kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)
        self.mlp = MLP(config, **kw)

    def __call__(self, h, cos, sin, mask, dropout_key=None):
        ka, km = _keys(dropout_key, 2)
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, ka)
        return h + self.mlp(self.post_attention_layernorm(h), km)


class LlamaForCausalLM(nnx.Module):
    """The decoder with its LM head.

    ``base_dtype`` (``int8`` | ``bfloat16`` | ``float32``) is how frozen weights are
    stored; ``compute_dtype`` the activation dtype.
    """

    def __init__(
        self,
        config: LlamaConfig,
        *,
        base_dtype: str = "float32",
        compute_dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.base_dtype = base_dtype
        self.compute_dtype = compute_dtype
        kw = dict(base_dtype=base_dtype, compute_dtype=compute_dtype)
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, **kw, rngs=rngs)

        @nnx.split_rngs(splits=config.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(config, **kw, rngs=rngs)

        self.layers = stacked_layers(rngs)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, compute_dtype=compute_dtype)
        self.lm_head = (
            None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size, **kw, rngs=rngs)
        )

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """input_ids (B, T), attention_mask (B, T) (1 = token, 0 = padding, either side)
        → final-norm hidden states (B, T, D). Positions count real tokens only."""
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.bool_)
        attention_mask = attention_mask.astype(jnp.bool_)
        positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
        cos, sin = rope_cos_sin(positions, jnp.asarray(rope_inverse_frequencies(self.config)))
        causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
        mask = causal[None, None] & attention_mask[:, None, None, :]
        h = self.embed_tokens(input_ids)

        graphdef, layer_state = nnx.split(self.layers)
        n = self.config.num_hidden_layers
        keys = None if dropout_key is None else jax.random.split(dropout_key, n)

        # Differentiated, the scan saves only matmul outputs per layer and recomputes the
        # rest, so the float copies of an int8/bf16 base's kernels are not stacked as
        # residuals (they would make an int8 base cost as much memory as a float32 one).
        @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
        def one_layer(h, xs):
            state, key = xs
            return nnx.merge(graphdef, state)(h, cos, sin, mask, key), None

        h, _ = jax.lax.scan(one_layer, h, (layer_state, keys))
        return self.norm(h)

    def logits_from_hidden(self, h: jax.Array, token_ids: jax.Array | None = None) -> jax.Array:
        """h (B, P, D) → logits (B, P, V), or (B, P, K) for token_ids (K,) / (B, K)."""
        if self.lm_head is None:
            return self.embed_tokens.attend(h, token_ids)
        return self.lm_head(h, columns=token_ids)

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
        h = self.hidden_states(input_ids, attention_mask, dropout_key=dropout_key)
        single = logit_positions is not None and logit_positions.ndim == 1
        if logit_positions is not None:
            pos = logit_positions[:, None] if single else logit_positions
            h = jnp.take_along_axis(h, pos[..., None].astype(jnp.int32), axis=1)
        logits = self.logits_from_hidden(h, token_ids)
        return logits[:, 0] if single else logits
