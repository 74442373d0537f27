"""Fill an NNX GPT-2 model from checkpoint tensors named as in Hugging Face.

``wte.embedding`` ← ``transformer.wte.weight``, ``wpe.embedding`` ← ``transformer.wpe.weight``;
``layers.<module>.kernel`` / ``.bias`` ← ``transformer.h.{i}.<module>.weight`` / ``.bias``
stacked over blocks i, **not transposed** (``Conv1D`` stores (in, out)); LayerNorms
``layers.ln_1`` / ``ln_2`` / ``ln_f`` ← ``….weight`` / ``….bias``; a separate
``lm_head.kernel`` ← ``lm_head.weight`` transposed (an ``nn.Linear``). Checkpoints saved
from the bare ``GPT2Model`` (the original ``gpt2`` weights) name the same tensors without
the ``transformer.`` prefix; both are read. The causal-mask buffers some files carry
(``attn.bias``, ``attn.masked_bias``) are not weights and are ignored.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from jax_ensemble.models.checkpoint_map import Index, LeafSharding, TensorSource, fill_from_checkpoint
from jax_ensemble.models.gpt2.modeling import GPT2Config, GPT2LMHeadModel

_PREFIX = "transformer."


def hf_module_name(module_path: tuple[str, ...], layer: int | None) -> str:
    """NNX module path (e.g. ``('layers', 'attn', 'c_attn')``) → HF module name
    (``transformer.h.{layer}.attn.c_attn``), as in ``GPT2LMHeadModel``."""
    if module_path[0] == "lm_head":
        return "lm_head"
    if module_path[0] == "layers":
        return f"{_PREFIX}h.{layer}.{'.'.join(module_path[1:])}"
    return _PREFIX + ".".join(module_path)


class _Unprefixed:
    """A ``GPT2Model`` checkpoint read under ``GPT2LMHeadModel`` names."""

    def __init__(self, source: TensorSource):
        self._source = source

    def names(self) -> set[str]:
        return {name if name.startswith("lm_head.") else _PREFIX + name for name in self._source.names()}

    def shape(self, name: str) -> tuple[int, ...]:
        return self._source.shape(name.removeprefix(_PREFIX))

    def get(self, name: str) -> np.ndarray:
        return self._source.get(name.removeprefix(_PREFIX))

    def get_slice(self, name: str, index: Index) -> np.ndarray:
        return self._source.get_slice(name.removeprefix(_PREFIX), index)


def load_gpt2(
    config: GPT2Config,
    source: TensorSource,
    *,
    base_dtype: str = "float32",
    compute_dtype: str = "float32",
    sharding: LeafSharding | None = None,
) -> GPT2LMHeadModel:
    """Build a :class:`GPT2LMHeadModel` holding the checkpoint's weights, laid out by
    ``sharding`` when given."""
    if not any(name.startswith(_PREFIX) for name in source.names()):
        source = _Unprefixed(source)
    abstract = nnx.eval_shape(
        lambda: GPT2LMHeadModel(config, base_dtype=base_dtype, compute_dtype=compute_dtype, rngs=nnx.Rngs(0))
    )
    return fill_from_checkpoint(
        abstract,
        source,
        hf_module_name=hf_module_name,
        transposed=lambda module: module[0] == "lm_head",
        num_layers=config.num_hidden_layers,
        sharding=sharding,
    )
