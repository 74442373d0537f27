"""Seeded projectors: against a dense P built from the documented recipe, transpose
identity, Johnson–Lindenstrauss distortion, and identical numbers on 1 and 8 devices."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_ensemble.errors import ConfigError
from jax_ensemble.projection import lift, make_projector, project

TEMPLATE = {"a": jnp.zeros((3, 7)), "b": {"c": jnp.zeros((50,)), "d": jnp.zeros((2, 2, 2))}}


def dense_from_recipe(template, dim: int, seed: int, kind: str, block_rows: int) -> np.ndarray:
    """P (p, d) written out from the module docstring's recipe, leaf by leaf, block by block."""
    rows_all = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(template)[0]:
        size = leaf.size
        rows = min(block_rows, size)
        leaf_key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(jax.tree_util.keystr(path).encode()))
        blocks = []
        for b in range(math.ceil(size / rows)):
            key = jax.random.fold_in(leaf_key, b)
            sample = jax.random.rademacher if kind == "rademacher" else jax.random.normal
            blocks.append(np.asarray(sample(key, (rows, dim), jnp.float32)) / math.sqrt(dim))
        rows_all.append(np.concatenate(blocks)[:size])
    return np.concatenate(rows_all)


def flat(tree, lead: int = 0) -> np.ndarray:
    leaves = jax.tree.leaves(tree)
    return np.concatenate([np.asarray(x).reshape(x.shape[:lead] + (-1,)) for x in leaves], axis=-1)


def random_like(template, lead, seed):
    leaves, treedef = jax.tree.flatten(template)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, lead + x.shape) for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_project_and_lift_match_dense_matrix(kind):
    projector = make_projector(TEMPLATE, 24, seed=7, kind=kind, block_rows=16)  # c: 4 blocks, last partial
    dense = dense_from_recipe(TEMPLATE, 24, 7, kind, 16)
    assert dense.shape == (projector.num_params, 24) == (21 + 50 + 8, 24)
    grads = random_like(TEMPLATE, (5,), 0)
    np.testing.assert_allclose(np.asarray(project(projector, grads)), flat(grads, 1) @ dense, rtol=1e-5, atol=1e-5)
    w = np.asarray(jax.random.normal(jax.random.key(1), (3, 24)))
    np.testing.assert_allclose(flat(lift(projector, w), 1), w @ dense.T, rtol=1e-5, atol=1e-5)
    if kind == "rademacher":
        np.testing.assert_array_equal(np.abs(dense) * math.sqrt(24), np.ones_like(dense))


def test_lift_is_transpose_of_project_and_seed_matters():
    projector = make_projector(TEMPLATE, 32, seed=3, block_rows=8)
    grads = random_like(TEMPLATE, (4,), 2)
    w = jax.random.normal(jax.random.key(5), (32,))
    lhs = np.asarray(project(projector, grads) @ w)
    rhs = flat(grads, 1) @ flat(lift(projector, w))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5, atol=1e-5)
    other = make_projector(TEMPLATE, 32, seed=4, block_rows=8)
    assert not np.allclose(np.asarray(project(other, grads)), np.asarray(project(projector, grads)))
    np.testing.assert_array_equal(np.asarray(project(projector, grads)), np.asarray(project(projector, grads)))


def test_johnson_lindenstrauss_distortion():
    """n points in R^p projected to d = 400 keep squared distances within the JL ε for n."""
    n, p, d = 20, 6000, 400
    eps = 0.3  # JL: d >= 4 ln n / (ε²/2 − ε³/3) holds for n = 20, d = 400 at ε = 0.3
    assert d >= 4 * math.log(n) / (eps**2 / 2 - eps**3 / 3)
    x = jax.random.normal(jax.random.key(0), (n, p))
    projector = make_projector({"w": jnp.zeros((p,))}, d, seed=11)
    y = np.asarray(project(projector, {"w": x}))
    xn = np.asarray(x)
    for i in range(n):
        for j in range(i + 1, n):
            ratio = np.sum((y[i] - y[j]) ** 2) / np.sum((xn[i] - xn[j]) ** 2)
            assert 1 - eps <= ratio <= 1 + eps
    cos_x = (xn @ xn.T) / np.outer(np.linalg.norm(xn, axis=1), np.linalg.norm(xn, axis=1))
    cos_y = (y @ y.T) / np.outer(np.linalg.norm(y, axis=1), np.linalg.norm(y, axis=1))
    assert np.max(np.abs(cos_x - cos_y)) < eps


def test_bad_projector_arguments():
    with pytest.raises(ConfigError, match="dimension must be > 0"):
        make_projector(TEMPLATE, 0)
    with pytest.raises(ConfigError, match="kind must be one of"):
        make_projector(TEMPLATE, 8, kind="sparse")
    with pytest.raises(ConfigError, match="empty parameter pytree"):
        make_projector({}, 8)


SHARDED = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P, AxisType
    from jax_ensemble.projection import make_projector, project, lift
    assert jax.device_count() == 8
    template = {"a": jnp.zeros((16, 12)), "b": jnp.zeros((40,))}
    proj = make_projector(template, 24, seed=5, block_rows=64)
    keys = jax.random.split(jax.random.key(0), 2)
    grads = {"a": jax.random.normal(keys[0], (8, 16, 12)), "b": jax.random.normal(keys[1], (8, 40))}
    w = jax.random.normal(jax.random.key(9), (8, 24))
    one = jax.devices()[0]
    single = jax.jit(lambda g, w: (project(proj, g), lift(proj, w)))(jax.device_put(grads, one), jax.device_put(w, one))
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    gs = {"a": jax.device_put(grads["a"], NamedSharding(mesh, P("data", "model"))),
          "b": jax.device_put(grads["b"], NamedSharding(mesh, P("data", "model")))}
    ws = jax.device_put(w, NamedSharding(mesh, P("data")))
    sharded = jax.jit(lambda g, w: (project(proj, g), lift(proj, w)))(gs, ws)
    assert len(gs["a"].sharding.device_set) == 8
    out = {"project": float(np.max(np.abs(np.asarray(single[0]) - np.asarray(sharded[0])))),
           "lift": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                       for a, b in zip(jax.tree.leaves(single[1]), jax.tree.leaves(sharded[1])))}
    print(json.dumps(out))
    """
)


def test_same_numbers_on_one_and_eight_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    diffs = json.loads(result.stdout.strip().splitlines()[-1])
    assert diffs["project"] <= 1e-5 and diffs["lift"] <= 1e-6, diffs
