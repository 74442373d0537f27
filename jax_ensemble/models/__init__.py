"""Model families, checkpoint loading, tokenizers and model sources."""

from jax_ensemble.models.gpt2.modeling import GPT2Config, GPT2LMHeadModel
from jax_ensemble.models.llama.modeling import LlamaConfig, LlamaForCausalLM
from jax_ensemble.models.loading import load_pretrained
from jax_ensemble.models.sources import REGISTRY, cache_dir, resolve_model_files
from jax_ensemble.models.tokenizer import Tokenizer

__all__ = [
    "GPT2Config",
    "GPT2LMHeadModel",
    "LlamaConfig",
    "LlamaForCausalLM",
    "REGISTRY",
    "Tokenizer",
    "cache_dir",
    "load_pretrained",
    "resolve_model_files",
]
