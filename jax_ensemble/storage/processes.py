"""One writer in a multi-process run: which process writes, and process 0's values on all.

In a multi-host job (one process per host, joined by ``jax.distributed``) every process runs
the same stages: the network passes are SPMD programs over the global mesh, so each
process must take the same branch (compute or read from the cache) at every step. The rule:

- process 0 is the **writer**: it alone writes files (:mod:`jax_ensemble.storage.atomic`
  skips writes elsewhere) and decides from what it reads whether a cached result exists;
- host-side work that is not a collective (the affinity solves, the SDP, the ensemble-weight
  fit) runs on process 0 and its result is broadcast (:func:`on_writer`);
- a cached result process 0 reads is broadcast as bytes (:func:`broadcast_bytes`), so other
  hosts need no shared filesystem for caches (orbax checkpoints still do).

With one process every function here is the identity / a plain call.
"""

from __future__ import annotations

import io
import json
from typing import Any, Callable

import jax
import numpy as np

from jax_ensemble import errors


def process_count() -> int:
    """Processes in the run (1 unless ``jax.distributed`` joined several; starts no backend)."""
    return jax.process_count() if jax.distributed.is_initialized() else 1


def is_writer() -> bool:
    """True on the process that writes files: process 0, or the only one."""
    return process_count() == 1 or jax.process_index() == 0


def broadcast_bytes(data: bytes | None) -> bytes | None:
    """Process 0's ``data`` (bytes or None) on every process; others pass anything (ignored)."""
    if process_count() == 1:
        return data
    from jax.experimental import multihost_utils

    writer = is_writer()
    size = int(multihost_utils.broadcast_one_to_all(np.int32(-1 if data is None else len(data)) if writer
                                                    else np.int32(0)))
    if size <= 0:
        return None if size < 0 else b""
    buffer = np.frombuffer(data, np.uint8) if writer else np.zeros(size, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes()


def _computed_on_writer(compute: Callable[[], bytes]) -> bytes:
    """``compute()``'s bytes from process 0 on every process. When it raises on process 0,
    every process raises: process 0 its own exception, the others a JaxEnsembleError of the
    same class (RuntimeError for other exceptions) with its message, so no process waits
    for a value that never comes."""
    failure = None
    if is_writer():
        try:
            data = b"\x00" + compute()
        except Exception as e:
            failure = e
            data = b"\x01" + json.dumps([type(e).__name__, str(e)]).encode()
    shared = broadcast_bytes(data if is_writer() else None)
    if failure is not None:
        raise failure
    if shared[:1] == b"\x01":
        name, message = json.loads(shared[1:])
        cls = getattr(errors, name, None)
        raise (cls if isinstance(cls, type) and issubclass(cls, errors.JaxEnsembleError) else RuntimeError)(
            f"{message} (on process 0)" if cls is None else message)
    return shared[1:]


def on_writer(compute: Callable[[], Any]) -> Any:
    """``compute()`` run on process 0 only, its JSON-able result returned on every process
    (tuples come back as lists)."""
    if process_count() == 1:
        return compute()
    return json.loads(_computed_on_writer(lambda: json.dumps(compute()).encode()))


def on_writer_array(compute: Callable[[], np.ndarray]) -> np.ndarray:
    """:func:`on_writer` for one numpy array (bit-exact, any dtype and shape)."""
    if process_count() == 1:
        return np.asarray(compute())

    def encoded() -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(compute()), allow_pickle=False)
        return buffer.getvalue()

    return np.load(io.BytesIO(_computed_on_writer(encoded)), allow_pickle=False)


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (no-op with one process)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
