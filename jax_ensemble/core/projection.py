"""Seeded random projections of parameter pytrees, regenerated block by block, never stored.

A projector maps a pytree of p parameters to R^d with a random matrix P ∈ R^{p×d}:

- ``project(projector, g)``: Pᵀg for every leading index of ``g`` (leaves (..., *shape)
  → (..., d));
- ``lift(projector, w)``: P·w back into a parameter pytree (w (..., d) → leaves
  (..., *shape)); ``lift`` is the transpose of ``project``: ⟨Pᵀg, w⟩ = ⟨g, P·w⟩.

Entries are i.i.d. ±1/√d (``rademacher``, default) or N(0, 1/d) (``gaussian``), so
E[PPᵀ] = I and ‖Pᵀg‖² ≈ ‖g‖² (Johnson–Lindenstrauss). P is cut into blocks: leaf ℓ
(flattened row-major, size p_ℓ) is split into consecutive row blocks of
``rows_ℓ = min(block_rows, p_ℓ)`` rows (the last block zero-padded), and block b of
leaf ℓ is ``sample(fold_in(fold_in(key(seed), crc32(path_ℓ)), b), (rows_ℓ, d))`` with
``path_ℓ`` the leaf's ``jax.tree_util.keystr`` path. Only one (rows_ℓ × d) block exists
at a time, and the numbers depend on (seed, kind, leaf path, block index) only, never on
the device layout (JAX's threefry is partitionable), so the same P is produced on one
device or sharded over a mesh. The idea follows MadryLab/trak's projectors (blocks
regenerated from ``seed + block``).

With ``kernels="pallas"`` (Rademacher P only) ``project`` runs the Pallas kernel
:func:`jax_ensemble.kernels.projection.seeded_projection`, which generates the same entries
bit for bit inside the kernel, tile by tile, so no block of P is written to memory; ``lift``
always regenerates blocks with ``jax.random`` (one P for both). A Pallas call has no
partitioning rule, so on a mesh (``make_projector(..., mesh=, batch_axes=)``) the kernel runs
under ``shard_map``: each device projects its own rows of g (the leading axes split over
``batch_axes``) against the whole P, and the (n, d) result stays split the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jax_ensemble.errors import ConfigError
from jax_ensemble.kernels.projection import leaf_key, seeded_projection

PROJECTION_KINDS = ("rademacher", "gaussian")


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """One parameter leaf: its ``keystr`` path, shape and block layout."""

    path: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class Projector:
    """A seeded p × d projection of pytrees with the structure of a template.

    Build with :func:`make_projector`; the matrix itself is never stored."""

    dim: int
    seed: int
    kind: str
    block_rows: int
    treedef: Any
    leaves: tuple[LeafSpec, ...]
    kernels: str = "xla"
    mesh: Mesh | None = None
    batch_axes: tuple[str, ...] = ()

    @property
    def num_params(self) -> int:
        """p, the number of scalars projected."""
        return sum(leaf.size for leaf in self.leaves)

    def metadata(self) -> dict[str, Any]:
        """What identifies P (for manifests)."""
        return {
            "dim": self.dim,
            "seed": self.seed,
            "kind": self.kind,
            "block_rows": self.block_rows,
            "num_params": self.num_params,
            "leaves": [{"path": leaf.path, "shape": list(leaf.shape)} for leaf in self.leaves],
        }


def make_projector(
    template: Any, dim: int, *, seed: int = 0, kind: str = "rademacher", block_rows: int = 4096,
    kernels: str = "xla", mesh: Mesh | None = None, batch_axes: tuple[str, ...] = (),
) -> Projector:
    """A projector for pytrees shaped like ``template`` (arrays or shape-dtype structs).

    ``kernels``: ``xla`` or ``pallas`` (how ``project`` runs; not part of P's identity).
    ``mesh`` / ``batch_axes``: the mesh the gradients live on and the axes their examples
    are split over (the Pallas kernel then runs per device under ``shard_map``)."""
    if dim <= 0:
        raise ConfigError(f"projection dimension must be > 0, got {dim}")
    if kind not in PROJECTION_KINDS:
        raise ConfigError(f"projection kind must be one of {', '.join(PROJECTION_KINDS)}; got {kind!r}")
    if block_rows <= 0:
        raise ConfigError(f"projection block_rows must be > 0, got {block_rows}")
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    if not flat:
        raise ConfigError("cannot project an empty parameter pytree")
    leaves = tuple(LeafSpec(jax.tree_util.keystr(path), tuple(leaf.shape)) for path, leaf in flat)
    return Projector(dim=dim, seed=seed, kind=kind, block_rows=block_rows, treedef=treedef, leaves=leaves,
                     kernels=kernels, mesh=mesh, batch_axes=tuple(batch_axes))


def _rows(projector: Projector, leaf: LeafSpec) -> int:
    return min(projector.block_rows, leaf.size)


def _num_blocks(projector: Projector, leaf: LeafSpec) -> int:
    return -(-leaf.size // _rows(projector, leaf))


def _leaf_id(leaf: LeafSpec) -> int:
    return zlib.crc32(leaf.path.encode())


def projection_block(projector: Projector, leaf: LeafSpec, block: jax.Array | int) -> jax.Array:
    """Block ``block`` of leaf ``leaf``'s rows of P: (rows_ℓ, d) float32 (see module doc)."""
    key = jax.random.fold_in(jax.random.key(projector.seed), _leaf_id(leaf))
    key = jax.random.fold_in(key, block)
    shape = (_rows(projector, leaf), projector.dim)
    scale = 1.0 / math.sqrt(projector.dim)
    if projector.kind == "rademacher":
        return jax.random.rademacher(key, shape, jnp.float32) * scale
    return jax.random.normal(key, shape, jnp.float32) * scale


def _check_structure(projector: Projector, tree: Any, what: str) -> list[jax.Array]:
    leaves, treedef = jax.tree.flatten(tree)
    if treedef != projector.treedef:
        raise ConfigError(f"{what} does not have the projector's parameter structure: build the projector with "
                          "make_projector on the same pytree of parameters")
    return leaves


def project(projector: Projector, grads: Any) -> jax.Array:
    """Pᵀg: leaves (..., *shape_ℓ) with common leading axes (...) → (..., d) float32.

    Sums over leaves and, inside a leaf, over row blocks with a ``lax.scan`` that
    regenerates one block at a time."""
    leaves = _check_structure(projector, grads, "gradient pytree")
    lead = leaves[0].shape[: leaves[0].ndim - len(projector.leaves[0].shape)]
    n = math.prod(lead)
    out = jnp.zeros((n, projector.dim), jnp.float32)
    for spec, g in zip(projector.leaves, leaves):
        if g.shape != lead + spec.shape:
            raise ConfigError(f"gradient leaf {spec.path} has shape {g.shape}, expected {lead + spec.shape} "
                              "(leading axes, then the parameter's shape)")
        rows, blocks = _rows(projector, spec), _num_blocks(projector, spec)
        flat = g.reshape(n, spec.size).astype(jnp.float32)
        if projector.kernels == "pallas" and projector.kind == "rademacher":
            kernel = functools.partial(seeded_projection, key=leaf_key(projector.seed, _leaf_id(spec)),
                                       block_rows=rows, dim=projector.dim, scale=1.0 / math.sqrt(projector.dim))
            if projector.mesh is not None and projector.mesh.size > 1:  # each device: its rows of g, all of P
                rows_spec = PartitionSpec(projector.batch_axes or None)
                kernel = jax.shard_map(kernel, mesh=projector.mesh, in_specs=rows_spec, out_specs=rows_spec,
                                       check_vma=False)
            out = out + kernel(flat)
            continue
        flat = jnp.pad(flat, ((0, 0), (0, rows * blocks - spec.size)))
        chunks = jnp.moveaxis(flat.reshape(n, blocks, rows), 1, 0)  # (blocks, n, rows)

        def body(acc, xs, spec=spec):
            b, chunk = xs
            return acc + chunk @ projection_block(projector, spec, b), None

        out, _ = jax.lax.scan(body, out, (jnp.arange(blocks), chunks))
    return out.reshape(lead + (projector.dim,))


def lift(projector: Projector, w: jax.Array) -> Any:
    """P·w: w (..., d) → a pytree with leaves (..., *shape_ℓ) float32 (transpose of ``project``)."""
    w = jnp.asarray(w, jnp.float32)
    if w.shape[-1:] != (projector.dim,):
        raise ConfigError(f"lift expects (..., {projector.dim}) coefficients (the projection dimension last), "
                          f"got shape {w.shape}")
    lead = w.shape[:-1]
    flat_w = w.reshape(-1, projector.dim)  # (m, d)
    leaves = []
    for spec in projector.leaves:
        rows, blocks = _rows(projector, spec), _num_blocks(projector, spec)
        parts = jax.lax.map(
            lambda b, spec=spec: flat_w @ projection_block(projector, spec, b).T, jnp.arange(blocks)
        )  # (blocks, m, rows)
        flat = jnp.moveaxis(parts, 0, 1).reshape(flat_w.shape[0], blocks * rows)[:, : spec.size]
        leaves.append(flat.reshape(lead + spec.shape))
    return jax.tree.unflatten(projector.treedef, leaves)
