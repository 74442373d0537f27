"""Many LoRA adapters over one int8 base in one Pallas kernel.

E adapters (A_e (K, r), B_e (r, N), stacked on a leading axis) share the frozen base
(q (K, N) int8, s (N,)). Two ways to run them, both ``custom_vjp``-differentiable in x, xa, b:

- **every adapter on every row** (``members=None``): x (M, K) shared by all adapters, as at
  the first adapted layer of a stacked ensemble or UQ pass, xa (E, M, r) = x·A_e →
  y (E, M, N) with ``y_e = (x·q) ⊙ s + scaling·xa_e·B_e``. The base product x·q is computed
  **once** per output tile and reused by the E epilogues: E× less base work than running the
  adapters one by one. Only this layer shares it: after the first adapted layer the
  activations differ per adapter, and the later layers are E ordinary products
  (:func:`jax_ensemble.kernels.int8_lora.int8_lora_matmul` under ``vmap``). In the backward,
  dx = (Σ_e dy_e ⊙ s)·qᵀ is again one base product, not E.
- **one adapter per row** (``members`` (M,) int in [0, E)): punica-style routing of a mixed
  batch, xa (M, r) = x_m·A_{members[m]} → y (M, N) with
  ``y_m = (x_m·q) ⊙ s + scaling·xa_m·B_{members[m]}``; one base product for the whole batch,
  the per-row low-rank term as E masked rank-r products per tile (E·r ≪ K extra work).

Zero padding as in ``int8_lora``; CPU runs the kernel interpreted.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jax_ensemble.kernels.backend import interpret, platform
from jax_ensemble.kernels.int8_lora import _compiler_params, _pad_to, accumulate_tile, choose_blocks, matmul

LORA_RANK_PAD = 16
"""Low-rank operands are zero-padded to a multiple of this (Triton's smallest dot side)."""


def _multi_kernel(x_ref, q_ref, s_ref, u_ref, v_ref, *refs, depth: int, steps: int, scaling: float,
                  routed: bool):
    """One (rows × cols) tile of the base product, then one epilogue per adapter."""
    o_ref = refs[-1]
    base = accumulate_tile(x_ref, q_ref, (x_ref.shape[0], q_ref.shape[1]), depth=depth, steps=steps)
    base = base * s_ref[...].astype(jnp.float32)
    num_adapters = v_ref.shape[0]
    if routed:
        members = refs[0][...]  # (rows, 1)
        u = u_ref[...]
        acc = base
        for e in range(num_adapters):
            ue = jnp.where(members == e, u, jnp.zeros_like(u))
            acc = acc + scaling * jnp.dot(ue, v_ref[e], preferred_element_type=jnp.float32)
        o_ref[...] = acc.astype(o_ref.dtype)
    else:
        for e in range(num_adapters):
            low = jnp.dot(u_ref[e], v_ref[e], preferred_element_type=jnp.float32)
            o_ref[e] = (base + scaling * low).astype(o_ref.dtype)


def _multi_call(x, q, s, xa, b, scaling, members):
    m, k = x.shape
    n = q.shape[1]
    e = b.shape[0]
    backend = platform()
    blk = choose_blocks(m, n, k, x.dtype, backend)
    xp = _pad_to(x, (blk.rows, blk.depth))
    qp = _pad_to(q, (blk.depth, blk.cols))
    sp = _pad_to(s.reshape(1, -1), (1, blk.cols))
    vp = _pad_to(b.astype(x.dtype), (1, LORA_RANK_PAD, blk.cols))
    mp, kp = xp.shape
    np_, r = qp.shape[1], vp.shape[1]
    in_specs = [
        pl.BlockSpec((blk.rows, kp), lambda i, j: (i, 0)),
        pl.BlockSpec((kp, blk.cols), lambda i, j: (0, j)),
        pl.BlockSpec((1, blk.cols), lambda i, j: (0, j)),
    ]
    if members is None:
        up = _pad_to(xa.astype(x.dtype), (1, blk.rows, LORA_RANK_PAD))
        in_specs.append(pl.BlockSpec((e, blk.rows, r), lambda i, j: (0, i, 0)))
        out_shape = (e, mp, np_)
        out_spec = pl.BlockSpec((e, blk.rows, blk.cols), lambda i, j: (0, i, j))
        extra = []
    else:
        up = _pad_to(xa.astype(x.dtype), (blk.rows, LORA_RANK_PAD))
        in_specs.append(pl.BlockSpec((blk.rows, r), lambda i, j: (i, 0)))
        out_shape = (mp, np_)
        out_spec = pl.BlockSpec((blk.rows, blk.cols), lambda i, j: (i, j))
        # padded rows get member -1: no adapter
        extra = [jnp.pad(members.astype(jnp.int32), (0, mp - m), constant_values=-1).reshape(mp, 1)]
    in_specs.append(pl.BlockSpec((e, r, blk.cols), lambda i, j: (0, 0, j)))
    if extra:
        in_specs.append(pl.BlockSpec((blk.rows, 1), lambda i, j: (i, 0)))
    kernel = functools.partial(_multi_kernel, depth=blk.depth, steps=kp // blk.depth, scaling=float(scaling),
                               routed=members is not None)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(out_shape, x.dtype),
        grid=(mp // blk.rows, np_ // blk.cols),
        in_specs=in_specs,
        out_specs=out_spec,
        interpret=interpret(),
        compiler_params=_compiler_params(blk, backend),
    )(xp, qp, sp, up, vp, *extra)
    return out[..., :m, :n]


def multi_lora_matmul_reference(x, q, s, xa, b, scaling: float, members=None) -> jax.Array:
    """Plain XLA: every adapter on every row (E, M, N), or one adapter per row (M, N)."""
    cd = x.dtype
    base = (x @ q.astype(cd)) * s.astype(cd)
    if members is None:
        return base[None] + jnp.einsum("emr,ern->emn", xa.astype(cd), b.astype(cd)) * scaling
    return base + jnp.einsum("mr,mrn->mn", xa.astype(cd), b.astype(cd)[members]) * scaling


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def multi_lora_matmul(x, q, s, xa, b, scaling: float, members=None) -> jax.Array:
    """x (M, K), q (K, N) int8, s (N,), b (E, r, N); xa (E, M, r) → (E, M, N) when
    ``members`` is None, else xa (M, r) and members (M,) → (M, N). See the module doc."""
    return _multi_call(x, q, s, xa, b, scaling, members)


def _fwd(x, q, s, xa, b, scaling, members):
    return _multi_call(x, q, s, xa, b, scaling, members), (q, s, xa, b, members)


def _bwd(scaling, residuals, dy):
    q, s, xa, b, members = residuals
    f32 = jnp.float32
    dy32 = dy.astype(f32)
    total = dy32 if members is not None else dy32.sum(axis=0)  # the base saw every adapter's dy
    dx = matmul((total * s).astype(dy.dtype), q, transpose_w=True)
    b32 = b.astype(f32)
    if members is None:
        dxa = scaling * jnp.einsum("emn,ern->emr", dy32, b32)
        db = scaling * jnp.einsum("emr,emn->ern", xa.astype(f32), dy32)
        members_cotangent = None
    else:
        dxa = scaling * jnp.einsum("mn,mrn->mr", dy32, b32[members])
        onehot = jax.nn.one_hot(members, b.shape[0], dtype=f32)  # (M, E)
        db = scaling * jnp.einsum("me,mr,mn->ern", onehot, xa.astype(f32), dy32)
        members_cotangent = None
    return dx, None, None, dxa.astype(xa.dtype), db.astype(b.dtype), members_cotangent


multi_lora_matmul.defvjp(_fwd, _bwd)
