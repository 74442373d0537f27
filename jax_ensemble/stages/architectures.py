"""Architectures without weights: a model source's family and config, read from its
``config.json`` or GGUF metadata, or from the registry of known public architectures.

:func:`architecture_of` is what the capacity planner (:mod:`jax_ensemble.stages.plan`)
builds its abstract model from, so it never downloads or reads a weight. A source is
looked up, in order, in :data:`KNOWN_ARCHITECTURES` (registry names and Hugging Face hub
ids whose ``config.json`` fields are copied here), as a local directory with a
``config.json`` (no safetensors needed), or as a local ``.gguf`` file (metadata only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jax_ensemble.errors import CheckpointError, ConfigError
from jax_ensemble.models.checkpoint_files import GGUFFile
from jax_ensemble.models.decoder import DecoderConfig
from jax_ensemble.models.families import Family, family_for_gguf, family_for_model_type

_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}

KNOWN_ARCHITECTURES: dict[str, dict[str, Any]] = {
    # HuggingFaceTB/SmolLM2-135M-Instruct config.json (the registry's GGUF has the same numbers;
    # tests/test_plan.py compares them with the file's metadata where it is cached)
    "smollm2-135m": {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
                     "tie_word_embeddings": True},
    # meta-llama/Llama-3.1-8B config.json
    "meta-llama/Llama-3.1-8B": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
                                "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                                "num_key_value_heads": 8, "max_position_embeddings": 131072,
                                "rope_theta": 500000.0, "rope_scaling": _LLAMA31_ROPE, "rms_norm_eps": 1e-5,
                                "tie_word_embeddings": False},
    # codellama/CodeLlama-34b-hf config.json: 48 layers, grouped-query attention with 8 KV heads
    "codellama/CodeLlama-34b-hf": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 8192,
                                   "intermediate_size": 22016, "num_hidden_layers": 48, "num_attention_heads": 64,
                                   "num_key_value_heads": 8, "max_position_embeddings": 16384,
                                   "rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
}
"""Source name → the ``config.json`` fields the families read (copied from the public files)."""


def architecture_of(source: str) -> tuple[Family, DecoderConfig]:
    """(family, architecture config) of ``model.source`` without reading any weight
    (see module doc); ConfigError naming the source when none of the three ways applies."""
    if source in KNOWN_ARCHITECTURES:
        fields = KNOWN_ARCHITECTURES[source]
        family = family_for_model_type(fields["model_type"], f"the known architecture {source!r}")
        return family, family.config_from_hf(fields)
    path = Path(source).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        try:
            fields = json.loads((path / "config.json").read_text())
        except ValueError as e:
            raise CheckpointError(f"{path / 'config.json'} is not valid JSON: {e}") from None
        family = family_for_model_type(fields.get("model_type"), str(path / "config.json"))
        return family, family.config_from_hf(fields)
    ggufs = [path] if path.is_file() and path.suffix == ".gguf" else sorted(path.glob("*.gguf")) if path.is_dir() else []
    if len(ggufs) == 1:
        files = GGUFFile(ggufs[0])
        family = family_for_gguf(files.metadata.get("general.architecture"), str(ggufs[0]))
        if family.config_from_gguf is None:
            raise CheckpointError(f"the {family.name} family has no GGUF reader ({ggufs[0]})")
        return family, family.config_from_gguf(files.metadata, files.names())
    raise ConfigError(f"model.source {source!r}: its architecture is not known without downloading; give a local "
                      f"directory with its config.json (no weights needed), a .gguf file, or one of "
                      f"{', '.join(sorted(KNOWN_ARCHITECTURES))}")
