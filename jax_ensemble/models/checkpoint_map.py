"""Fill an abstract NNX model from checkpoint tensors, given a family's name map.

Every variable of the model is read from one Hugging Face tensor: ``<hf module>.bias``
for a ``bias`` leaf, ``<hf module>.weight`` for any other (kernel, embedding, norm
weight), where the family's ``hf_module_name(module_path, layer)`` names the module
(e.g. ``('layers', 'self_attn', 'q_proj')``, 3 → ``model.layers.3.self_attn.q_proj``).
Variables under ``layers`` are stacked over the decoder layers (leading axis L), read
layer by layer. The family says which kernels the checkpoint stores transposed
((out, in), as ``nn.Linear`` does). In an int8 model each kernel or embedding is
quantized as it is read (never holding the float32 model), filling both its int8 values
and its ``scale``.

Given a :data:`LeafSharding` (a mesh's partition rules), every variable is instead built
as a global array in its sharding: each process reads only the block of each tensor its
devices hold (whole along a kernel's input axis, which its scales reduce over), and no
device or host ever holds the whole model; the values equal the plain load's exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Protocol, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_ensemble.errors import CheckpointError
from jax_ensemble.models.quantization import quantize_int8

ModuleNamer = Callable[[tuple[str, ...], int | None], str]
"""(NNX module path, layer index or None) → Hugging Face module name."""

LeafSharding = Callable[[str, tuple[int, ...]], jax.sharding.Sharding]
"""(dotted variable name such as ``layers.self_attn.q_proj.kernel``, its global shape) →
the sharding it is loaded into (``jax_ensemble.training.mesh.leaf_sharding`` builds one
from a mesh and the partition rules)."""

Model = TypeVar("Model", bound=nnx.Module)

Index = tuple[slice, ...]
"""One contiguous ``slice`` per dimension."""


class TensorSource(Protocol):
    """A checkpoint's tensors by Hugging Face name (float32 numpy, HF layout).

    ``get_slice(name, index)`` reads only the block ``index`` (the sharded load)."""

    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> np.ndarray: ...

    def get_slice(self, name: str, index: Index) -> np.ndarray: ...


def stacked(module_path: tuple[str, ...]) -> bool:
    """Whether a module lives in the stacked decoder layers (a leading (L, …) axis)."""
    return module_path[0] == "layers"


def hf_param_name(hf_module: str, leaf: str) -> str:
    """``q_proj`` module + ``bias`` leaf → ``q_proj.bias``; any other leaf → ``.weight``."""
    return f"{hf_module}.{'bias' if leaf == 'bias' else 'weight'}"


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One variable read from the checkpoint (a ``scale`` is filled with its kernel).

    ``shape``: one layer's tensor in the model layout (kernels (in, out)); ``reduce_axis``:
    the axis of ``shape`` a quantization scale reduces over (the input axis of a kernel,
    the hidden axis of an embedding)."""

    path: tuple[str, ...]
    dtype: np.dtype
    shape: tuple[int, ...]
    quantized: bool
    transpose: bool
    reduce_axis: int
    in_layers: bool

    @property
    def scale_path(self) -> tuple[str, ...]:
        return self.path[:-1] + ("scale",)

    def hf_name(self, hf_module_name: ModuleNamer, layer: int | None) -> str:
        return hf_param_name(hf_module_name(self.path[:-1], layer), self.path[-1])

    def layers(self, num_layers: int) -> list[int | None]:
        return list(range(num_layers)) if self.in_layers else [None]


def _leaves(flat: dict[tuple, nnx.Variable], transposed: Callable[[tuple[str, ...]], bool]) -> list[_Leaf]:
    """The variables of a flat abstract state to read, scales aside."""
    out = []
    for path, var in flat.items():
        module, leaf = path[:-1], path[-1]
        if leaf == "scale":
            continue
        in_layers = stacked(module)
        out.append(_Leaf(
            path=path, dtype=var.dtype, shape=tuple(var.shape[1:] if in_layers else var.shape),
            quantized=leaf in ("kernel", "embedding") and module + ("scale",) in flat,
            transpose=leaf == "kernel" and transposed(module),
            reduce_axis=0 if leaf == "kernel" else 1,  # one scale per output channel / per embedding row
            in_layers=in_layers,
        ))
    return out


