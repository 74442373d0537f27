"""Device mesh and partition rules: sharding is data, not code paths.

The mesh has three named axes ``(data, fsdp, tensor)`` (any may be 1). Every array of a
run — int8 base values and their scales, float base weights, LoRA parameters, optimizer
state, batches — gets its :class:`~jax.sharding.PartitionSpec` from the first rule whose
regex fully matches the array's dotted path (``layers.self_attn.q_proj.kernel``;
optimizer state paths carry a prefix such as ``opt_state.1.0.mu.``). A dimension that
the named mesh axes do not divide evenly is replicated instead, so the same rules serve a
tiny test model and a 70B model, on 1 CPU device, 8 fake devices, a GPU node or a pod.

Layout (``L`` = stacked decoder layers):

=========================  ============  ==========================
array                      shape         spec
=========================  ============  ==========================
layer kernel (int8/float)  (L, in, out)  (None, fsdp, tensor)
layer scale                (L, out)      (None, tensor)
LoRA A                     (L, in, r)    (None, fsdp, None)
LoRA B                     (L, r, out)   (None, None, tensor)
embedding (int8/float)     (V, D)        (tensor, fsdp)   (Llama embed_tokens; GPT-2 wte, wpe)
embedding scale            (V,)          (tensor,)
batch leaves               (B, ...)      ((data, fsdp),)
anything else              any           replicated
=========================  ============  ==========================

Multi-host: :func:`initialize_distributed` joins the processes (one per host) before any
other JAX call; arrays are then assembled from host data with
:func:`put_global`, each process supplying only its addressable shards. The frozen base
is loaded straight into its shardings instead (:func:`leaf_sharding` handed to
``models.loading.load_pretrained``), each process reading only its devices' blocks.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_ensemble.errors import ConfigError
from jax_ensemble.training.settings import MeshConfig, TrainingConfig, check_batch_divisible

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = Sequence[tuple[str, P]]

DEFAULT_RULES: Rules = (
    (r".*lora_a", P(None, "fsdp", None)),
    (r".*lora_b", P(None, None, "tensor")),
    (r".*layers\..*\.kernel", P(None, "fsdp", "tensor")),
    (r".*layers\..*\.scale", P(None, "tensor")),
    (r".*lm_head\.kernel", P("fsdp", "tensor")),
    (r".*lm_head\.scale", P("tensor")),
    (r".*(embed_tokens|wte|wpe)\.embedding", P("tensor", "fsdp")),
    (r".*(embed_tokens|wte|wpe)\.scale", P("tensor")),
    (r".*", P()),
)


def initialize_distributed(config: MeshConfig) -> None:
    """Join a multi-process run (one process per host) with ``jax.distributed``.

    Call before any other JAX computation. ``coordinator_address`` ``""`` does nothing;
    ``"auto"`` lets JAX detect the cluster (TPU pod, SLURM, Open MPI); ``"host:port"``
    uses ``num_processes`` and ``process_id``. On CPU, collectives go through gloo."""
    if not config.coordinator_address or jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if config.coordinator_address == "auto":
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
        )


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolve the one ``-1`` axis and check that the sizes multiply to ``num_devices``."""
    sizes = [config.data, config.fsdp, config.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(
                f"mesh axes of sizes {known} do not divide the {num_devices} devices; "
                "set mesh.data/fsdp/tensor so they multiply to the device count"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices, "
            f"but {num_devices} are available; make the sizes multiply to {num_devices} (or use -1)"
        )
    return sizes[0], sizes[1], sizes[2]


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ``(data, fsdp, tensor)`` mesh over ``devices`` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(config, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def check_batch_fits(training: TrainingConfig, mesh: Mesh) -> None:
    """ConfigError unless micro-batches and evaluation batches split evenly over the mesh's
    data axes."""
    check_batch_divisible(training, math.prod(mesh.shape[a] for a in BATCH_AXES))
    check_rows_fit(training.eval_batch_size, mesh, "training.eval_batch_size")


def path_name(path: tuple[Any, ...]) -> str:
    """Dotted name of a pytree key path, without NNX's trailing ``.value``."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    if parts and parts[-1] == "value":
        parts.pop()
    return ".".join(parts)


def partition_spec(name: str, shape: tuple[int, ...], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> P:
    """Spec of the first rule fully matching ``name``, each dimension replicated unless its
    mesh axes divide it; trailing dimensions beyond the rule are replicated."""
    for pattern, spec in rules:
        if re.fullmatch(pattern, name):
            break
    else:
        return P()
    if len(spec) > len(shape):
        raise ConfigError(f"partition rule {pattern!r} has {len(spec)} axes but {name} has shape {shape}: "
                          "give the rule at most as many axes as the array has")
    fitted = []
    for dim, axes in zip(shape, spec):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        fitted.append(axes if names and dim % size == 0 else None)
    return P(*fitted)


def leaf_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Callable[[str, tuple[int, ...]], NamedSharding]:
    """(dotted name, shape) → the array's :class:`NamedSharding` under ``rules``: what
    ``models.loading.load_pretrained(..., sharding=...)`` loads the base straight into
    (the layout :func:`tree_shardings` gives the same base, so :func:`put_global` keeps it)."""
    return lambda name, shape: NamedSharding(mesh, partition_spec(name, shape, mesh, rules))


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES, prefix: str = "", leading: int = 0) -> Any:
    """A pytree of :class:`NamedSharding` matching ``tree`` (arrays or ShapeDtypeStructs).

    ``leading`` axes (e.g. the member axis M of stacked adapters) are replicated and the
    rules apply to the dimensions after them."""

    def one(path, leaf):
        name = prefix + path_name(path)
        shape = np.shape(leaf)
        spec = partition_spec(name, shape[leading:], mesh, rules)
        return NamedSharding(mesh, P(*([None] * min(leading, len(shape))), *spec))

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, ndim: int, leading: int = 0) -> NamedSharding:
    """Sharding of a batch leaf: axis ``leading`` split over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, P(*([None] * leading), BATCH_AXES, *([None] * (ndim - leading - 1))))


def put_tree(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES, leading: int = 0) -> Any:
    """``tree`` as global arrays laid out by ``rules`` on ``mesh`` (``leading`` axes
    replicated, as :func:`tree_shardings`); arrays already laid out so pass through."""
    return put_global(tree, tree_shardings(tree, mesh, rules, leading=leading))


def put_batch(batch: Mapping[str, Any], mesh: Mesh, leading: int = 0) -> dict[str, jax.Array]:
    """A host batch as global arrays, examples (axis ``leading``) split over (data, fsdp)."""
    return put_global(dict(batch), {k: batch_sharding(mesh, np.ndim(v), leading) for k, v in batch.items()})


def check_rows_fit(batch_size: int, mesh: Mesh, what: str) -> None:
    """ConfigError unless ``batch_size`` rows split evenly over the mesh's data axes."""
    ways = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if batch_size % ways:
        raise ConfigError(f"{what} = {batch_size} does not split over mesh data x fsdp = {ways} devices; "
                          f"use a multiple of {ways}")


def put_global(tree: Any, shardings: Any) -> Any:
    """Global arrays from host values that every process holds in full.

    Each process materialises only its addressable shards, so this is the one way arrays
    enter the mesh, single- or multi-host. Arrays already laid out by ``shardings`` pass
    through unchanged."""

    def one(x, sharding):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
            # same layout: relabel with the target sharding (no copy), so jitted steps see one
            # sharding type and compile once
            return x if x.sharding == sharding else jax.device_put(x, sharding)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree, shardings)


def to_host(tree: Any) -> Any:
    """Numpy copies of (possibly multi-host) global arrays, gathered on every process."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
