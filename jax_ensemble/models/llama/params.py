"""Fill an NNX Llama model from checkpoint tensors named as in Hugging Face.

Each model variable maps to a Hugging Face tensor name: ``embed_tokens.embedding`` ←
``model.embed_tokens.weight``; ``layers.<module>.kernel`` ← ``model.layers.{i}.<module>.weight``
transposed to (in, out) and stacked over layers i (``.bias`` likewise, for the biased
projections of Qwen2 or ``attention_bias``/``mlp_bias``); ``layers.<norm>.weight`` ←
``model.layers.{i}.<norm>.weight``; ``norm.weight`` ← ``model.norm.weight``;
``lm_head.kernel`` ← ``lm_head.weight`` transposed. The reading itself (shape checks,
stacking, int8 quantization as it reads) is :mod:`jax_ensemble.models.checkpoint_map`.
"""

from __future__ import annotations

from flax import nnx

from jax_ensemble.models.checkpoint_map import LeafSharding, TensorSource, fill_from_checkpoint
from jax_ensemble.models.llama.modeling import LlamaConfig, LlamaForCausalLM


def hf_module_name(module_path: tuple[str, ...], layer: int | None) -> str:
    """NNX module path (e.g. ``('layers', 'self_attn', 'q_proj')``) → HF module name
    (``model.layers.{layer}.self_attn.q_proj``)."""
    if module_path[0] == "lm_head":
        return "lm_head"
    if module_path[0] == "layers":
        return f"model.layers.{layer}.{'.'.join(module_path[1:])}"
    return f"model.{'.'.join(module_path)}"


def load_llama(
    config: LlamaConfig,
    source: TensorSource,
    *,
    base_dtype: str = "float32",
    compute_dtype: str = "float32",
    sharding: LeafSharding | None = None,
) -> LlamaForCausalLM:
    """Build a :class:`LlamaForCausalLM` holding the checkpoint's weights (every HF kernel
    is an ``nn.Linear`` weight, (out, in): all are transposed), laid out by ``sharding``
    when given."""
    abstract = nnx.eval_shape(
        lambda: LlamaForCausalLM(config, base_dtype=base_dtype, compute_dtype=compute_dtype, rngs=nnx.Rngs(0))
    )
    return fill_from_checkpoint(
        abstract, source, hf_module_name=hf_module_name, transposed=lambda _: True,
        num_layers=config.num_hidden_layers, sharding=sharding,
    )
