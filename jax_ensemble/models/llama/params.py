"""Fill an NNX Llama model from checkpoint tensors named as in Hugging Face.

Each model variable maps to a Hugging Face tensor name: ``embed_tokens.embedding`` ←
``model.embed_tokens.weight``; ``layers.<module>.kernel`` ← ``model.layers.{i}.<module>.weight``
transposed to (in, out) and stacked over layers i; ``layers.<norm>.weight`` ←
``model.layers.{i}.<norm>.weight``; ``norm.weight`` ← ``model.norm.weight``;
``lm_head.kernel`` ← ``lm_head.weight`` transposed. In an int8 model each kernel is
quantized layer by layer as it is read (never holding the float32 model), filling both
its int8 values and its ``scale``.
"""

from __future__ import annotations

from typing import Protocol

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_ensemble.errors import CheckpointError
from jax_ensemble.models.llama.modeling import LlamaConfig, LlamaForCausalLM
from jax_ensemble.models.quantization import quantize_int8


class TensorSource(Protocol):
    def names(self) -> set[str]: ...

    def get(self, name: str) -> np.ndarray: ...


def hf_tensor_name(module_path: tuple[str, ...], layer: int | None) -> str:
    """NNX module path (e.g. ``('layers', 'self_attn', 'q_proj')``) → HF weight name."""
    dotted = ".".join(module_path)
    if module_path[0] == "lm_head":
        return "lm_head.weight"
    if module_path[0] == "layers":
        return f"model.layers.{layer}.{'.'.join(module_path[1:])}.weight"
    return f"model.{dotted}.weight"


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


def load_llama(
    config: LlamaConfig,
    source: TensorSource,
    *,
    base_dtype: str = "float32",
    compute_dtype: str = "float32",
) -> LlamaForCausalLM:
    """Build a :class:`LlamaForCausalLM` holding the checkpoint's weights."""
    abstract = nnx.eval_shape(
        lambda: LlamaForCausalLM(config, base_dtype=base_dtype, compute_dtype=compute_dtype, rngs=nnx.Rngs(0))
    )
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    values: dict[tuple, jnp.ndarray] = {}
    for path, var in flat.items():
        module, leaf = path[:-1], path[-1]
        if leaf == "scale":
            continue
        quantized = module + ("scale",) in flat
        transpose = leaf == "kernel"
        reduce_axis = 0 if transpose else 1
        stacked = module[0] == "layers"
        layers = range(config.num_hidden_layers) if stacked else [None]
        shape = tuple(var.shape[1:] if stacked else var.shape)
        parts, scales = [], []
        for layer in layers:
            w = _read(source, hf_tensor_name(module, layer), shape, transpose)
            if quantized:
                w, s = quantize_int8(w, reduce_axis)
                scales.append(s)
            parts.append(w.astype(var.dtype))
        values[path] = jnp.asarray(np.stack(parts) if stacked else parts[0])
        if quantized:
            values[module + ("scale",)] = jnp.asarray(np.stack(scales) if stacked else scales[0])
        del parts
    leaves = [(path, var.replace(values[path])) for path, var in flat.items()]
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))
