"""Shared fixtures: tiny random models written by transformers (safetensors: Llama, Qwen2,
GPT-2), and the Llama as GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

TINY = dict(
    vocab_size=258,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    bos_token_id=256,
    eos_token_id=256,
)

TINY_GPT2 = dict(
    vocab_size=258,
    n_embd=64,
    n_layer=2,
    n_head=4,
    n_inner=96,
    n_positions=128,
    bos_token_id=256,
    eos_token_id=256,
    initializer_range=0.1,  # larger than GPT-2's 0.02, so attention is far from uniform
)


def byte_level_vocab() -> tuple[list[str], list[str]]:
    """256 byte-level symbols, one merged token and an end-of-text control token."""
    from tokenizers import pre_tokenizers

    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    return tokens + ["<|endoftext|>", "Ġt"], ["Ġ t"]


def save_tiny_hf(
    directory: Path, *, tie: bool, rope_scaling: dict | None = None, seed: int = 0, model_type: str = "llama", **extra
) -> Path:
    """Save a random tiny Llama-family model (``model_type`` llama, qwen2, ...; ``extra``
    config keys such as ``attention_bias``) with transformers (safetensors) + a tokenizer.json."""
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model(
        model_type, **TINY, tie_word_embeddings=tie, rope_scaling=rope_scaling, **extra
    )
    return _save_random(config, directory, seed)


def save_tiny_gpt2(directory: Path, *, seed: int = 0, **extra) -> Path:
    """Save a random tiny GPT2LMHeadModel (tied head unless ``tie_word_embeddings=False``)."""
    transformers = pytest.importorskip("transformers")
    return _save_random(transformers.GPT2Config(**{**TINY_GPT2, **extra}), directory, seed)


def _save_random(config, directory: Path, seed: int) -> Path:
    """Build ``config``'s causal LM with random weights, give every 1-D parameter (norm
    weights and biases, which transformers initialises to 1 and 0) random values so a
    wrong layout is caught, and save it with a byte-level tokenizer.json."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(("weight" in name) + 0.1 * torch.randn_like(p))
    model.save_pretrained(directory, safe_serialization=True)
    tokens, merges = byte_level_vocab()
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split()) for m in merges]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.save(str(directory / "tokenizer.json"))
    return directory


def torch_logits(directory: Path, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    """Reference logits from transformers' PyTorch model of the checkpoint's model_type (float32)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = torch.tensor(input_ids)
    kwargs = {}
    if attention_mask is not None:
        mask = torch.tensor(attention_mask)
        kwargs = dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        return model(ids, **kwargs).logits.numpy()


def assert_padding_either_side_matches_reference(directory: Path, ids: np.ndarray) -> None:
    """Our model of ``directory`` on ``ids`` (1, T) padded with 4 tokens on the left, then on
    the right: logits at the real tokens equal transformers' unpadded logits within 1e-4, as
    do transformers' own left-padded ones (given the mask and positions that count real
    tokens)."""
    import jax.numpy as jnp

    from jax_ensemble.models import load_pretrained

    model, _ = load_pretrained(str(directory))
    t = ids.shape[1]
    ref = torch_logits(directory, ids)[0]
    pad = np.full((1, 4), 5, np.int32)
    left, right = np.concatenate([pad, ids], axis=1), np.concatenate([ids, pad], axis=1)
    mask_left = np.concatenate([np.zeros((1, 4)), np.ones((1, t))], axis=1).astype(np.int32)
    mask_right = mask_left[:, ::-1].copy()
    out_left = np.asarray(model(jnp.asarray(left), jnp.asarray(mask_left)))[0, 4:]
    out_right = np.asarray(model(jnp.asarray(right), jnp.asarray(mask_right)))[0, :t]
    assert np.abs(out_left - ref).max() <= 1e-4
    assert np.abs(out_right - ref).max() <= 1e-4
    assert np.abs(torch_logits(directory, left, mask_left)[0, 4:] - ref).max() <= 1e-4


def llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert script's Q/K row order (interleaved RoPE pairs), written from its docs."""
    rows = w.shape[0]
    return w.reshape(num_heads, 2, rows // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(hf_dir: Path, path: Path) -> Path:
    """Convert the tiny HF checkpoint to GGUF (f32 tensors) the way llama.cpp does."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    tensors = load_file(str(hf_dir / "model.safetensors"))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_freq_base(TINY["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    tokens, merges = byte_level_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(256)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(cfg["num_hidden_layers"]):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf_name, w in tensors.items():
        w = w.astype(np.float32)
        if hf_name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, cfg["num_attention_heads"])
        elif hf_name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, cfg["num_key_value_heads"])
        writer.add_tensor(names[hf_name], w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    return save_tiny_hf(tmp_path_factory.mktemp("tiny_hf"), tie=False)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def tiny_gguf(tiny_hf_dir, tmp_path_factory) -> Path:
    return write_tiny_gguf(tiny_hf_dir, tmp_path_factory.mktemp("tiny_gguf") / "tiny.gguf")
