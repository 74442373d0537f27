"""Which implementation a kernel call runs: ``xla``, ``pallas`` (compiled) or Pallas interpreted.

``resolve_kernels(choice, kernel)`` maps the config's ``model.kernels`` (``auto | xla |
pallas``) to ``"xla"`` or ``"pallas"`` for one kernel (``matmul``: the fused int8 + LoRA
matmul in every ``Linear``; ``projection``: the seeded projection). ``auto`` takes Pallas only
where it was measured faster than XLA (``AUTO_PALLAS``; ``benchmarks/RESULTS.md``): the
projection on GPU (1.5× on an H200). The matmul kernel was 0.67–0.84× XLA's speed there (with
2–4× smaller temporaries), and no TPU was measured, so ``auto`` keeps XLA for them; ``pallas``
forces every kernel. On CPU Pallas only runs interpreted (slow; what the tests use).
``interpret()`` says whether a Pallas call on the default backend must be interpreted.
"""

from __future__ import annotations

import jax

from jax_ensemble.errors import ConfigError

KERNEL_CHOICES = ("auto", "xla", "pallas")
AUTO_PALLAS = {"matmul": (), "projection": ("gpu",)}
"""Platforms where ``auto`` runs each kernel on Pallas (measured faster than XLA there)."""


def platform() -> str:
    """The default backend's platform: ``cpu``, ``gpu`` or ``tpu``."""
    name = jax.default_backend()
    return "gpu" if name in ("cuda", "rocm", "gpu") else name


def resolve_kernels(choice: str, kernel: str) -> str:
    """``auto | xla | pallas`` → ``xla`` or ``pallas`` for ``kernel`` (a key of ``AUTO_PALLAS``)
    on the default backend."""
    if choice not in KERNEL_CHOICES:
        raise ConfigError(f"model.kernels must be one of {', '.join(KERNEL_CHOICES)}; got {choice!r}")
    if choice == "auto":
        return "pallas" if platform() in AUTO_PALLAS[kernel] else "xla"
    return choice


def interpret() -> bool:
    """Pallas runs interpreted on CPU (no Pallas compiler there), compiled on GPU/TPU."""
    return platform() not in ("gpu", "tpu")
