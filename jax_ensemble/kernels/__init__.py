"""Pallas kernels for the hot paths, each beside the plain-XLA reference it is tested against
(README.md in this folder: maths, tiling, backends, limits)."""

from jax_ensemble.kernels.int8_lora import int8_lora_matmul, int8_lora_matmul_reference
from jax_ensemble.kernels.multi_lora import multi_lora_matmul, multi_lora_matmul_reference
from jax_ensemble.kernels.projection import seeded_projection

__all__ = [
    "int8_lora_matmul",
    "int8_lora_matmul_reference",
    "multi_lora_matmul",
    "multi_lora_matmul_reference",
    "seeded_projection",
]
