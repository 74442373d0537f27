"""The model families, and which one a checkpoint or a model belongs to.

A :class:`Family` is everything the rest of the package needs to know about one
architecture: the Hugging Face ``model_type`` values (and GGUF ``general.architecture``)
it loads, how to read its config and weights, how its modules are named in Hugging Face
(for PEFT export), and the PEFT layout of its linear layers. Adding a family is adding
its folder and one entry to :data:`FAMILIES` (docs/design.md, *Where to add things*).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from flax import nnx

from jax_ensemble.errors import CheckpointError, ConfigError
from jax_ensemble.models.checkpoint_map import ModuleNamer
from jax_ensemble.models.decoder import CausalLM, DecoderConfig
from jax_ensemble.models.gpt2 import modeling as gpt2
from jax_ensemble.models.gpt2.params import hf_module_name as gpt2_module_name
from jax_ensemble.models.gpt2.params import load_gpt2
from jax_ensemble.models.llama import modeling as llama
from jax_ensemble.models.llama.params import hf_module_name as llama_module_name
from jax_ensemble.models.llama.params import load_llama


@dataclasses.dataclass(frozen=True)
class Family:
    """One architecture family.

    ``load(config, source, base_dtype=..., compute_dtype=..., sharding=None)`` builds the
    model from a tensor source (its variables laid out by a ``checkpoint_map.LeafSharding``
    when given); ``config_from_gguf(metadata, hf_tensor_names)`` is None where the
    family has no GGUF reader; ``peft_fan_in_fan_out``: PEFT's flag for base layers that
    store their weight (in, out) (GPT-2's ``Conv1D``)."""

    name: str
    model_class: type[CausalLM]
    model_types: tuple[str, ...]
    config_from_hf: Callable[[dict[str, Any]], DecoderConfig]
    load: Callable[..., CausalLM]
    hf_module_name: ModuleNamer
    peft_fan_in_fan_out: bool
    gguf_architecture: str | None = None
    config_from_gguf: Callable[[dict[str, Any], set[str]], DecoderConfig] | None = None


FAMILIES: tuple[Family, ...] = (
    Family(
        name="llama",
        model_class=llama.LlamaForCausalLM,
        model_types=llama.MODEL_TYPES,
        config_from_hf=llama.LlamaConfig.from_hf_config,
        load=load_llama,
        hf_module_name=llama_module_name,
        peft_fan_in_fan_out=False,
        gguf_architecture="llama",
        config_from_gguf=llama.LlamaConfig.from_gguf_metadata,
    ),
    Family(
        name="gpt2",
        model_class=gpt2.GPT2LMHeadModel,
        model_types=gpt2.MODEL_TYPES,
        config_from_hf=gpt2.GPT2Config.from_hf_config,
        load=load_gpt2,
        hf_module_name=gpt2_module_name,
        peft_fan_in_fan_out=True,
    ),
)


def _supported() -> str:
    return "; ".join(f"{f.name} family: {', '.join(f.model_types)}" for f in FAMILIES)


def family_for_model_type(model_type: Any, where: str) -> Family:
    """The family loading Hugging Face ``model_type`` (read from ``where``)."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise CheckpointError(f"model_type {model_type!r} in {where} is not supported ({_supported()})")


def family_for_gguf(architecture: Any, where: str) -> Family:
    """The family reading GGUF files of ``general.architecture`` (read from ``where``)."""
    for family in FAMILIES:
        if family.gguf_architecture is not None and architecture == family.gguf_architecture:
            return family
    readable = ", ".join(repr(f.gguf_architecture) for f in FAMILIES if f.gguf_architecture)
    raise CheckpointError(f"GGUF architecture {architecture!r} of {where} is not supported (only {readable})")


def family_of(model: nnx.Module) -> Family:
    """The family of a built model."""
    for family in FAMILIES:
        if isinstance(model, family.model_class):
            return family
    raise ConfigError(f"{type(model).__name__} is not a model of a known family ({', '.join(f.name for f in FAMILIES)})")
