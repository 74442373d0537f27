"""JAX's persistent compilation cache under the project's cache, so that a second command,
or a resumed run, loads the XLA programs an earlier one compiled instead of compiling them
again (the model's forward, train and gradient programs take seconds each on a CPU).

The directory is ``<cache>/xla`` (:func:`jax_ensemble.storage.packages.cache_dir`), unless
the user set JAX's own ``JAX_COMPILATION_CACHE_DIR``, which wins;
``JAX_ENSEMBLE_COMPILATION_CACHE=0`` turns it off. JAX keys each entry by the program, its
shapes, the backend and the jax/jaxlib versions, so a cache is never used across them.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

from jax_ensemble.storage.packages import cache_dir

MIN_COMPILE_SECONDS = 0.5
"""Programs that compile faster than this are not worth a file (JAX's default is 1 s)."""

MAX_BYTES = 4 * 2**30
"""Size cap of the cache directory; JAX evicts the least recently used entries above it."""


def enable_compilation_cache(directory: str | Path | None = None, *,
                             min_compile_seconds: float = MIN_COMPILE_SECONDS) -> Path | None:
    """Point JAX's persistent compilation cache at ``directory`` (default ``<cache>/xla``),
    for programs taking at least ``min_compile_seconds`` to compile, at most
    :data:`MAX_BYTES` in all; returns the directory, or None when
    ``JAX_ENSEMBLE_COMPILATION_CACHE=0`` or JAX's own ``JAX_COMPILATION_CACHE_DIR`` is in
    charge. Call it before the first compilation of the process."""
    if os.environ.get("JAX_ENSEMBLE_COMPILATION_CACHE", "1") == "0" or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    path = Path(directory) if directory is not None else cache_dir() / "xla"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path
