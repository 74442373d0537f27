"""Fused int8-dequantize + LoRA matmul: ``y = (x·q) ⊙ s + (α/r)·(x·A)·B`` in one Pallas kernel.

Shapes: x (..., K) float32/bfloat16, q (K, N) int8 (or a float base, then ``s`` is None),
s (N,) float32 per output channel, xa = x·A (..., r) (computed by the caller, so LoRA dropout
and ``dA`` stay in plain JAX), b = B (r, N), ``scaling`` = α/r.

The kernel (:func:`matmul`) tiles the output in (rows × cols) blocks; each block loops over
the reduction axis in ``depth`` slices, converting each int8 slice of q to x's dtype in
registers (the dequantised weight is never written), accumulates in float32, then applies
the epilogue ``acc ⊙ s + c`` before one store, with c = scaling·xa·B (M × N) computed by XLA:
on an H200 that was 1.2–1.6× faster than a rank-r product inside the epilogue
(``benchmarks/RESULTS.md``), which made Triton's main loop slower. The backward pass
(``jax.custom_vjp``) reuses the same kernel with q read transposed:

- dx  = (dy ⊙ s)·qᵀ                (the kernel, no scale, no low-rank term)
- dxa = scaling · dy·Bᵀ           (M × r, plain XLA; flows on to dA and, via A, to dx)
- dB  = scaling · xaᵀ·dy          (r × N, plain XLA)

q and s are frozen (no cotangent). Shapes that do not divide the blocks are zero-padded
(exact: padded rows/cols contribute zeros and are sliced off). Block sizes come from a small
per-backend table (:func:`choose_blocks`). On CPU the kernel only runs interpreted; the
plain-XLA form is :func:`int8_lora_matmul_reference` (what ``models.layers.Linear`` computes).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jax_ensemble.kernels.backend import interpret, platform


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes: output ``rows × cols`` per program, reduction slices of ``depth``."""

    rows: int
    cols: int
    depth: int
    num_warps: int = 4
    num_stages: int = 3


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << max(0, (n - 1).bit_length()))


def choose_blocks(m: int, n: int, k: int, dtype: jnp.dtype, backend: str | None = None) -> Blocks:
    """Tiles for an (m × k)·(k × n) product on ``backend`` (default: the default backend's).

    GPU (Triton): powers of two, 128 × 128 output tiles once the problem is that large, a
    reduction slice of 64 (bfloat16; 4 warps, 4 pipeline stages: the fastest of the tiles
    ``benchmarks/kernels.py --sweep`` timed at the 8B shapes on an H200) or 32 (float32). TPU
    (Mosaic): 128-multiples on the lane axis, 256-deep slices. CPU runs interpreted; the
    GPU table is used so the tests exercise the same tiling."""
    backend = backend or platform()
    if backend == "tpu":
        return Blocks(rows=min(256, _pow2_at_least(m, 8)), cols=min(256, _pow2_at_least(n, 128)),
                      depth=min(512, _pow2_at_least(k, 128)))
    rows = min(128, _pow2_at_least(m, 16))
    cols = min(128, _pow2_at_least(n, 16))
    half = jnp.dtype(dtype).itemsize <= 2
    depth = min(64 if half else 32, _pow2_at_least(k, 16))
    return Blocks(rows=rows, cols=cols, depth=depth, num_warps=4, num_stages=4 if half else 3)


def _pad_to(a: jax.Array, multiples: tuple[int, ...]) -> jax.Array:
    pads = [(0, -size % mult) for size, mult in zip(a.shape, multiples)]
    return jnp.pad(a, pads) if any(p for _, p in pads) else a


def _compiler_params(blocks, backend: str, grid_rank: int = 2):
    if backend == "gpu":
        from jax.experimental.pallas import triton as pl_triton

        return pl_triton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pl_tpu

        return pl_tpu.CompilerParams(dimension_semantics=("parallel",) * grid_rank)
    return None


def accumulate_tile(x_ref, w_ref, shape: tuple[int, int], *, depth: int, steps: int,
                    transpose_w: bool = False) -> jax.Array:
    """Inside a kernel: Σ_t x[:, t]·op(w)[t, :] over ``steps`` reduction slices of ``depth``,
    each slice of w converted to x's dtype in registers; float32 (rows, cols) = ``shape``."""
    cd = x_ref.dtype

    def body(t, acc):
        x = x_ref[:, pl.ds(t * depth, depth)]
        if transpose_w:
            w = w_ref[:, pl.ds(t * depth, depth)].astype(cd)  # (cols, depth)
            return acc + jnp.dot(x, w.T, preferred_element_type=jnp.float32)
        w = w_ref[pl.ds(t * depth, depth), :].astype(cd)  # (depth, cols)
        return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

    return jax.lax.fori_loop(0, steps, body, jnp.zeros(shape, jnp.float32))


