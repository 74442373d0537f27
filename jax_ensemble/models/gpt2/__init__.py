"""The GPT-2 family (GPT-2, DistilGPT-2): NNX modeling and the checkpoint key map."""

from jax_ensemble.models.gpt2.modeling import GPT2Config, GPT2LMHeadModel

__all__ = ["GPT2Config", "GPT2LMHeadModel"]