def _check_shape(name: str, found: tuple[int, ...], shape: tuple[int, ...], transpose: bool) -> None:
    """CheckpointError unless tensor ``name`` of shape ``found`` is ``shape`` (transposed)."""
    expected = tuple(reversed(shape)) if transpose else shape
    if tuple(found) != expected:
        raise CheckpointError(
            f"checkpoint tensor {name!r} has shape {tuple(found)} but the model config expects "
            f"{expected}: the config does not match the weights"
        )


def _read(source: TensorSource, name: str, shape: tuple[int, ...], transpose: bool) -> np.ndarray:
    w = source.get(name)
    _check_shape(name, w.shape, shape, transpose)
    return w.T if transpose else w


def fill_from_checkpoint(
    abstract: Model,
    source: TensorSource,
    *,
    hf_module_name: ModuleNamer,
    transposed: Callable[[tuple[str, ...]], bool],
    num_layers: int,
    sharding: LeafSharding | None = None,
) -> Model:
    """The model ``abstract`` (from ``nnx.eval_shape``) holding the checkpoint's weights.

    ``transposed(module_path)``: whether that module's kernel is stored (out, in). Without
    ``sharding`` every variable is one array on the default device; with it, each is a
    global array laid out by ``sharding(name, shape)`` and built from the blocks this
    process's devices hold (:func:`_sharded_leaf`), with the same values."""
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    values: dict[tuple, jax.Array] = {}
    for leaf in _leaves(flat, transposed):
        names = [leaf.hf_name(hf_module_name, layer) for layer in leaf.layers(num_layers)]
        if sharding is not None:
            values.update(_sharded_leaf(leaf, source, names, sharding))
            continue
        parts, scales = [], []
        for name in names:
            w = _read(source, name, leaf.shape, leaf.transpose)
            if leaf.quantized:
                w, s = quantize_int8(w, leaf.reduce_axis)
                scales.append(s)
            parts.append(w.astype(leaf.dtype))
        values[leaf.path] = jnp.asarray(np.stack(parts) if leaf.in_layers else parts[0])
        if leaf.quantized:
            values[leaf.scale_path] = jnp.asarray(np.stack(scales) if leaf.in_layers else scales[0])
        del parts
    leaves = [(path, var.replace(values[path])) for path, var in flat.items()]
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


CHUNK_BYTES = 64 * 2**20
"""The sharded load reads and quantizes a tensor in blocks of at most this many float32
bytes (whole along the reduced axis: at least one output channel or embedding row)."""


@dataclasses.dataclass(frozen=True)
class _Target:
    """One output array of a leaf (its values, or its int8 scales) under its sharding.

    ``blocks``: addressable device → (the layers its shard holds, its per-layer block as a
    box in the tensor's dimensions); ``dropped_axis``: the tensor axis this array lacks
    (a scale's reduced axis; None for the values)."""

    path: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: np.dtype
    sharding: jax.sharding.Sharding
    blocks: dict[jax.Device, tuple[range, Index]]
    dropped_axis: int | None
    in_layers: bool

    def _drop(self, index: tuple) -> tuple:
        axis = self.dropped_axis
        return index if axis is None else index[:axis] + index[axis + 1:]

    def part(self, array: np.ndarray, cut: Index, chunk: Index) -> np.ndarray:
        """The tensor block ``cut`` of ``array`` (this target's values over the block
        ``chunk``), with a leading layer axis of 1 for a stacked leaf."""
        part = array[self._drop(tuple(slice(c.start - r.start, c.stop - r.start) for c, r in zip(cut, chunk)))]
        return np.ascontiguousarray(part[None] if self.in_layers else part)

    def offset(self, cut: Index, box: Index, layer: int) -> tuple[int, ...]:
        """Where the tensor block ``cut`` of a device's block ``box`` of ``layer`` (its
        position in the shard's layers) starts in the device's shard."""
        within = self._drop(tuple(c.start - b.start for c, b in zip(cut, box)))
        return ((layer,) if self.in_layers else ()) + within


