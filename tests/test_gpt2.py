"""The GPT-2 NNX model and its loader against transformers' PyTorch GPT2LMHeadModel, LoRA on
its Conv1D layers, and the whole method (``jax-ensemble run`` and ``uq``) on a tiny random
GPT-2 checkpoint written by the test."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_GPT2, assert_padding_either_side_matches_reference, save_tiny_gpt2, torch_logits
from flax import nnx
from jax.sharding import PartitionSpec as P
from test_affinity_stage import write_four_task_suite
from test_cli import assert_one_line_error, cli

from jax_ensemble.cli import main
from jax_ensemble.errors import CheckpointError, ConfigError
from jax_ensemble.models import GPT2LMHeadModel, load_pretrained
from jax_ensemble.models.layers import QuantizedWeight
from jax_ensemble.models.lora import LoRAConfig, apply_lora, split_lora
from jax_ensemble.training.mesh import make_mesh, partition_spec
from jax_ensemble.training.settings import MeshConfig

pytest.importorskip("torch")

IDS = np.random.default_rng(0).integers(0, TINY_GPT2["vocab_size"], size=(2, 11)).astype(np.int32)
TARGETS = r".*\.(c_attn|c_proj|c_fc)"


def test_logit_parity_tied_head(tiny_gpt2_dir):
    model, tokenizer = load_pretrained(str(tiny_gpt2_dir))
    assert isinstance(model, GPT2LMHeadModel) and model.lm_head is None
    ref = torch_logits(tiny_gpt2_dir, IDS)
    assert np.abs(ref).max() > 1.0  # logits far from zero: the comparison means something
    assert np.abs(np.asarray(model(jnp.asarray(IDS))) - ref).max() <= 1e-4
    assert tokenizer.eos_id == 256 and tokenizer.decode(tokenizer.encode("hello there")) == "hello there"


@pytest.mark.parametrize(
    "extra",
    [{"tie_word_embeddings": False}, {"activation_function": "gelu"}, {"scale_attn_weights": False}],
    ids=["untied", "exact-gelu", "unscaled-attention"],
)
def test_logit_parity_config_variants(tmp_path, extra):
    directory = save_tiny_gpt2(tmp_path, seed=1, **extra)
    model, _ = load_pretrained(str(directory))
    assert (model.lm_head is None) == extra.get("tie_word_embeddings", True)
    assert np.abs(np.asarray(model(jnp.asarray(IDS))) - torch_logits(directory, IDS)).max() <= 1e-4


def test_bare_gpt2model_checkpoint_without_prefix(tiny_gpt2_dir, tmp_path):
    """The original ``gpt2`` weights were saved from GPT2Model: no ``transformer.`` prefix."""
    import torch
    import transformers

    full = transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir, dtype=torch.float32)
    full.transformer.save_pretrained(tmp_path, safe_serialization=True)
    shutil.copy(tiny_gpt2_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "numpy") as f:
        assert "h.0.attn.c_attn.weight" in f.keys() and not any(k.startswith("transformer.") for k in f.keys())
    model, _ = load_pretrained(str(tmp_path))
    assert np.abs(np.asarray(model(jnp.asarray(IDS))) - torch_logits(tiny_gpt2_dir, IDS)).max() <= 1e-4


def test_padding_either_side_matches_reference(tiny_gpt2_dir):
    """Left and right padding: logits at real tokens equal the unpadded reference."""
    assert_padding_either_side_matches_reference(tiny_gpt2_dir, IDS[:1, :7])


def test_requested_positions_and_token_ids(tiny_gpt2_dir):
    """logit_positions / token_ids (K,) and (B, K) select exactly from the full logits."""
    model, _ = load_pretrained(str(tiny_gpt2_dir))
    full = torch_logits(tiny_gpt2_dir, IDS)
    pos = jnp.array([3, 10])
    got = np.asarray(model(jnp.asarray(IDS), logit_positions=pos, token_ids=jnp.array([7, 1, 200])))
    np.testing.assert_allclose(got, full[[0, 1], [3, 10]][:, [7, 1, 200]], atol=1e-4)
    got = np.asarray(model(jnp.asarray(IDS), logit_positions=pos[:, None], token_ids=jnp.array([[4, 9], [100, 2]])))
    want = np.stack([full[0, 3, [4, 9]], full[1, 10, [100, 2]]])[:, None]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_int8_and_bf16_bases_stay_close_to_f32(tiny_gpt2_dir):
    """The Llama tests' bound (3% of the logit range); int8 holds every kernel and both
    embedding tables, biases and LayerNorms stay float32."""
    f32, _ = load_pretrained(str(tiny_gpt2_dir))
    ref = np.asarray(f32(jnp.asarray(IDS)))
    models = {dtype: load_pretrained(str(tiny_gpt2_dir), base_dtype=dtype)[0] for dtype in ("int8", "bfloat16")}
    for dtype, model in models.items():
        got = np.asarray(model(jnp.asarray(IDS)))
        assert np.abs(got - ref).max() <= 0.03 * np.abs(ref).max(), dtype
    flat = dict(nnx.to_flat_state(nnx.state(models["int8"])))
    for path, var in flat.items():
        if path[-1] in ("kernel", "embedding"):
            assert isinstance(var, QuantizedWeight) and var[...].dtype == jnp.int8, path
        elif path[-1] in ("bias", "weight"):
            assert var[...].dtype == jnp.float32, path
    assert flat[("layers", "attn", "c_attn", "scale")][...].shape == (2, 3 * 64)
    assert flat[("wpe", "scale")][...].shape == (TINY_GPT2["n_positions"],)


def test_lora_on_conv1d_layers_and_sharding_rules(tiny_gpt2_dir):
    model, _ = load_pretrained(str(tiny_gpt2_dir), base_dtype="int8")
    before = np.asarray(model(jnp.asarray(IDS)))
    targets = apply_lora(model, LoRAConfig(rank=2, alpha=8.0, target_modules=TARGETS), jax.random.key(0))
    assert targets == ["layers.attn.c_attn", "layers.attn.c_proj", "layers.mlp.c_fc", "layers.mlp.c_proj"]
    # B = 0: unchanged up to float rounding (the compiled layer body differs; measured 1.2e-6)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS))), before, rtol=0, atol=1e-5)
    _, lora, _ = split_lora(model)
    assert lora["layers"]["attn"]["c_attn"]["lora_b"][...].shape == (2, 2, 3 * 64)  # (L, r, 3D): fused q|k|v
    with pytest.raises(ConfigError, match="matches no module; modules are: layers.attn.c_attn"):
        apply_lora(model, LoRAConfig(), jax.random.key(0))  # the Llama default names q/k/v_proj
    mesh = make_mesh(MeshConfig())
    assert partition_spec("wte.embedding", (258, 64), mesh) == P("tensor", "fsdp")
    assert partition_spec("layers.mlp.c_fc.kernel", (2, 64, 96), mesh) == P(None, "fsdp", "tensor")


def test_unsupported_model_type_and_config_are_one_line_errors(tiny_gpt2_dir, tmp_path):
    for f in tiny_gpt2_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(CheckpointError, match=r"model_type 'bert' in .* is not supported \(llama family: llama"):
        load_pretrained(str(tmp_path))
    assert_one_line_error(cli("generate", "--model", str(tmp_path), "hi"), "model_type 'bert'")
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "scale_attn_by_inverse_layer_idx": True}))
    with pytest.raises(CheckpointError, match="scale_attn_by_inverse_layer_idx=true is not supported"):
        load_pretrained(str(tmp_path))


@pytest.mark.slow
def test_run_and_uq_end_to_end_on_a_tiny_gpt2(tiny_gpt2_dir, tmp_path, capsys):
    """The main job (gradients, affinity, SDP grouping, group / random / single adapters,
    ensemble with boosting, evaluation, report, PEFT export) and the UQ command, unchanged,
    on a GPT-2 checkpoint with LoRA on its Conv1D layers."""
    suite = write_four_task_suite(tmp_path)
    common = [
        f"model.source={tiny_gpt2_dir}", f"tasks.suite={suite}", f"lora.target_modules={TARGETS}",
        "lora.rank=2", "tasks.train_size=12", "tasks.validation_size=6", "tasks.test_size=6", "tasks.max_length=32",
        "gradients.dim=16", "gradients.batch_size=4", "affinity.num_subsets=6", "clustering.num_groups=2",
        "training.max_steps=2", "training.batch_size=4", "training.warmup_steps=0", "training.eval_every=2",
        "training.checkpoint_every=2", "ensemble.boosting_steps=1", "sanity_prompt=good",
    ]
    run_dir = tmp_path / "run"
    assert main(["run", f"run_dir={run_dir}", *common]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    model_summary = json.loads((run_dir / "model.json").read_text())
    assert model_summary["lora_targets"] == ["layers.attn.c_attn", "layers.attn.c_proj", "layers.mlp.c_fc",
                                             "layers.mlp.c_proj"]
    assert model_summary["lora_b0_max_abs_logit_change"] <= 1e-5
    assert sorted(metrics["tasks"]) == ["polar", "shape", "three", "tone"]
    assert sorted(sum(metrics["groups"], [])) == sorted(metrics["tasks"]) and len(metrics["groups"]) == 2
    for method in ("zero_shot", "single_adapter", "random_groups", "ensemble"):
        accuracies = metrics["per_task_accuracy"][method]
        assert set(accuracies) == set(metrics["tasks"]) and all(0 <= a <= 1 for a in accuracies.values()), method
    assert metrics["flops"]["ensemble_total"] > 0 and metrics["boosting_steps"] == 1
    assert (run_dir / "adapters" / "boost-0" / "checkpoints").is_dir()
    # the exported group adapter loads with PEFT on transformers' GPT-2 and changes its logits
    import peft
    import torch
    import transformers

    exported = run_dir / "peft" / "group-0"
    config = json.loads((exported / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    assert config["r"] == 2
    base = transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(torch.tensor(IDS)).logits.numpy()
        adapted = peft.PeftModel.from_pretrained(base, exported).eval()
        assert np.abs(adapted(torch.tensor(IDS)).logits.numpy() - base_logits).max() > 0
    capsys.readouterr()

    polar, three = str(tmp_path / "polar.yaml"), str(tmp_path / "three.yaml")
    assert main(["uq", "--json", f"run_dir={tmp_path / 'uq'}", *common, f"uq.in_distribution=[{polar}]",
                 f"uq.out_of_distribution=[{three}]", "uq.members=2"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert set(results) >= {"single", "ensemble", "mc_dropout"}
    assert all(np.isfinite(results[m]["nll"]) and 0.0 <= results[m]["ood_auroc"] <= 1.0 for m in results)
