"""Export LoRA adapters in PEFT's format, loadable by PEFT or vLLM on the Hugging Face model.

``adapter_model.safetensors`` holds, per adapted module and layer,
``base_model.model.<hf module>.lora_A.weight`` (r, in) = Aᵀ and ``…lora_B.weight``
(out, r) = Bᵀ, where ``<hf module>`` is the Hugging Face name
(``model.layers.3.self_attn.q_proj``); ``adapter_config.json`` records r, alpha, dropout
and the target module names. PEFT's LoRA computes ``x Wᵀ + (alpha/r) x A_peftᵀ B_peftᵀ``,
which equals our ``x W + (alpha/r) x A B``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import nnx

from jax_ensemble.errors import ConfigError
from jax_ensemble.models.llama.params import hf_module_name
from jax_ensemble.models.lora import linear_modules
from jax_ensemble.storage.atomic import atomic_write_bytes


def peft_tensors(model: nnx.Module) -> tuple[dict[str, np.ndarray], dict]:
    """(PEFT tensor name → float32 array, adapter_config mapping) for ``model``'s LoRA."""
    tensors: dict[str, np.ndarray] = {}
    names, rank, scaling, dropout = set(), None, None, None
    for dotted, layer in linear_modules(model).items():
        if layer.lora_a is None:
            continue
        path = tuple(dotted.split("."))
        a, b = np.asarray(layer.lora_a[...], np.float32), np.asarray(layer.lora_b[...], np.float32)
        stacked = path[0] == "layers"
        for index in range(a.shape[0]) if stacked else [None]:
            prefix = "base_model.model." + hf_module_name(path, index)
            a_i, b_i = (a[index], b[index]) if stacked else (a, b)
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a_i.T)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b_i.T)
        names.add(path[-1])
        rank, scaling, dropout = a.shape[-1], layer.lora_scaling, layer.lora_dropout
    if not tensors:
        raise ConfigError("the model has no LoRA adapter to export (apply_lora first)")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(rank),
        "lora_alpha": float(scaling * rank),
        "lora_dropout": float(dropout),
        "target_modules": sorted(names),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }
    return tensors, config


def export_peft_adapter(model: nnx.Module, directory: str | Path, *, base_model_name_or_path: str = "") -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``directory``
    (each file atomically; the config is written last, so a directory with a config is complete)."""
    from safetensors.numpy import save

    tensors, config = peft_tensors(model)
    config["base_model_name_or_path"] = base_model_name_or_path
    directory = Path(directory)
    atomic_write_bytes(directory / "adapter_model.safetensors", save(tensors))
    atomic_write_bytes(directory / "adapter_config.json", (json.dumps(config, indent=2) + "\n").encode())
    return directory
