"""PEFT export: PEFT itself loads the adapter on transformers' model and gives our logits
(Llama, GPT-2 with its Conv1D layers, Qwen2 with biased projections)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, save_tiny_hf
from flax import nnx

from jax_ensemble.config import LoRAConfig
from jax_ensemble.errors import ConfigError
from jax_ensemble.models import load_pretrained
from jax_ensemble.models.lora import apply_lora, linear_modules
from jax_ensemble.models.peft_export import export_peft_adapter

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


def _round_trip(directory, target_modules: str, out):
    """Our logits with a random (B ≠ 0) adapter on ``target_modules``; the adapter exported
    and loaded by PEFT on transformers' model: (ours, PEFT's, the base model's logits, the
    PEFT model, the exported adapter_config)."""
    import transformers

    model, _ = load_pretrained(str(directory))
    apply_lora(model, LoRAConfig(rank=3, alpha=12.0, target_modules=target_modules), jax.random.key(0))
    for i, layer in enumerate(m for m in linear_modules(model).values() if m.lora_b is not None):
        layer.lora_b = nnx.LoRAParam(0.05 * jax.random.normal(jax.random.key(i + 1), layer.lora_b[...].shape))
    ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 9)).astype(np.int32)
    ours = np.asarray(model(jnp.asarray(ids)))
    export_peft_adapter(model, out, base_model_name_or_path=str(directory))

    base = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(torch.tensor(ids)).logits.numpy()
    adapted = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        ref = adapted(torch.tensor(ids)).logits.numpy()
    return ours, ref, base_logits, adapted, json.loads((out / "adapter_config.json").read_text())


def _adapted_modules(peft_model) -> set[str]:
    return {name.removeprefix("base_model.model.") for name, m in peft_model.named_modules() if hasattr(m, "lora_A")}


def test_peft_loads_our_adapter_with_equal_logits(tiny_hf_dir, tmp_path):
    ours, ref, base_logits, _, config = _round_trip(tiny_hf_dir, r".*\.(q_proj|v_proj|down_proj)", tmp_path / "a")
    assert np.abs(ref - base_logits).max() > 1e-2  # the adapter really changes the model
    assert np.abs(ours - ref).max() <= 1e-4
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"] and config["fan_in_fan_out"] is False


def test_peft_round_trip_on_gpt2_conv1d_layers(tiny_gpt2_dir, tmp_path):
    """fan_in_fan_out, GPT-2 module names, and an attention-only c_proj exported so that
    PEFT leaves its namesake in the MLP without LoRA."""
    targets = r".*\.(c_attn|c_fc)|layers\.attn\.c_proj"
    ours, ref, base_logits, adapted, config = _round_trip(tiny_gpt2_dir, targets, tmp_path / "a")
    assert np.abs(ref - base_logits).max() > 1e-2
    assert np.abs(ours - ref).max() <= 1e-4
    assert config["fan_in_fan_out"] is True and config["target_modules"] == ["attn.c_proj", "c_attn", "c_fc"]
    assert _adapted_modules(adapted) == {f"transformer.h.{i}.{m}" for i in range(2)
                                         for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc")}


def test_peft_round_trip_on_qwen2_biased_projections(tmp_path):
    directory = save_tiny_hf(tmp_path / "qwen2", tie=True, model_type="qwen2", seed=2)
    ours, ref, base_logits, adapted, _ = _round_trip(directory, r".*\.(q_proj|k_proj|v_proj|o_proj)", tmp_path / "a")
    assert np.abs(ref - base_logits).max() > 1e-2
    assert np.abs(ours - ref).max() <= 1e-4
    assert len(_adapted_modules(adapted)) == 4 * TINY["num_hidden_layers"]


def test_export_without_lora_is_a_clear_error(tiny_hf_dir, tmp_path):
    model, _ = load_pretrained(str(tiny_hf_dir))
    with pytest.raises(ConfigError, match="no LoRA adapter"):
        export_peft_adapter(model, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()
