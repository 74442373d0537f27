"""The Llama-family NNX model and its loaders against transformers' PyTorch LlamaForCausalLM
and Qwen2ForCausalLM."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, assert_padding_either_side_matches_reference, save_tiny_hf, torch_logits

from jax_ensemble.errors import CheckpointError
from jax_ensemble.models import load_pretrained
from jax_ensemble.models.checkpoint_files import SafetensorsFiles
from jax_ensemble.models.llama.modeling import LlamaConfig
from jax_ensemble.models.llama.params import load_llama

pytest.importorskip("torch")

RNG = np.random.default_rng(0)
IDS = RNG.integers(0, TINY["vocab_size"], size=(2, 11)).astype(np.int32)


def test_logit_parity_untied(tiny_hf_dir):
    model, _ = load_pretrained(str(tiny_hf_dir))
    ours = np.asarray(model(jnp.asarray(IDS)))
    ref = torch_logits(tiny_hf_dir, IDS)
    assert np.abs(ours - ref).max() <= 1e-4


@pytest.mark.parametrize(
    "rope_scaling",
    [
        None,
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8},
    ],
)
def test_logit_parity_tied_with_rope_scaling(tmp_path, rope_scaling):
    directory = save_tiny_hf(tmp_path, tie=True, rope_scaling=rope_scaling, seed=1)
    model, _ = load_pretrained(str(directory))
    assert model.lm_head is None
    ours = np.asarray(model(jnp.asarray(IDS)))
    assert np.abs(ours - torch_logits(directory, IDS)).max() <= 1e-4


def test_padding_either_side_matches_reference(tiny_hf_dir):
    """Left and right padding: logits at real tokens equal the unpadded reference."""
    assert_padding_either_side_matches_reference(tiny_hf_dir, IDS[:1, :7])


@pytest.mark.parametrize(
    "model_type, tie, extra, biased",
    [
        ("qwen2", False, {}, ("q_proj", "k_proj", "v_proj")),
        ("qwen2", True, {}, ("q_proj", "k_proj", "v_proj")),
        ("llama", False, {"attention_bias": True, "mlp_bias": True},
         ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    ],
    ids=["qwen2-untied", "qwen2-tied", "llama-attention-and-mlp-bias"],
)
def test_logit_parity_with_projection_biases(tmp_path, model_type, tie, extra, biased):
    """Qwen2 (q/k/v biases, GQA) and Llama's attention_bias / mlp_bias: unpadded and
    left-padded logits equal transformers', and the int8 base stays within the bound below."""
    directory = save_tiny_hf(tmp_path, tie=tie, model_type=model_type, seed=3, **extra)
    model, _ = load_pretrained(str(directory))
    assert model.config.biased_projections == biased and (model.lm_head is None) == tie
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    ref = torch_logits(directory, IDS)
    assert np.abs(np.asarray(model(jnp.asarray(IDS))) - ref).max() <= 1e-4
    padded = np.concatenate([np.full((2, 3), 5, np.int32), IDS], axis=1)
    mask = np.concatenate([np.zeros((2, 3)), np.ones(IDS.shape)], axis=1).astype(np.int32)
    assert np.abs(np.asarray(model(jnp.asarray(padded), jnp.asarray(mask)))[:, 3:] - ref).max() <= 1e-4
    int8, _ = load_pretrained(str(directory), base_dtype="int8")
    assert np.abs(np.asarray(int8(jnp.asarray(IDS))) - ref).max() <= 0.03 * np.abs(ref).max()


def test_qwen2_sliding_window_is_a_clear_error(tmp_path):
    directory = save_tiny_hf(tmp_path, tie=True, model_type="qwen2")
    cfg = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**cfg, "use_sliding_window": True}))
    with pytest.raises(CheckpointError, match="sliding-window attention"):
        load_pretrained(str(directory))


def test_requested_positions_and_token_ids(tiny_hf_dir):
    """logit_positions / token_ids (K,) and (B, K) select exactly from the full logits."""
    model, _ = load_pretrained(str(tiny_hf_dir))
    full = torch_logits(tiny_hf_dir, IDS)
    pos = jnp.array([3, 10])
    shared = jnp.array([7, 1, 200])
    per_example = jnp.array([[4, 9], [100, 2]])
    got = np.asarray(model(jnp.asarray(IDS), logit_positions=pos, token_ids=shared))
    np.testing.assert_allclose(got, full[[0, 1], [3, 10]][:, [7, 1, 200]], atol=1e-4)
    got = np.asarray(model(jnp.asarray(IDS), logit_positions=pos[:, None], token_ids=per_example))
    want = np.stack([full[0, 3, [4, 9]], full[1, 10, [100, 2]]])[:, None]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_sharded_safetensors_index(tiny_hf_dir, tmp_path):
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    shutil.copy(tiny_hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    ours, _ = load_pretrained(str(tmp_path))
    assert np.abs(np.asarray(ours(jnp.asarray(IDS))) - torch_logits(tiny_hf_dir, IDS)).max() <= 1e-4


def test_gguf_loader_undoes_llama_cpp_permutation(tiny_hf_dir, tiny_gguf):
    model, tok = load_pretrained(str(tiny_gguf))
    ours = np.asarray(model(jnp.asarray(IDS)))
    assert np.abs(ours - torch_logits(tiny_hf_dir, IDS)).max() <= 1e-4
    assert tok.eos_id == 256 and tok.decode(tok.encode("hello there")) == "hello there"


def test_int8_and_bf16_bases_stay_close_to_f32(tiny_hf_dir):
    """Measured on this tiny model: int8 per-channel max |Δlogit| ≈ 1e-3 of the logit range."""
    f32, _ = load_pretrained(str(tiny_hf_dir))
    ref = np.asarray(f32(jnp.asarray(IDS)))
    scale = np.abs(ref).max()
    for dtype, rel_tol in [("int8", 0.03), ("bfloat16", 0.03)]:
        model, _ = load_pretrained(str(tiny_hf_dir), base_dtype=dtype)
        got = np.asarray(model(jnp.asarray(IDS)))
        assert np.abs(got - ref).max() <= rel_tol * scale, dtype


def test_shape_mismatch_is_a_clear_error(tiny_hf_dir, tmp_path):
    for f in tiny_hf_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"has shape .* config does not match"):
        load_pretrained(str(tmp_path))


def test_corrupt_and_truncated_files(tiny_hf_dir, tiny_gguf, tmp_path):
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_pretrained(str(truncated))
    garbage = tmp_path / "g.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError):
        load_pretrained(str(garbage))
    bad_dir = tmp_path / "hf"
    bad_dir.mkdir()
    for f in tiny_hf_dir.iterdir():
        shutil.copy(f, bad_dir / f.name)
    blob = (bad_dir / "model.safetensors").read_bytes()
    (bad_dir / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_pretrained(str(bad_dir))


def test_missing_tensor_is_a_clear_error(tiny_hf_dir):
    config = LlamaConfig.from_hf_config(json.loads((tiny_hf_dir / "config.json").read_text()))
    files = SafetensorsFiles(tiny_hf_dir)

    class WithoutNorm:
        def names(self):
            return files.names() - {"model.norm.weight"}

        def get(self, name):
            if name == "model.norm.weight":
                raise CheckpointError("checkpoint lacks the tensor 'model.norm.weight'")
            return files.get(name)

    with pytest.raises(CheckpointError, match="model.norm.weight"):
        load_llama(config, WithoutNorm())
