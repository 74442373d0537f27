"""Seeded projection Pᵀg with P's entries generated inside the kernel, never read from memory.

For one parameter leaf flattened to p rows, P (p × d) is cut into blocks of ``block_rows``
rows; row i lies in block b = i // block_rows at offset i' = i mod block_rows, and
P[i, j] = scale · ρ(fold_in(leaf_key, b); i'·d + j) with ρ the Rademacher sign of
:mod:`jax_ensemble.kernels.threefry`: the same P as ``core.projection.projection_block``, bit
for bit. The kernel tiles the output (n × d) and loops over the p rows in slices; each slice's
(depth × cols) tile of P is computed in registers from the row and column indices (two
Threefry evaluations per entry, one per row for the block key) and multiplied into a float32
accumulator. The p rows are also split into ``chunks`` whose partial sums are added at the
end, so a few examples still fill the chip. HBM traffic is g and the (chunks × n × d)
partial sums: P costs ALU work, not memory.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jax_ensemble.kernels.backend import interpret, platform
from jax_ensemble.kernels.int8_lora import _compiler_params, _pad_to, _pow2_at_least
from jax_ensemble.kernels.threefry import fold_in, rademacher_entries


@dataclasses.dataclass(frozen=True)
class ProjectionBlocks:
    """Tiles: ``rows`` examples × ``cols`` output dimensions per program, ``depth`` P rows per step."""

    rows: int
    cols: int
    depth: int
    chunks: int = 1
    num_warps: int = 4
    num_stages: int = 2


PROGRAMS = 1024
"""Programs to aim for: the p rows are split into ``chunks`` partial sums until the grid has
about this many (an H200 has 132 multiprocessors; few examples × d alone leave most idle)."""


def choose_projection_blocks(n: int, d: int, p: int) -> ProjectionBlocks:
    """Tiles for projecting n examples of p parameters to d dimensions (powers of two)."""
    rows, cols, depth = min(64, _pow2_at_least(n, 16)), min(128, _pow2_at_least(d, 16)), 32
    tiles = -(-n // rows) * -(-d // cols)
    chunks = max(1, min(-(-PROGRAMS // tiles), -(-p // depth)))
    return ProjectionBlocks(rows=rows, cols=cols, depth=depth, chunks=chunks)


def _projection_kernel(g_ref, o_ref, *, key: tuple[int, int], block_rows: int, dim: int, scale: float,
                       depth: int, steps: int):
    """Program (i, j, c): rows tile i × columns tile j of chunk c's partial sum over its P rows."""
    cols = o_ref.shape[-1]
    col = pl.program_id(1) * cols + jnp.arange(cols, dtype=jnp.int32)  # (cols,)
    first_row = pl.program_id(2) * steps * depth
    k0, k1 = jnp.uint32(key[0]), jnp.uint32(key[1])

    def body(t, acc):
        row = first_row + t * depth + jnp.arange(depth, dtype=jnp.int32)  # (depth,) rows of P
        block = (row // block_rows).astype(jnp.uint32)[:, None]
        offset = (row % block_rows).astype(jnp.uint32)[:, None]
        kb0, kb1 = fold_in(k0, k1, block)
        p = rademacher_entries(kb0, kb1, offset * jnp.uint32(dim) + col.astype(jnp.uint32)[None, :])
        g = g_ref[:, pl.ds(t * depth, depth)].astype(jnp.float32)
        return acc + jnp.dot(g, p * scale, preferred_element_type=jnp.float32)

    o_ref[...] = jax.lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))


def leaf_key(seed: int, leaf_id: int) -> tuple[int, int]:
    """The key words of ``fold_in(key(seed), leaf_id)`` as Python ints (static in the kernel)."""
    with jax.ensure_compile_time_eval():
        words = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), leaf_id)).tolist()
    return int(words[0]), int(words[1])


def seeded_projection(
    g: jax.Array, *, key: tuple[int, int], block_rows: int, dim: int, scale: float,
    blocks: ProjectionBlocks | None = None,
) -> jax.Array:
    """Pᵀg for one leaf: g (n, p) → (n, dim) float32, P generated per tile (module doc).

    ``key`` = the leaf's key words (:func:`leaf_key`); ``block_rows`` and ``scale`` as the
    projector's (rows of one P block, 1/√d). Needs block_rows·dim < 2³² (one counter word)."""
    if block_rows * dim >= 2**32:
        raise ValueError(f"block_rows·dim = {block_rows * dim} does not fit one 32-bit counter")
    n, p = g.shape
    b = blocks or choose_projection_blocks(n, dim, p)
    chunk = -(-p // (b.chunks * b.depth)) * b.depth  # P rows per chunk, a multiple of depth
    gp = _pad_to(g, (b.rows, chunk))
    dp = -(-dim // b.cols) * b.cols
    chunks = gp.shape[1] // chunk
    kernel = functools.partial(_projection_kernel, key=key, block_rows=block_rows, dim=dim, scale=float(scale),
                               depth=b.depth, steps=chunk // b.depth)
    partial_sums = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((chunks, gp.shape[0], dp), jnp.float32),
        grid=(gp.shape[0] // b.rows, dp // b.cols, chunks),
        in_specs=[pl.BlockSpec((b.rows, chunk), lambda i, j, c: (i, c))],
        out_specs=pl.BlockSpec((pl.squeezed, b.rows, b.cols), lambda i, j, c: (c, i, j)),
        interpret=interpret(),
        compiler_params=_compiler_params(b, platform(), grid_rank=3),
    )(gp)
    return partial_sums.sum(axis=0)[:n, :dim]
