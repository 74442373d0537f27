"""Export LoRA adapters in PEFT's format, loadable by PEFT or vLLM on the Hugging Face model.

``adapter_model.safetensors`` holds, per adapted module and layer,
``base_model.model.<hf module>.lora_A.weight`` (r, in) = Aᵀ and ``…lora_B.weight``
(out, r) = Bᵀ, where ``<hf module>`` is the Hugging Face name in the model's family
(``model.layers.3.self_attn.q_proj``, ``transformer.h.3.attn.c_attn``);
``adapter_config.json`` records r, alpha, dropout, the target module names and
``fan_in_fan_out`` (true for GPT-2, whose ``Conv1D`` base layers store (in, out)). PEFT's
LoRA computes ``(alpha/r) x A_peftᵀ B_peftᵀ`` on top of the base layer whatever its
layout, which equals our ``(alpha/r) x A B``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import nnx

from jax_ensemble.errors import ConfigError
from jax_ensemble.models.checkpoint_map import stacked
from jax_ensemble.models.families import family_of
from jax_ensemble.models.layers import Linear
from jax_ensemble.models.lora import linear_modules
from jax_ensemble.storage.atomic import atomic_write_bytes


def peft_target_modules(modules: dict[str, Linear]) -> list[str]:
    """PEFT ``target_modules`` for the adapted ones of ``modules`` (dotted path → Linear).

    A module is named by its last name (``q_proj``) when every module of that name is
    adapted, else by its path inside a layer (``attn.c_proj``), which PEFT matches as a
    suffix, so that an unadapted namesake (GPT-2's ``mlp.c_proj``) stays without LoRA."""
    adapted = {path for path, layer in modules.items() if layer.lora_a is not None}
    names = set()
    for path in adapted:
        last = path.rsplit(".", 1)[-1]
        namesakes = {p for p in modules if p.rsplit(".", 1)[-1] == last}
        names.add(last if namesakes <= adapted else path.removeprefix("layers."))
    return sorted(names)


def peft_tensors(model: nnx.Module) -> tuple[dict[str, np.ndarray], dict]:
    """(PEFT tensor name → float32 array, adapter_config mapping) for ``model``'s LoRA."""
    family = family_of(model)
    modules = linear_modules(model)
    tensors: dict[str, np.ndarray] = {}
    rank, scaling, dropout = None, None, None
    for dotted, layer in modules.items():
        if layer.lora_a is None:
            continue
        path = tuple(dotted.split("."))
        a, b = np.asarray(layer.lora_a[...], np.float32), np.asarray(layer.lora_b[...], np.float32)
        in_layers = stacked(path)
        for index in range(a.shape[0]) if in_layers else [None]:
            prefix = "base_model.model." + family.hf_module_name(path, index)
            a_i, b_i = (a[index], b[index]) if in_layers else (a, b)
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a_i.T)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b_i.T)
        rank, scaling, dropout = a.shape[-1], layer.lora_scaling, layer.lora_dropout
    if not tensors:
        raise ConfigError("the model has no LoRA adapter to export (apply_lora first)")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(rank),
        "lora_alpha": float(scaling * rank),
        "lora_dropout": float(dropout),
        "target_modules": peft_target_modules(modules),
        "bias": "none",
        "fan_in_fan_out": family.peft_fan_in_fan_out,
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
