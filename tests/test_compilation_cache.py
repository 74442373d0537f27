"""The persistent compilation cache: a program compiled by one process is written under the
cache directory and loaded, not recompiled, by the next (JAX reports the hit)."""

from __future__ import annotations

import os
import subprocess
import sys

PROGRAM = """
import logging, sys
import jax, jax.numpy as jnp
from jax_ensemble.storage.compilation_cache import enable_compilation_cache
print("directory", enable_compilation_cache(sys.argv[1], min_compile_seconds=0.0))
logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="%(message)s")
f = jax.jit(lambda x: (x @ x.T).sum())
print("value", float(f(jnp.ones((8, 8)))))
"""


def _run(directory, **env):
    return subprocess.run([sys.executable, "-c", PROGRAM, str(directory)], capture_output=True, text=True,
                          env={k: v for k, v in {**os.environ, **env}.items() if k != "JAX_COMPILATION_CACHE_DIR"},
                          timeout=300, check=True).stdout


def test_a_second_process_loads_the_compiled_program(tmp_path):
    first = _run(tmp_path / "xla")
    assert f"directory {tmp_path / 'xla'}" in first and "value 512.0" in first
    entries = [p.name for p in (tmp_path / "xla").iterdir() if "jit__lambda" in p.name]
    assert entries, sorted(p.name for p in (tmp_path / "xla").iterdir())
    second = _run(tmp_path / "xla")
    assert "Persistent compilation cache hit for 'jit__lambda" in second, second[-2000:]
    assert "Persistent compilation cache hit" not in first


def test_switched_off_by_the_environment(tmp_path):
    out = _run(tmp_path / "xla", JAX_ENSEMBLE_COMPILATION_CACHE="0")
    assert "directory None" in out and not (tmp_path / "xla").exists()
