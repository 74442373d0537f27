"""Which implementation a kernel call runs: ``xla``, ``pallas`` (compiled) or Pallas interpreted.

``resolve_kernels(choice)`` maps the config's ``model.kernels`` (``auto | xla | pallas``) to
``"xla"`` or ``"pallas"``: ``auto`` is Pallas on GPU and TPU and XLA on CPU, where Pallas only
runs interpreted (slow; what the tests use). ``interpret()`` says whether a Pallas call on the
default backend must be interpreted.
"""

from __future__ import annotations

import jax

from jax_ensemble.errors import ConfigError

KERNEL_CHOICES = ("auto", "xla", "pallas")


def platform() -> str:
    """The default backend's platform: ``cpu``, ``gpu`` or ``tpu``."""
    name = jax.default_backend()
    return "gpu" if name in ("cuda", "rocm", "gpu") else name


def resolve_kernels(choice: str) -> str:
    """``auto | xla | pallas`` → ``xla`` or ``pallas`` for the default backend."""
    if choice not in KERNEL_CHOICES:
        raise ConfigError(f"model.kernels must be one of {', '.join(KERNEL_CHOICES)}; got {choice!r}")
    if choice == "auto":
        return "pallas" if platform() in ("gpu", "tpu") else "xla"
    return choice


def interpret() -> bool:
    """Pallas runs interpreted on CPU (no Pallas compiler there), compiled on GPU/TPU."""
    return platform() not in ("gpu", "tpu")
