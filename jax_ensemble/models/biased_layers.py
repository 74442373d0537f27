"""Layers with an additive bias: :class:`BiasedLinear` (GPT-2's Conv1D layers, Qwen2's
q/k/v projections) and :class:`LayerNorm` (GPT-2).

Biases and norm parameters are float32 ``nnx.Param`` whatever the base dtype (they are a
vanishing share of the weights). A :class:`BiasedLinear` is a
:class:`~jax_ensemble.models.layers.Linear`, so int8 storage, LoRA (on the matrix, never
on the bias) and PEFT export treat it as any other linear layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jax_ensemble.models.layers import Linear


class BiasedLinear(Linear):
    """``y = x W + b + (alpha / r) · dropout(x) A B`` with b (out,)."""

    def __init__(
        self, in_features: int, out_features: int, *, base_dtype: str, compute_dtype: str, rngs: nnx.Rngs
    ):
        super().__init__(in_features, out_features, base_dtype=base_dtype, compute_dtype=compute_dtype, rngs=rngs)
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))

    def __call__(
        self, x: jax.Array, *, columns: jax.Array | None = None, dropout_key: jax.Array | None = None
    ) -> jax.Array:
        """x: (..., in) → (..., out); with ``columns`` (K,) or (B, K) only those outputs,
        x then being (B, P, in) → (B, P, K)."""
        y = super().__call__(x, columns=columns, dropout_key=dropout_key)
        b = self.bias[...]
        if columns is not None:
            b = jnp.take(b, columns)
            b = b[:, None, :] if columns.ndim == 2 else b
        return y + b.astype(y.dtype)


class LayerNorm(nnx.Module):
    """``y = (x − mean(x)) / sqrt(var(x) + eps) · w + b`` over the last axis, normalised in float32."""

    def __init__(self, features: int, *, eps: float, compute_dtype: str):
        self.eps = eps
        self.compute_dtype = compute_dtype
        self.weight = nnx.Param(jnp.ones((features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., D) → (..., D) in the compute dtype."""
        x32 = x.astype(jnp.float32)
        centered = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        normed = centered * jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + self.eps)
        return (normed * self.weight[...] + self.bias[...]).astype(self.compute_dtype)
