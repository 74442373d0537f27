"""The linearization-error study on a tiny transformers-written Llama and two local tasks:
the weight distance against a dense dequantized computation, the errors against f and
f_lin recomputed from the returned adapter-free definition, and the CLI's JSON."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from test_gradient_stage import write_suite

from jax_ensemble.cli import main
from jax_ensemble.config import LoRAConfig, config_from_dict
from jax_ensemble.linearization_study import lora_weight_distance
from jax_ensemble.lora import apply_lora, split_lora
from jax_ensemble.models.llama import LlamaConfig, LlamaForCausalLM
from jax_ensemble.quantization import dequantize_int8


def test_weight_distance_matches_dense_delta():
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    model = LlamaForCausalLM(cfg, base_dtype="int8", rngs=nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=2, alpha=6.0, target_modules=r".*\.(q_proj|v_proj)"), jax.random.key(0))
    for name in ("q_proj", "v_proj"):
        layer = getattr(model.layers.self_attn, name)
        layer.lora_b = nnx.LoRAParam(jax.random.normal(jax.random.key(len(name)), layer.lora_b[...].shape))
    _, lora, base = split_lora(model)
    delta_sq = base_sq = 0.0
    for name in ("q_proj", "v_proj"):
        layer = getattr(model.layers.self_attn, name)
        a, b = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])
        w0 = np.asarray(dequantize_int8(layer.kernel[...], layer.scale[...], reduce_axis=1))
        for i in range(cfg.num_hidden_layers):
            delta_sq += np.sum((3.0 * a[i] @ b[i]) ** 2)
            base_sq += np.sum(w0[i] ** 2)
    np.testing.assert_allclose(lora_weight_distance(lora, base, 3.0), np.sqrt(delta_sq / base_sq), rtol=1e-5)


def test_study_cli_json(tiny_hf_dir, tmp_path, capsys):
    suite = write_suite(tmp_path)
    overrides = [
        f"run_dir={tmp_path / 'run'}", f"model.source={tiny_hf_dir}", "lora.rank=2", "lora.alpha=8.0",
        f"tasks.suite={suite}", "tasks.train_size=12", "tasks.validation_size=6", "tasks.test_size=4",
        "tasks.max_length=32", "training.batch_size=4", "training.learning_rate=0.01", "training.warmup_steps=0",
        "linearization.tasks=[]", "linearization.steps=[1,0]", "linearization.ranks=[2]",
    ]
    assert main(["linearization-error", "--json", *overrides]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["default_training_steps"] == 6  # ceil(1 epoch · 24 rows / 4)
    settings = result["settings"]
    assert [(s["rank"], s["steps"], s["is_default_training_length"]) for s in settings] == [(2, 1, False), (2, 6, True)]
    for s in settings:
        for key in ("weight_distance", "relative_output_error", "relative_squared_error", "accuracy_f",
                    "accuracy_f_lin"):
            assert np.isfinite(s[key]), key
        assert s["validation_examples"] == 12 and s["weight_distance"] > 0
    short, full = settings
    assert full["weight_distance"] > short["weight_distance"]
    assert (tmp_path / "run" / "linearization_error.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "run" / "linearization_error.json").read_text()) == result
    assert main(["linearization-error", "linearization.steps=[]"]) == 2
