"""Pallas kernels (interpreted on CPU, compiled on a GPU) against their plain-XLA references and
JAX's own PRNG: forward and gradients, shapes that do not divide the blocks, float32 and
bfloat16, LoRA rank 1–64, 1–8 adapters. Imports only JAX and the kernels (runs on a bare
accelerator image); the model-level checks are in test_kernels_model.py."""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_ensemble.core import projection
from jax_ensemble.kernels import (
    int8_lora_matmul,
    int8_lora_matmul_reference,
    multi_lora_matmul,
    multi_lora_matmul_reference,
    seeded_projection,
)
from jax_ensemble.kernels.int8_lora import Blocks, choose_blocks, matmul
from jax_ensemble.kernels.projection import leaf_key
from jax_ensemble.kernels.threefry import fold_in, rademacher_entries

TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}  # relative to the reference's largest entry


def close(actual, expected, dtype) -> None:
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOLERANCE[dtype] * scale)


def operands(m, k, n, r, dtype, *, adapters=None, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (m, k)).astype(dtype)
    q = jax.random.randint(keys[1], (k, n), -127, 128, jnp.int32).astype(jnp.int8)
    s = jax.random.uniform(keys[1], (n,), jnp.float32, 1e-4, 1e-3)
    lead = () if adapters is None else (adapters,)
    a = jax.random.normal(keys[2], lead + (k, r)) * 0.1
    b = jax.random.normal(keys[3], lead + (r, n)) * 0.1
    return x, q, s, a, b


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(37, 100, 70, 1), (16, 64, 128, 8), (130, 72, 45, 64)])
def test_int8_lora_matmul_matches_xla_forward_and_gradients(dtype, shape):
    m, k, n, r = shape
    x, q, s, a, b = operands(m, k, n, r, dtype)
    x = x.reshape(1, m, k)  # a leading batch axis, as in the model

    def loss(fn, x, a, b):
        y = fn(x, q, s, x @ a.astype(x.dtype), b, 2.0)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)))

    # truth: the reference in float32 on the same (bf16-rounded) inputs. In float32 the kernel
    # must match it; in bfloat16 it must be no further from it than XLA's own bf16 run of the
    # same maths (or within bf16's tolerance), output and gradients.
    x32 = x.astype(jnp.float32)
    truth = [int8_lora_matmul_reference(x32, q, s, x32 @ a, b, 2.0),
             *jax.grad(loss, argnums=(1, 2, 3))(int8_lora_matmul_reference, x32, a, b)]
    ours = [int8_lora_matmul(x, q, s, x @ a.astype(dtype), b, 2.0),
            *jax.grad(loss, argnums=(1, 2, 3))(int8_lora_matmul, x, a, b)]
    xla = [int8_lora_matmul_reference(x, q, s, x @ a.astype(dtype), b, 2.0),
           *jax.grad(loss, argnums=(1, 2, 3))(int8_lora_matmul_reference, x, a, b)]
    for mine, theirs, exact in zip(ours, xla, truth):
        if dtype == jnp.float32:
            close(mine, exact, dtype)
        else:
            assert relative_error(mine, exact) <= max(TOLERANCE[dtype], 1.25 * relative_error(theirs, exact))


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape
    return float(np.abs(actual - expected).max() / max(1.0, float(np.abs(expected).max())))


def test_float_base_and_no_lora_match_xla():
    x, q, s, _, _ = operands(20, 48, 40, 4, jnp.float32)
    w = q.astype(jnp.float32) * s
    close(int8_lora_matmul(x, w, None, None, None, 1.0), x @ w, jnp.float32)
    dx = jax.grad(lambda x: jnp.sum(int8_lora_matmul(x, q, s, None, None, 1.0) ** 2))(x)
    dx_ref = jax.grad(lambda x: jnp.sum(int8_lora_matmul_reference(x, q, s, None, None, 1.0) ** 2))(x)
    close(dx, dx_ref, jnp.float32)


def test_blocks_that_do_not_divide_and_transposed_reads():
    x, q, _, _, _ = operands(50, 70, 30, 1, jnp.float32)
    small = Blocks(rows=16, cols=16, depth=16)
    close(matmul(x, q, blocks=small), x @ q.astype(jnp.float32), jnp.float32)
    y = jax.random.normal(jax.random.key(3), (50, 30))
    close(matmul(y, q, transpose_w=True, blocks=small), y @ q.astype(jnp.float32).T, jnp.float32)


def test_block_table_is_power_of_two_on_gpu_and_lane_aligned_on_tpu():
    for m, n, k in [(1, 1, 1), (37, 576, 576), (4096, 14336, 4096)]:
        gpu = choose_blocks(m, n, k, jnp.bfloat16, "gpu")
        assert all(v & (v - 1) == 0 and v >= 16 for v in (gpu.rows, gpu.cols, gpu.depth))
        tpu = choose_blocks(m, n, k, jnp.bfloat16, "tpu")
        assert tpu.cols % 128 == 0 and tpu.depth % 128 == 0 and tpu.rows % 8 == 0


