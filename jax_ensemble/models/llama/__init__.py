"""The Llama family (Llama 2/3, SmolLM, Mistral-style): NNX modeling and the checkpoint key map."""

from jax_ensemble.models.llama.modeling import LlamaConfig, LlamaForCausalLM

__all__ = ["LlamaConfig", "LlamaForCausalLM"]
