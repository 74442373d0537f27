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
"""

from __future__ import annotations

from typing import Callable, Protocol, TypeVar

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_ensemble.errors import CheckpointError
from jax_ensemble.models.quantization import quantize_int8

ModuleNamer = Callable[[tuple[str, ...], int | None], str]
"""(NNX module path, layer index or None) → Hugging Face module name."""

Model = TypeVar("Model", bound=nnx.Module)


class TensorSource(Protocol):
    """A checkpoint's tensors by Hugging Face name (float32 numpy, HF layout)."""

    def names(self) -> set[str]: ...

    def get(self, name: str) -> np.ndarray: ...


def stacked(module_path: tuple[str, ...]) -> bool:
    """Whether a module lives in the stacked decoder layers (a leading (L, …) axis)."""
    return module_path[0] == "layers"


def hf_param_name(hf_module: str, leaf: str) -> str:
    """``q_proj`` module + ``bias`` leaf → ``q_proj.bias``; any other leaf → ``.weight``."""
    return f"{hf_module}.{'bias' if leaf == 'bias' else 'weight'}"


def _read(source: TensorSource, name: str, shape: tuple[int, ...], transpose: bool) -> np.ndarray:
    w = source.get(name)
    if transpose:
        w = w.T
    if w.shape != shape:
        raise CheckpointError(
            f"checkpoint tensor {name!r} has shape {tuple(w.shape)} but the model config expects "
            f"{tuple(reversed(shape)) if transpose else shape}: the config does not match the weights"
        )
    return w


def fill_from_checkpoint(
    abstract: Model,
    source: TensorSource,
    *,
    hf_module_name: ModuleNamer,
    transposed: Callable[[tuple[str, ...]], bool],
    num_layers: int,
) -> Model:
    """The model ``abstract`` (from ``nnx.eval_shape``) holding the checkpoint's weights.

    ``transposed(module_path)``: whether that module's kernel is stored (out, in)."""
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    values: dict[tuple, jnp.ndarray] = {}
    for path, var in flat.items():
        module, leaf = path[:-1], path[-1]
        if leaf == "scale":
            continue
        quantized = leaf in ("kernel", "embedding") and module + ("scale",) in flat
        transpose = leaf == "kernel" and transposed(module)
        reduce_axis = 0 if leaf == "kernel" else 1  # one scale per output channel / per embedding row
        in_layers = stacked(module)
        shape = tuple(var.shape[1:] if in_layers else var.shape)
        parts, scales = [], []
        for layer in range(num_layers) if in_layers else [None]:
            w = _read(source, hf_param_name(hf_module_name(module, layer), leaf), shape, transpose)
            if quantized:
                w, s = quantize_int8(w, reduce_axis)
                scales.append(s)
            parts.append(w.astype(var.dtype))
        values[path] = jnp.asarray(np.stack(parts) if in_layers else parts[0])
        if quantized:
            values[module + ("scale",)] = jnp.asarray(np.stack(scales) if in_layers else scales[0])
        del parts
    leaves = [(path, var.replace(values[path])) for path, var in flat.items()]
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))
