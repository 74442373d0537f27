"""Atomic writes: a file appears complete or not at all (write to a temp file, then rename).

Verified files (:func:`write_verified`) carry a sha256 marker ``<file>.sha256`` written
after them, and :func:`read_verified` trusts a file only when its bytes match the marker:
a missing marker (a kill between the two writes) or a mismatch (a truncated or altered
file) reads as absent, so the stage that owns the file computes it again.

In a multi-process run only process 0 writes (:mod:`jax_ensemble.storage.processes`):
the writers here return without writing on the other processes, and
:func:`read_verified_shared` gives every process what process 0 read.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from jax_ensemble.storage.digests import sha256_hex
from jax_ensemble.storage.processes import broadcast_bytes, is_writer

log = logging.getLogger(__name__)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file and a rename (on the writer process only)."""
    path = Path(path)
    if not is_writer():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def marker_path(path: str | Path) -> Path:
    """``<path>.sha256``: the checksum marker beside a verified file."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def write_verified(path: str | Path, data: bytes) -> Path:
    """Write ``data`` atomically, then its sha256 marker (:func:`marker_path`)."""
    atomic_write_bytes(path, data)
    atomic_write_bytes(marker_path(path), (sha256_hex(data) + "\n").encode())
    return Path(path)


def read_verified(path: str | Path) -> bytes | None:
    """The bytes of ``path`` when they match its marker; None when the file or its marker is
    missing, or (with one warning line) when they differ: the caller recomputes the file."""
    path, marker = Path(path), marker_path(path)
    if not (path.is_file() and marker.is_file()):
        return None
    data = path.read_bytes()
    if sha256_hex(data) != marker.read_text().strip():
        log.warning("%s is corrupt (it does not match %s): computing it again", path, marker.name)
        return None
    return data


def read_verified_shared(path: str | Path) -> bytes | None:
    """:func:`read_verified` on process 0, its result on every process (a collective in a
    multi-process run: every process calls it at the same point)."""
    return broadcast_bytes(read_verified(path) if is_writer() else None)


def write_verified_json(path: str | Path, obj: Any) -> Path:
    """:func:`write_verified` of ``obj`` as indented, sorted-key JSON."""
    return write_verified(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_verified_json(path: str | Path) -> Any | None:
    """The JSON value of a verified file, or None as :func:`read_verified`."""
    data = read_verified(path)
    return None if data is None else json.loads(data)
