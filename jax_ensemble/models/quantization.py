"""Weight-only int8 quantization with per-channel scales.

``q, s = quantize_int8(w, reduce_axis)``: symmetric, ``s = max|w| / 127`` over
``reduce_axis`` (the input axis of a kernel, so one scale per output channel; the hidden
axis of an embedding table, so one scale per row) and ``q = round(w / s)`` in [-127, 127].
``dequantize_int8(q, s, reduce_axis) = q * s`` (broadcast back over ``reduce_axis``).
Works on numpy (loading) and jax arrays alike.
"""

from __future__ import annotations

import numpy as np


def quantize_int8(w, reduce_axis: int):
    """Return ``(q int8, scale float32)``; ``scale`` has ``reduce_axis`` removed.

    On numpy (loading, one whole tensor at a time) it needs one float32 temporary of
    ``w``'s size besides ``w`` (as float32) and ``q``."""
    xp = _array_namespace(w)
    w = np.asarray(w, np.float32) if xp is np else w.astype(xp.float32)
    # max |w| without a |w| copy
    amax = xp.maximum(xp.max(w, axis=reduce_axis, keepdims=True), -xp.min(w, axis=reduce_axis, keepdims=True))
    scale = xp.where(amax > 0, amax / 127.0, 1.0).astype(xp.float32)
    if xp is np:
        q = w / scale
        np.clip(np.round(q, out=q), -127, 127, out=q)
    else:
        q = xp.clip(xp.round(w / scale), -127, 127)
    return q.astype(xp.int8), xp.squeeze(scale, axis=reduce_axis)


def dequantize_int8(q, scale, reduce_axis: int):
    """``q * scale`` with ``scale`` broadcast over ``reduce_axis`` (float32)."""
    xp = _array_namespace(q)
    return q.astype(xp.float32) * xp.expand_dims(scale, reduce_axis)


def _array_namespace(x):
    if isinstance(x, np.ndarray):
        return np
    import jax.numpy as jnp

    return jnp
