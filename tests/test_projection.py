"""Seeded projectors, checked by properties that do not repeat the implementation's recipe:
the adjoint identity between ``project`` and ``lift``, the entry distribution and
E[PPᵀ] = I (tolerances from the entries' variance), E‖Pᵀg‖² = ‖g‖², what identifies P
(seed, kind, block size, leaf path), Johnson–Lindenstrauss distortion, and the same
numbers on 1 and 8 devices and in another process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_ensemble.core.projection import lift, make_projector, project
from jax_ensemble.errors import ConfigError

TEMPLATE = {"a": jnp.zeros((3, 7)), "b": {"c": jnp.zeros((50,)), "d": jnp.zeros((2, 2, 2))}}
P_TEMPLATE = 21 + 50 + 8


def flat(tree, lead: int = 0) -> np.ndarray:
    leaves = jax.tree.leaves(tree)
    return np.concatenate([np.asarray(x, np.float64).reshape(x.shape[:lead] + (-1,)) for x in leaves], axis=-1)


def random_like(template, lead, seed):
    leaves, treedef = jax.tree.flatten(template)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, lead + x.shape) for k, x in zip(keys, leaves)])


def matrix(projector) -> np.ndarray:
    """P (p, d) in float64, read off by lifting the d unit vectors (P·e_k is column k).
    Run op by op (no compilation per seed: many projectors stay cheap)."""
    with jax.disable_jit():
        return flat(lift(projector, jnp.eye(projector.dim)), 1).T


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("lead", [(), (2, 3)])
def test_lift_is_the_adjoint_of_project(kind, lead):
    """⟨Pᵀg, w⟩ = ⟨g, P·w⟩ for random g and w with any leading axes (c: 4 blocks of 16
    rows, the last partial). Computed on both sides in float64 from float32 outputs."""
    projector = make_projector(TEMPLATE, 24, seed=7, kind=kind, block_rows=16)
    grads = random_like(TEMPLATE, lead, 0)
    w = jax.random.normal(jax.random.key(1), lead + (24,))
    projected, lifted = np.asarray(project(projector, grads), np.float64), lift(projector, w)
    assert projected.shape == lead + (24,)
    assert [x.shape for x in jax.tree.leaves(lifted)] == [lead + x.shape for x in jax.tree.leaves(TEMPLATE)]
    lhs = np.sum(projected * np.asarray(w, np.float64), axis=-1)
    rhs = np.sum(flat(grads, len(lead)) * flat(lifted, len(lead)), axis=-1)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-4, atol=1e-4)
    assert np.all(np.abs(lhs) > 1e-3)  # not a trivially zero identity


def test_entries_follow_the_documented_distribution():
    """Rademacher entries are exactly ±1/√d; Gaussian ones have mean 0 and variance 1/d:
    the sample mean and variance of √d·P over p·d entries lie within 5 standard errors
    (standard error of the mean 1/√(pd), of the variance √(2/(pd)))."""
    d = 64
    rademacher = matrix(make_projector(TEMPLATE, d, seed=2, block_rows=16)) * math.sqrt(d)
    np.testing.assert_allclose(np.abs(rademacher), 1.0, rtol=1e-6)
    gaussian = matrix(make_projector(TEMPLATE, d, seed=2, kind="gaussian", block_rows=16)) * math.sqrt(d)
    for x in (rademacher, gaussian):
        n = x.size
        assert abs(x.mean()) < 5 / math.sqrt(n)
    assert abs(gaussian.var() - 1.0) < 5 * math.sqrt(2 / gaussian.size)
    # Gaussian, not uniform or ±1: the fourth moment E x⁴ = 3 (standard error √(96/n))
    assert abs(np.mean(gaussian**4) - 3.0) < 5 * math.sqrt(96 / gaussian.size)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_ppt_is_the_identity_in_expectation(kind):
    """The average of PPᵀ over S seeds approaches I: off-diagonal entries have mean 0 and
    variance 1/(dS) (each is a sum of d products of independent entries), diagonal ones
    are 1 (Rademacher: exactly) with variance 2/(dS) (Gaussian). Their largest deviation
    stays within 5.5 standard deviations (a union bound over the p² entries), and their RMS
    within 15% of the predicted standard deviation: rows that repeat or correlate (e.g. the
    same block for two leaves) would give entries near 1."""
    d, seeds = 32, 12
    mean = np.mean([(lambda p: p @ p.T)(matrix(make_projector(TEMPLATE, d, seed=s, kind=kind, block_rows=16)))
                    for s in range(seeds)], axis=0)
    off = mean[~np.eye(P_TEMPLATE, dtype=bool)]
    sd_off = 1 / math.sqrt(d * seeds)
    assert np.max(np.abs(off)) < 5.5 * sd_off
    assert 0.85 < math.sqrt(np.mean(off**2)) / sd_off < 1.15
    diagonal = np.diag(mean)
    if kind == "rademacher":
        np.testing.assert_allclose(diagonal, 1.0, rtol=1e-6)
    else:
        sd_diag = math.sqrt(2 / (d * seeds))
        assert np.max(np.abs(diagonal - 1)) < 5.5 * sd_diag
        assert 0.7 < math.sqrt(np.mean((diagonal - 1) ** 2)) / sd_diag < 1.3


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projected_squared_norm_is_unbiased(kind):
    """E‖Pᵀg‖² = ‖g‖² with variance (2/d)(‖g‖⁴ − Σ g_i⁴) (Rademacher) or 2‖g‖⁴/d (Gaussian):
    the mean over S seeds is within 5 of its standard errors of ‖g‖²."""
    d, seeds = 16, 40
    g = random_like(TEMPLATE, (), 3)
    g_flat = flat(g)
    norm2 = float(g_flat @ g_flat)
    var = 2 / d * (norm2**2 - (np.sum(g_flat**4) if kind == "rademacher" else 0.0))
    with jax.disable_jit():  # op by op: no compilation per seed
        values = [float(np.sum(np.asarray(project(make_projector(TEMPLATE, d, seed=s, kind=kind), g), np.float64) ** 2))
                  for s in range(seeds)]
    assert abs(np.mean(values) - norm2) < 5 * math.sqrt(var / seeds)


def test_seed_kind_block_size_and_leaf_path_identify_p():
    """P changes with the seed (every row an independent draw), the kind (every row) and
    block_rows (rows past the first block of each leaf come from other blocks' keys), all
    recorded in the metadata; a leaf's rows depend on its own path, not on its position or
    on the other leaves: renaming another leaf or adding one leaves them unchanged, moving
    the leaf to another path changes them. Independent rows have |⟨p_i, q_i⟩| = O(1/√d),
    far from the 1 of a repeated row (d = 24: 0.9 is over 4 standard deviations)."""
    reference = make_projector(TEMPLATE, 24, seed=3, block_rows=16)
    p = matrix(reference)

    def independent(q: np.ndarray, rows=slice(None)) -> np.ndarray:
        return np.abs(np.sum(p[rows] * q, axis=1)) < 0.9

    other_seed = make_projector(TEMPLATE, 24, seed=4, block_rows=16)
    assert other_seed.metadata() != reference.metadata() and independent(matrix(other_seed)).all()
    # the same keys drawn as Gaussians: a different matrix in every row (signs may agree)
    gaussian = make_projector(TEMPLATE, 24, seed=3, block_rows=16, kind="gaussian")
    assert gaussian.metadata() != reference.metadata()
    assert not np.any(np.all(np.isclose(matrix(gaussian), p), axis=1))
    smaller = make_projector(TEMPLATE, 24, seed=3, block_rows=8)
    assert smaller.metadata() != reference.metadata()
    changed = independent(matrix(smaller))
    # leaf a (21 rows): rows 8..15 move from block 0 to block 1, rows 16..20 from block 1 to
    # block 2; c (50 rows): every row past the first 8; d (8 rows): one block either way
    assert changed.sum() >= (21 - 8) + (50 - 8)
    rows_a = slice(0, 21)  # leaf "a" comes first in every template below
    renamed = {"a": TEMPLATE["a"], "z": TEMPLATE["b"], "extra": jnp.zeros((5,))}
    np.testing.assert_array_equal(matrix(make_projector(renamed, 24, seed=3, block_rows=16))[rows_a], p[rows_a])
    moved = {"b": {"c": TEMPLATE["a"]}}  # the same shape under another path
    assert independent(matrix(make_projector(moved, 24, seed=3, block_rows=16)), rows_a).all()


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
    projector = make_projector(TEMPLATE, 8)
    with pytest.raises(ConfigError, match="does not have the projector's parameter structure"):
        project(projector, {"a": jnp.zeros((3, 7))})
    with pytest.raises(ConfigError, match=r"gradient leaf \['a'\] has shape \(2, 7\)"):
        project(projector, {**TEMPLATE, "a": jnp.zeros((2, 7))})
    with pytest.raises(ConfigError, match=r"lift expects \(\.\.\., 8\) coefficients"):
        lift(projector, jnp.zeros((3, 7)))


SHARDED = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P, AxisType
    from jax_ensemble.core.projection import make_projector, project, lift
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
                       for a, b in zip(jax.tree.leaves(single[1]), jax.tree.leaves(sharded[1]))),
           "values": np.asarray(single[0]).tolist()}
    # the Pallas kernel (interpret mode here) per device under shard_map, rows over "data"
    kproj = make_projector(template, 24, seed=5, block_rows=64, kernels="pallas", mesh=mesh, batch_axes=("data",))
    kernel = jax.jit(lambda g: project(kproj, g))(gs)
    out["kernel_project"] = float(np.max(np.abs(np.asarray(single[0]) - np.asarray(kernel))))
    out["kernel_rows_split"] = kernel.sharding.spec[0] == "data"
    print(json.dumps(out))
    """
)


def test_same_numbers_on_one_and_eight_devices():
    """P is regenerated, never stored: another process with 8 devices gives the same
    projections on one device and sharded over a 4x2 mesh (XLA, and the Pallas kernel under
    shard_map with its output rows split over the mesh), and the same numbers as this
    process (a projector rebuilt from its metadata is the same matrix)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    diffs = json.loads(result.stdout.strip().splitlines()[-1])
    assert diffs["project"] <= 1e-5 and diffs["lift"] <= 1e-6 and diffs["kernel_project"] <= 1e-5, diffs
    assert diffs["kernel_rows_split"], diffs
    proj = make_projector({"a": jnp.zeros((16, 12)), "b": jnp.zeros((40,))}, 24, seed=5, block_rows=64)
    keys = jax.random.split(jax.random.key(0), 2)
    grads = {"a": jax.random.normal(keys[0], (8, 16, 12)), "b": jax.random.normal(keys[1], (8, 40))}
    np.testing.assert_allclose(np.asarray(project(proj, grads)), diffs["values"], rtol=1e-5, atol=1e-5)
