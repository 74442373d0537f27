"""PEFT export: PEFT itself loads the adapter on transformers' model and gives our logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY
from flax import nnx

from jax_ensemble.config import LoRAConfig
from jax_ensemble.errors import ConfigError
from jax_ensemble.models import load_pretrained
from jax_ensemble.models.lora import apply_lora, linear_modules
from jax_ensemble.models.peft_export import export_peft_adapter

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


def test_peft_loads_our_adapter_with_equal_logits(tiny_hf_dir, tmp_path):
    import transformers

    model, _ = load_pretrained(str(tiny_hf_dir))
    apply_lora(model, LoRAConfig(rank=3, alpha=12.0, target_modules=r".*\.(q_proj|v_proj|down_proj)"), jax.random.key(0))
    for i, layer in enumerate(m for m in linear_modules(model).values() if m.lora_b is not None):
        layer.lora_b = nnx.LoRAParam(0.05 * jax.random.normal(jax.random.key(i + 1), layer.lora_b[...].shape))
    ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 9)).astype(np.int32)
    ours = np.asarray(model(jnp.asarray(ids)))
    export_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tiny_hf_dir))

    base = transformers.LlamaForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(torch.tensor(ids)).logits.numpy()
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        ref = adapted(torch.tensor(ids)).logits.numpy()
    assert np.abs(ref - base_logits).max() > 1e-2  # the adapter really changes the model
    assert np.abs(ours - ref).max() <= 1e-4


def test_export_without_lora_is_a_clear_error(tiny_hf_dir, tmp_path):
    model, _ = load_pretrained(str(tiny_hf_dir))
    with pytest.raises(ConfigError, match="no LoRA adapter"):
        export_peft_adapter(model, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()