def _target(path: tuple[str, ...], leaf: _Leaf, num_layers: int, sharding: LeafSharding,
            dropped_axis: int | None = None) -> _Target:
    per_layer = tuple(n for i, n in enumerate(leaf.shape) if i != dropped_axis)
    shape = ((num_layers,) if leaf.in_layers else ()) + per_layer
    placed = sharding(".".join(map(str, path)), shape)
    blocks = {}
    for device, index in placed.addressable_devices_indices_map(shape).items():
        bounds = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))
        layers = range(bounds[0].start, bounds[0].stop) if leaf.in_layers else range(1)
        box = bounds[1:] if leaf.in_layers else bounds
        if dropped_axis is not None:
            box = box[:dropped_axis] + (slice(0, leaf.shape[dropped_axis]),) + box[dropped_axis:]
        blocks[device] = (layers, box)
    dtype = np.dtype(np.float32) if dropped_axis is not None else leaf.dtype
    return _Target(path, shape, dtype, placed, blocks, dropped_axis, leaf.in_layers)


def _chunks(region: Index, leaf: _Leaf) -> list[Index]:
    """``region`` of a 2-D tensor cut along its non-reduced axis into blocks of at most
    :data:`CHUNK_BYTES` float32 bytes (at least one line); other tensors whole."""
    if len(leaf.shape) != 2:
        return [region]
    axis = 1 - leaf.reduce_axis
    span = region[axis]
    step = max(1, CHUNK_BYTES // (4 * (region[leaf.reduce_axis].stop - region[leaf.reduce_axis].start)))
    return [tuple(slice(i, min(i + step, span.stop)) if a == axis else r for a, r in enumerate(region))
            for i in range(span.start, span.stop, step)]


def _intersection(a: Index, b: Index) -> Index | None:
    cut = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b))
    return None if any(c.start >= c.stop for c in cut) else cut


@functools.partial(jax.jit, donate_argnums=0)
def _put_block(shard: jax.Array, part: jax.Array, offset: tuple[jax.Array, ...]) -> jax.Array:
    """``shard`` with ``part`` written at ``offset``, in place."""
    return jax.lax.dynamic_update_slice(shard, part, offset)


def _sharded_leaf(leaf: _Leaf, source: TensorSource, names: list[str],
                  sharding: LeafSharding) -> dict[tuple, jax.Array]:
    """The leaf (and its scales) as global arrays laid out by ``sharding``.

    Each device's shard is allocated on it, then filled in place. Layer by layer
    (``names[layer]``), this process reads the bounding box of its devices' blocks of
    the tensor, whole along ``reduce_axis`` for an int8 leaf (an output channel's scale
    is the max over the whole input axis, so q and scale equal the plain load's), in
    chunks (:func:`_chunks`); it quantizes each chunk and writes each device's part of
    it into that device's shard. The host holds one chunk (float32), one temporary and
    its int8 copy at a time; a device, its shards of this leaf and one part."""
    targets = [_target(leaf.path, leaf, len(names), sharding)]
    if leaf.quantized:
        targets.append(_target(leaf.scale_path, leaf, len(names), sharding, dropped_axis=leaf.reduce_axis))
    shards = [{d: jnp.zeros(t.sharding.shard_shape(t.shape), t.dtype, device=d) for d in t.blocks} for t in targets]
    for layer, name in enumerate(names):
        held = [(k, device, layers, box) for k, t in enumerate(targets)
                for device, (layers, box) in t.blocks.items() if layer in layers]
        region = tuple(
            slice(0, n) if leaf.quantized and axis == leaf.reduce_axis
            else slice(min(box[axis].start for *_, box in held), max(box[axis].stop for *_, box in held))
            for axis, n in enumerate(leaf.shape)
        )
        _check_shape(name, source.shape(name), leaf.shape, leaf.transpose)
        for chunk in _chunks(region, leaf):
            block = source.get_slice(name, chunk[::-1] if leaf.transpose else chunk)
            block = block.T if leaf.transpose else block
            arrays = quantize_int8(block, leaf.reduce_axis) if leaf.quantized else (block.astype(leaf.dtype),)
            del block
            for k, device, layers, box in held:
                cut = _intersection(box, chunk)
                if cut is not None:
                    part = jax.device_put(targets[k].part(arrays[k], cut, chunk), device)
                    offset = targets[k].offset(cut, box, layer - layers.start)
                    shards[k][device] = _put_block(shards[k][device], part, offset)
            del arrays
    return {t.path: jax.make_array_from_single_device_arrays(t.shape, t.sharding, [by_device[d] for d in t.blocks])
            for t, by_device in zip(targets, shards)}
