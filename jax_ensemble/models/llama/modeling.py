"""Llama-family decoder (Llama 2/3, SmolLM, Mistral-style, Qwen2) in Flax NNX.

Grouped-query attention, rotary embeddings (with the config's theta and scaling),
RMSNorm, SwiGLU MLP, tied or separate LM head, biases on the projections the config
names (Qwen2: q/k/v; Llama's ``attention_bias``: q/k/v/o; ``mlp_bias``: the MLP). Module names follow Hugging Face's
``LlamaForCausalLM`` (``layers.self_attn.q_proj`` …) so LoRA target regexes and PEFT
export read the same. The decoder layers are stacked on a leading axis (L, …) and run
with ``lax.scan``: one compiled layer whatever the depth.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_ensemble.errors import CheckpointError
from jax_ensemble.models.biased_layers import BiasedLinear
from jax_ensemble.models.decoder import (
    CausalLM,
    dropout_keys,
    head_logits,
    positions_and_mask,
    scan_layers,
    stacked_layers,
)
from jax_ensemble.models.layers import Embed, Linear, RMSNorm

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linear modules of a decoder layer, by Hugging Face name."""
MODEL_TYPES = ("llama", "mistral", "qwen2")
"""Hugging Face ``model_type`` values this family loads."""


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
    biased_projections: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.biased_projections) - set(PROJECTIONS))
        if unknown:
            raise CheckpointError(f"model config: biased_projections {unknown} are not projections ({', '.join(PROJECTIONS)})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"model config: num_attention_heads={self.num_attention_heads} is not a multiple "
                f"of num_key_value_heads={self.num_key_value_heads}"
            )
        scaling = dict(self.rope_scaling or ())
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ("default", "linear", "llama3"):
            raise CheckpointError(f"model config: rope_scaling type {kind!r} is not supported (default, linear, llama3)")

    @property
    def layer_matmul_weights(self) -> int:
        """Weights of one layer's projections: D·H·Dh + 2·D·KV·Dh + H·Dh·D + 3·D·F."""
        d, h, kv, hd, f = (self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.head_dim,
                           self.intermediate_size)
        return d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "LlamaConfig":
        """From a Hugging Face ``config.json`` mapping (Llama/Mistral/SmolLM/Qwen2)."""
        if cfg.get("use_sliding_window"):
            raise CheckpointError("model config: sliding-window attention (use_sliding_window) is not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"model config: hidden_act {cfg['hidden_act']!r} is not supported (only 'silu')")
        biased = PROJECTIONS[:3] if cfg.get("model_type") == "qwen2" else ()
        biased = PROJECTIONS[:4] if cfg.get("attention_bias") else biased
        biased += PROJECTIONS[4:] if cfg.get("mlp_bias") else ()
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
                biased_projections=biased,
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


def _projection(name: str, config: LlamaConfig, in_features: int, out_features: int, **kw: Any) -> Linear:
    """The layer's ``name`` projection, with a bias where the config asks for one."""
    layer = BiasedLinear if name in config.biased_projections else Linear
    return layer(in_features, out_features, **kw)


class Attention(nnx.Module):
    """Grouped-query self-attention: H query heads share H/KV key/value heads."""

    def __init__(self, config: LlamaConfig, *, base_dtype: str, compute_dtype: str, rngs: nnx.Rngs):
        d, h, kv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        kw = dict(base_dtype=base_dtype, compute_dtype=compute_dtype, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        self.q_proj = _projection("q_proj", config, d, h * hd, **kw)
        self.k_proj = _projection("k_proj", config, d, kv * hd, **kw)
        self.v_proj = _projection("v_proj", config, d, kv * hd, **kw)
        self.o_proj = _projection("o_proj", config, h * hd, d, **kw)

    def __call__(self, x, cos, sin, mask, dropout_key=None):
        """x (B, T, D), mask (B, 1, T, T) bool → (B, T, D)."""
        b, t, _ = x.shape
        kq, kk, kv, ko = dropout_keys(dropout_key, 4)
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
        self.gate_proj = _projection("gate_proj", config, d, f, **kw)
        self.up_proj = _projection("up_proj", config, d, f, **kw)
        self.down_proj = _projection("down_proj", config, f, d, **kw)

    def __call__(self, x, dropout_key=None):
        kg, ku, kd = dropout_keys(dropout_key, 3)
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
        ka, km = dropout_keys(dropout_key, 2)
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, ka)
        return h + self.mlp(self.post_attention_layernorm(h), km)


class LlamaForCausalLM(CausalLM):
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
        self.layers = stacked_layers(lambda r: DecoderLayer(config, **kw, rngs=r), config.num_hidden_layers, rngs)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, compute_dtype=compute_dtype)
        self.lm_head = (
            None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size, **kw, rngs=rngs)
        )

    def hidden_states(
        self, input_ids: jax.Array, attention_mask: jax.Array, *, dropout_key: jax.Array | None = None
    ) -> jax.Array:
        """input_ids (B, T), attention_mask (B, T) (1 = token, 0 = padding, either side)
        → final-norm hidden states (B, T, D). Positions count real tokens only."""
        positions, mask = positions_and_mask(attention_mask)
        cos, sin = rope_cos_sin(positions, jnp.asarray(rope_inverse_frequencies(self.config)))
        h = self.embed_tokens(input_ids)
        h = scan_layers(self.layers, h, cos, sin, mask, num_layers=self.config.num_hidden_layers,
                        dropout_key=dropout_key)
        return self.norm(h)

    def logits_from_hidden(self, h: jax.Array, token_ids: jax.Array | None = None) -> jax.Array:
        """h (B, P, D) → logits (B, P, V), or (B, P, K) for token_ids (K,) / (B, K)."""
        return head_logits(self.embed_tokens, self.lm_head, h, token_ids)
