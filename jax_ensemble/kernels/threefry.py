"""Threefry-2x32 in plain ``jnp`` uint32 arithmetic, usable inside a Pallas kernel.

``threefry2x32(k0, k1, x0, x1)`` is the 20-round Threefry-2x32 block cipher (Salmon et al.
2011) that JAX's default PRNG uses; arguments broadcast. :func:`rademacher_entries` rebuilds,
from a key and the entries' positions alone, exactly the signs
``jax.random.rademacher(fold_in(key, block), (rows, d))`` draws with
``jax_threefry_partitionable`` on (JAX's default): entry (i, j) of a (rows, d) draw uses the
counter c = i·d + j as the word pair (0, c), the bits are the XOR of the cipher's two output
words, and the sign is + when the top bit is 0 (that bit decides ``uniform < 0.5``). So a
kernel can generate any tile of a projection block where it needs it, bit-identical to
``core.projection.projection_block``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = 0x1BD11BDA


def _rotl(x: jax.Array, r: int) -> jax.Array:
    return (x << jnp.uint32(r)) | (x >> jnp.uint32(32 - r))


def threefry2x32(k0, k1, x0, x1) -> tuple[jax.Array, jax.Array]:
    """Encrypt the counter words (x0, x1) under the key (k0, k1); uint32 in and out."""
    u32 = jnp.uint32
    k0, k1, x0, x1 = (jnp.asarray(a, u32) for a in (k0, k1, x0, x1))
    ks = (k0, k1, k0 ^ k1 ^ u32(_PARITY))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = _rotl(x1, r) ^ x0
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + u32(i + 1)
    return x0, x1


def fold_in(k0, k1, data) -> tuple[jax.Array, jax.Array]:
    """The key pair of ``jax.random.fold_in(key, data)`` for uint32 ``data`` (broadcasts)."""
    return threefry2x32(k0, k1, jnp.zeros_like(jnp.asarray(data, jnp.uint32)), data)


def rademacher_entries(k0, k1, counters) -> jax.Array:
    """±1 (float32) for the given counters under key (k0, k1), as ``jax.random.rademacher``."""
    b0, b1 = threefry2x32(k0, k1, jnp.zeros_like(counters), counters)
    return jnp.where(((b0 ^ b1) >> jnp.uint32(31)) == 0, 1.0, -1.0).astype(jnp.float32)
