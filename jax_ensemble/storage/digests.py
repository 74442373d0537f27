"""Content digests that key cached stages and verify written files.

A stage's output directory is ``<run_dir>/<stage>/<digest of what determines it>``, so a
changed setting gets a new directory and an unchanged one is reused; each stage writes
its files atomically (:mod:`jax_ensemble.storage.atomic`) and its summary file last, so a
directory holding that file is complete.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np


def sha256_hex(data: bytes) -> str:
    """The sha256 of ``data`` as 64 hex digits."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's bytes (read in 1 MiB blocks) as 64 hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest(obj: Any) -> str:
    """16 hex digits of the sha256 of ``obj`` as sorted-key JSON: a stable key of settings."""
    return sha256_hex(json.dumps(obj, sort_keys=True).encode())[:16]


def arrays_digest(arrays: Mapping[str, Any]) -> str:
    """16 hex digits of the sha256 of named arrays (``{name: array-like}``, e.g. a flattened
    pytree or a table): every name, dtype, shape and byte enters, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(np.asarray(arrays[name]))
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def stage_dir(run_dir: str | Path, stage: str, key: Any) -> Path:
    """``<run_dir>/<stage>/<digest(key)>``: where a cached stage keyed by ``key`` writes."""
    return Path(run_dir) / stage / digest(key)
