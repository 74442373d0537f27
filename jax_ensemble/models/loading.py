"""``load_pretrained(spec)``: model source → (NNX model, tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

from jax_ensemble.errors import CheckpointError
from jax_ensemble.kernels.backend import resolve_kernels
from jax_ensemble.models.checkpoint_files import GGUFFile, SafetensorsFiles
from jax_ensemble.models.layers import select_kernels
from jax_ensemble.models.llama.modeling import LlamaConfig, LlamaForCausalLM
from jax_ensemble.models.llama.params import load_llama
from jax_ensemble.models.sources import resolve_model_files
from jax_ensemble.models.tokenizer import Tokenizer, tokenizer_from_gguf, tokenizer_from_json


def load_pretrained(
    spec: str, *, base_dtype: str = "float32", compute_dtype: str = "float32", kernels: str = "auto"
) -> tuple[LlamaForCausalLM, Tokenizer]:
    """Resolve ``spec`` (registry name, local path or hub id) and load model + tokenizer.

    ``base_dtype``: ``int8`` | ``bfloat16`` | ``float32`` storage of the frozen weights;
    ``kernels``: ``auto`` | ``xla`` | ``pallas`` (``model.kernels``).
    """
    path = resolve_model_files(spec)
    if path.suffix == ".gguf":
        files = GGUFFile(path)
        config = LlamaConfig.from_gguf_metadata(files.metadata, files.names())
        tokenizer = tokenizer_from_gguf(files.metadata)
    else:
        config_file = Path(path) / "config.json"
        try:
            hf_config = json.loads(config_file.read_text())
        except ValueError as e:
            raise CheckpointError(f"{config_file} is not valid JSON: {e}") from None
        config = LlamaConfig.from_hf_config(hf_config)
        files = SafetensorsFiles(path)
        tokenizer_file = Path(path) / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise CheckpointError(f"model directory {path} has no tokenizer.json")
        tokenizer = tokenizer_from_json(tokenizer_file, hf_config=hf_config)
    model = load_llama(config, files, base_dtype=base_dtype, compute_dtype=compute_dtype)
    select_kernels(model, resolve_kernels(kernels, "matmul"))
    return model, tokenizer
