"""Flax NNX building blocks whose frozen weights may be stored in int8.

Variable types (what ``nnx.split`` filters on):

- ``nnx.Param``: float base weights (norm scales; kernels of a float base);
- :class:`QuantizedWeight`: int8 values and their float32 scales (never differentiated);
- ``nnx.LoRAParam``: LoRA ``lora_a`` (in, r) and ``lora_b`` (r, out), the only trainable
  state.

Kernels are stored ``(in, out)``; a stacked layer adds leading axes, e.g. ``(L, in, out)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jax_ensemble.kernels.int8_lora import int8_lora_matmul
from jax_ensemble.models.quantization import quantize_int8

BASE_DTYPES = ("int8", "bfloat16", "float32")
"""Storage of the frozen base weights."""
COMPUTE_DTYPES = ("float32", "bfloat16")
"""Dtype of activations and matmuls."""


class QuantizedWeight(nnx.Variable):
    """Frozen int8 values or their per-channel float32 scales."""


def _stored_kernel(
    shape: tuple[int, ...], base_dtype: str, key: jax.Array, reduce_axis: int
) -> tuple[nnx.Variable, QuantizedWeight | None]:
    w = jax.random.normal(key, shape, jnp.float32) * 0.02
    if base_dtype == "int8":
        q, s = quantize_int8(w, reduce_axis)
        return QuantizedWeight(q), QuantizedWeight(s)
    return nnx.Param(w.astype(base_dtype)), None


class Linear(nnx.Module):
    """``y = x W + (alpha / r) · dropout(x) A B`` with W (in, out), A (in, r), B (r, out).

    In int8 mode ``W = q · s`` with one scale per output channel, applied after the
    matmul: ``x W = (x q) · s``. LoRA is attached by :func:`jax_ensemble.models.lora.apply_lora`.
    ``kernels`` (set by :func:`select_kernels`): ``xla`` computes this with plain XLA ops,
    ``pallas`` with the fused kernel :func:`jax_ensemble.kernels.int8_lora.int8_lora_matmul`
    (same numbers within float tolerance; outputs restricted to ``columns`` stay on XLA).
    """

    def __init__(
        self, in_features: int, out_features: int, *, base_dtype: str, compute_dtype: str, rngs: nnx.Rngs
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.kernel, self.scale = _stored_kernel(
            (in_features, out_features), base_dtype, rngs.params(), reduce_axis=0
        )
        self.lora_a: nnx.LoRAParam | None = nnx.data(None)
        self.lora_b: nnx.LoRAParam | None = nnx.data(None)
        self.lora_scaling = 0.0
        self.lora_dropout = 0.0
        self.kernels = "xla"

    def __call__(
        self, x: jax.Array, *, columns: jax.Array | None = None, dropout_key: jax.Array | None = None
    ) -> jax.Array:
        """x: (..., in) → (..., out); with ``columns`` (K,) or (B, K) only those outputs,
        x then being (B, P, in) → (B, P, K)."""
        cd = self.compute_dtype
        x = x.astype(cd)
        h = None
        if self.lora_a is not None:
            h = x
            if dropout_key is not None and self.lora_dropout > 0.0:
                keep = jax.random.bernoulli(dropout_key, 1.0 - self.lora_dropout, h.shape)
                h = jnp.where(keep, h / (1.0 - self.lora_dropout), 0.0).astype(cd)
        scale = None if self.scale is None else self.scale[...]
        if self.kernels == "pallas" and columns is None:
            xa = None if h is None else h @ self.lora_a[...].astype(cd)
            b = None if h is None else self.lora_b[...]
            return int8_lora_matmul(x, self.kernel[...], scale, xa, b, self.lora_scaling)
        w = _select_columns(self.kernel[...], columns, axis=-1).astype(cd)
        y = _matmul(x, w, columns)
        if scale is not None:
            s = _select_columns(scale, columns, axis=-1).astype(cd)
            y = y * (s[:, None, :] if s.ndim == 2 else s)
        if h is not None:
            b = _select_columns(self.lora_b[...], columns, axis=-1).astype(cd)
            y = y + _matmul(h @ self.lora_a[...].astype(cd), b, columns) * self.lora_scaling
        return y


def select_kernels(model: nnx.Module, kernels: str) -> None:
    """Run every Linear of ``model`` on ``xla`` or ``pallas`` (in place; see ``Linear``)."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, Linear):
            node.kernels = kernels


def _select_columns(w: jax.Array, columns: jax.Array | None, axis: int) -> jax.Array:
    """w[..., columns]: (.., out) → (.., K) or, for (B, K) columns, (B, .., K) moved first."""
    if columns is None:
        return w
    taken = jnp.take(w, columns, axis=axis)
    if columns.ndim == 2:  # (.., B, K) → (B, .., K)
        taken = jnp.moveaxis(taken, -2, 0)
    return taken


def _matmul(x: jax.Array, w: jax.Array, columns: jax.Array | None) -> jax.Array:
    if columns is not None and columns.ndim == 2:
        return jnp.einsum("bpi,bik->bpk", x, w)
    return x @ w


class Embed(nnx.Module):
    """Token embedding table (V, D); in int8 mode one float32 scale per row.

    ``attend(h, token_ids)`` reuses the table as a tied LM head, optionally only for the
    requested token ids."""

    def __init__(self, num_embeddings: int, features: int, *, base_dtype: str, compute_dtype: str, rngs: nnx.Rngs):
        self.compute_dtype = compute_dtype
        self.embedding, self.scale = _stored_kernel(
            (num_embeddings, features), base_dtype, rngs.params(), reduce_axis=1
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids (...) int → (..., D)."""
        rows = jnp.take(self.embedding[...], ids, axis=0).astype(self.compute_dtype)
        if self.scale is not None:
            rows = rows * jnp.take(self.scale[...], ids, axis=0)[..., None].astype(self.compute_dtype)
        return rows

    def attend(self, h: jax.Array, token_ids: jax.Array | None = None) -> jax.Array:
        """Logits h Eᵀ: h (..., D) → (..., V); with token_ids (K,) or (B, K), h (B, P, D) → (B, P, K)."""
        cd = self.compute_dtype
        if token_ids is None:
            logits = h.astype(cd) @ self.embedding[...].astype(cd).T
            return logits if self.scale is None else logits * self.scale[...].astype(cd)
        rows = self(token_ids)
        if token_ids.ndim == 2:
            return jnp.einsum("bpd,bkd->bpk", h.astype(cd), rows)
        return h.astype(cd) @ rows.T


class RMSNorm(nnx.Module):
    """``y = x / sqrt(mean(x²) + eps) · w``, normalised in float32."""

    def __init__(self, features: int, *, eps: float, compute_dtype: str):
        self.eps = eps
        self.compute_dtype = compute_dtype
        self.weight = nnx.Param(jnp.ones((features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32.astype(self.compute_dtype) * self.weight[...].astype(self.compute_dtype))
