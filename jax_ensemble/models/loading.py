"""``load_pretrained(spec)``: model source → (NNX model, tokenizer), in the checkpoint's family."""

from __future__ import annotations

import json
from pathlib import Path

from jax_ensemble.errors import CheckpointError
from jax_ensemble.kernels.backend import resolve_kernels
from jax_ensemble.models.checkpoint_files import GGUFFile, SafetensorsFiles
from jax_ensemble.models.checkpoint_map import LeafSharding
from jax_ensemble.models.decoder import CausalLM
from jax_ensemble.models.families import family_for_gguf, family_for_model_type
from jax_ensemble.models.layers import select_kernels
from jax_ensemble.models.sources import resolve_model_files
from jax_ensemble.models.tokenizer import Tokenizer, tokenizer_from_gguf, tokenizer_from_json


def load_pretrained(
    spec: str, *, base_dtype: str = "float32", compute_dtype: str = "float32", kernels: str = "auto",
    sharding: LeafSharding | None = None,
) -> tuple[CausalLM, Tokenizer]:
    """Resolve ``spec`` (registry name, local path or hub id) and load model + tokenizer.

    The family comes from ``config.json``'s ``model_type`` (GGUF: ``general.architecture``).
    ``base_dtype``: ``int8`` | ``bfloat16`` | ``float32`` storage of the frozen weights;
    ``kernels``: ``auto`` | ``xla`` | ``pallas`` (``model.kernels``). Without ``sharding``
    every weight is one array on the default device; with it (name, shape → sharding, e.g.
    ``training.mesh.leaf_sharding(mesh)``) each is loaded straight into its sharding, each
    process reading only its devices' blocks (``checkpoint_map``), with the same values.
    """
    path = resolve_model_files(spec)
    if path.suffix == ".gguf":
        files = GGUFFile(path)
        family = family_for_gguf(files.metadata.get("general.architecture"), str(path))
        config = family.config_from_gguf(files.metadata, files.names())
        tokenizer = tokenizer_from_gguf(files.metadata)
    else:
        config_file = Path(path) / "config.json"
        try:
            hf_config = json.loads(config_file.read_text())
        except ValueError as e:
            raise CheckpointError(f"{config_file} is not valid JSON: {e}") from None
        family = family_for_model_type(hf_config.get("model_type"), str(config_file))
        config = family.config_from_hf(hf_config)
        files = SafetensorsFiles(path)
        tokenizer_file = Path(path) / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise CheckpointError(f"model directory {path} has no tokenizer.json")
        tokenizer = tokenizer_from_json(tokenizer_file, hf_config=hf_config)
    model = family.load(config, files, base_dtype=base_dtype, compute_dtype=compute_dtype, sharding=sharding)
    select_kernels(model, resolve_kernels(kernels, "matmul"))
    return model, tokenizer