def _matmul_kernel(x_ref, w_ref, *refs, transpose_w: bool, depth: int, steps: int, has_scale: bool,
                   has_addend: bool):
    """One (rows × cols) output tile: Σ_t x[:, t]·op(w)[t, :] in float32, then the epilogue."""
    refs = list(refs)
    o_ref = refs.pop()
    s_ref = refs.pop(0) if has_scale else None
    c_ref = refs.pop(0) if has_addend else None
    acc = accumulate_tile(x_ref, w_ref, o_ref.shape, depth=depth, steps=steps, transpose_w=transpose_w)
    if s_ref is not None:
        acc = acc * s_ref[...].astype(jnp.float32)
    if c_ref is not None:
        acc = acc + c_ref[...].astype(jnp.float32)
    o_ref[...] = acc.astype(o_ref.dtype)


def matmul(
    x: jax.Array,
    w: jax.Array,
    scale: jax.Array | None = None,
    addend: jax.Array | None = None,
    *,
    transpose_w: bool = False,
    blocks: Blocks | None = None,
) -> jax.Array:
    """``(x·op(w)) ⊙ scale + addend`` as one Pallas kernel; op(w) = w or wᵀ.

    x (M, R) float; w (R, C) (or (C, R) with ``transpose_w``), int8 or float, converted to
    x's dtype slice by slice; scale (C,) or None; addend (M, C) or None. Returns (M, C) in
    x's dtype, accumulated in float32."""
    m, depth_total = x.shape
    cols_total = w.shape[0] if transpose_w else w.shape[1]
    backend = platform()
    b = blocks or choose_blocks(m, cols_total, depth_total, x.dtype, backend)
    xp = _pad_to(x, (b.rows, b.depth))
    wp = _pad_to(w, (b.cols, b.depth) if transpose_w else (b.depth, b.cols))
    mp, rp = xp.shape
    cp = wp.shape[0] if transpose_w else wp.shape[1]
    operands = [xp, wp]
    in_specs = [
        pl.BlockSpec((b.rows, rp), lambda i, j: (i, 0)),
        pl.BlockSpec((b.cols, rp), lambda i, j: (j, 0)) if transpose_w
        else pl.BlockSpec((rp, b.cols), lambda i, j: (0, j)),
    ]
    if scale is not None:
        operands.append(_pad_to(scale.reshape(1, -1), (1, b.cols)))
        in_specs.append(pl.BlockSpec((1, b.cols), lambda i, j: (0, j)))
    if addend is not None:
        operands.append(_pad_to(addend, (b.rows, b.cols)))
        in_specs.append(pl.BlockSpec((b.rows, b.cols), lambda i, j: (i, j)))
    kernel = functools.partial(
        _matmul_kernel, transpose_w=transpose_w, depth=b.depth, steps=rp // b.depth, has_scale=scale is not None,
        has_addend=addend is not None,
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, cp), x.dtype),
        grid=(mp // b.rows, cp // b.cols),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((b.rows, b.cols), lambda i, j: (i, j)),
        interpret=interpret(),
        compiler_params=_compiler_params(b, backend),
    )(*operands)
    return out[:m, :cols_total]


def int8_lora_matmul_reference(x, q, s, xa, b, scaling: float) -> jax.Array:
    """Plain XLA: ``(x·q) ⊙ s + scaling·xa·b`` in x's dtype (``models.layers.Linear``'s maths)."""
    cd = x.dtype
    y = x @ q.astype(cd)
    if s is not None:
        y = y * s.astype(cd)
    if xa is not None:
        y = y + (xa.astype(cd) @ b.astype(cd)) * scaling
    return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def int8_lora_matmul(x, q, s, xa, b, scaling: float) -> jax.Array:
    """``(x·q) ⊙ s + scaling·xa·b``: x (..., K), q (K, N), s (N,) or None, xa (..., r) or
    None, b (r, N) → (..., N) in x's dtype; differentiable in x, xa and b (see module doc)."""
    return _forward(x, q, s, xa, b, scaling)


def _forward(x, q, s, xa, b, scaling):
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    low_rank = None if xa is None else (xa.reshape(-1, xa.shape[-1]) @ b.astype(x.dtype)) * scaling
    return matmul(x2, q, s, low_rank).reshape(lead + (q.shape[1],))


def _fwd(x, q, s, xa, b, scaling):
    return _forward(x, q, s, xa, b, scaling), (q, s, xa, b)


def _bwd(scaling, residuals, dy):
    q, s, xa, b = residuals
    lead = dy.shape[:-1]
    dy2 = dy.reshape(-1, dy.shape[-1])
    dys = dy2 if s is None else (dy2.astype(jnp.float32) * s).astype(dy.dtype)
    dx = matmul(dys, q, transpose_w=True).reshape(lead + (q.shape[0],))
    if xa is None:
        return dx, None, None, None, None
    xa2 = xa.reshape(-1, xa.shape[-1])
    dxa = scaling * jnp.dot(dy2, b.astype(dy.dtype).T, preferred_element_type=jnp.float32)
    dxa = dxa.astype(xa.dtype).reshape(xa.shape)
    db = (scaling * (xa2.astype(jnp.float32).T @ dy2.astype(jnp.float32))).astype(b.dtype)
    return dx, None, None, dxa, db


int8_lora_matmul.defvjp(_fwd, _bwd)