@pytest.mark.parametrize("adapters", [1, 3, 8])
@pytest.mark.parametrize("routed", [False, True])
def test_multi_lora_matmul_matches_xla(adapters, routed):
    m, k, n, r = 29, 72, 40, 4
    x, q, s, a, b = operands(m, k, n, r, jnp.float32, adapters=adapters)
    members = jax.random.randint(jax.random.key(5), (m,), 0, adapters) if routed else None

    def loss(fn, x, a, b):
        xa = jnp.einsum("mk,ekr->emr", x, a)
        if members is not None:
            xa = xa[members, jnp.arange(m)]
        return jnp.sum(jnp.sin(fn(x, q, s, xa, b, 0.5, members)))

    ours = jax.grad(loss, argnums=(1, 2, 3))(multi_lora_matmul, x, a, b)
    reference = jax.grad(loss, argnums=(1, 2, 3))(multi_lora_matmul_reference, x, a, b)
    assert float(loss(multi_lora_matmul, x, a, b)) == pytest.approx(float(loss(multi_lora_matmul_reference, x, a, b)),
                                                                  rel=1e-5)
    for g, g_ref in zip(ours, reference):
        close(g, g_ref, jnp.float32)


def test_every_adapter_equals_one_adapter_at_a_time():
    """The shared-base form is E single-adapter products (the property that makes sharing exact)."""
    x, q, s, a, b = operands(33, 64, 48, 2, jnp.bfloat16, adapters=3)
    xa = jnp.einsum("mk,ekr->emr", x, a.astype(jnp.bfloat16))
    together = multi_lora_matmul(x, q, s, xa, b, 1.5)
    for e in range(3):
        close(together[e], int8_lora_matmul(x, q, s, xa[e], b[e], 1.5), jnp.bfloat16)


def test_threefry_matches_jax_prng_bit_for_bit():
    key = jax.random.fold_in(jax.random.key(11), zlib.crc32(b"['layers']['lora_a']"))
    k0, k1 = jax.random.key_data(key)
    for data in (0, 7, 2**31 + 5):
        expected = jax.random.key_data(jax.random.fold_in(key, data))
        got = fold_in(k0, k1, jnp.uint32(data))
        assert [int(w) for w in got] == [int(w) for w in expected]
    b0, b1 = fold_in(k0, k1, jnp.uint32(3))
    counters = jnp.arange(41, dtype=jnp.uint32)[:, None] * 23 + jnp.arange(23, dtype=jnp.uint32)[None]
    np.testing.assert_array_equal(rademacher_entries(b0, b1, counters),
                                  jax.random.rademacher(jax.random.fold_in(key, 3), (41, 23), jnp.float32))


def test_seeded_projection_generates_projection_block_bit_for_bit():
    template = {"a": jnp.zeros((30, 7)), "b": jnp.zeros((5,))}
    projector = projection.make_projector(template, 24, seed=4, block_rows=64)
    spec = projector.leaves[0]
    identity = jnp.eye(spec.size)  # Pᵀ e_i = row i of P, exactly (one non-zero product)
    rows = seeded_projection(identity, key=leaf_key(4, zlib.crc32(spec.path.encode())), block_rows=64,
                             dim=24, scale=1 / math.sqrt(24))
    blocks = [projection.projection_block(projector, spec, i) for i in range(-(-spec.size // 64))]
    np.testing.assert_array_equal(rows, jnp.concatenate(blocks)[: spec.size])


@pytest.mark.parametrize("block_rows", [16, 4096])
def test_project_with_the_kernel_equals_xla_and_stays_the_transpose_of_lift(block_rows):
    template = {"a": jnp.zeros((13, 9)), "b": {"c": jnp.zeros((3, 20))}}
    grads = jax.tree.map(lambda t: jax.random.normal(jax.random.key(t.size), (6,) + t.shape), template)
    xla = projection.make_projector(template, 40, seed=2, block_rows=block_rows)
    pallas = projection.make_projector(template, 40, seed=2, block_rows=block_rows, kernels="pallas")
    assert pallas.metadata() == xla.metadata()
    project_in_jit = jax.jit(lambda g: projection.project(pallas, g))  # as the gradient stage runs it
    close(project_in_jit(grads), projection.project(xla, grads), jnp.float32)
    w = jax.random.normal(jax.random.key(8), (40,))
    lifted = projection.lift(pallas, w)  # ⟨Pᵀg, w⟩ = ⟨g, P·w⟩ with the kernel's Pᵀ
    inner = sum(jnp.sum(g[0] * l) for g, l in zip(jax.tree.leaves(grads), jax.tree.leaves(lifted)))
    assert float(jnp.dot(projection.project(pallas, grads)[0], w)) == pytest.approx(float(inner), rel=1e-5)


def test_addend_epilogue():
    x, q, s, a, b = operands(40, 64, 48, 4, jnp.float32)
    c = jax.random.normal(jax.random.key(2), (40, 48))
    close(matmul(x, q, s, c, blocks=Blocks(16, 16, 16)), (x @ q.astype(jnp.float32)) * s + c, jnp.float32)
