"""Logits computed once: the label logits of adapters over a table, kept on disk.

Weight fitting, boosting and evaluation each need the logits of the same adapters over the
validation, training and test rows; a resumed or repeated run needs them again. A
:class:`LogitCache` keeps each result as ``<directory>/<kind>-<digest>.npy`` (verified by a
sha256 marker, :func:`jax_ensemble.storage.atomic.write_verified`), keyed by everything that
determines it: the cache's ``identity`` (base model, LoRA layout, batch size), the kind of
call, the adapters' values (every leaf, byte for byte, plus e.g. ensemble weights) and every
column of the table. Equal keys therefore mean equal inputs, and a hit returns the very
array the computation produced: a run that reads the cache prints the same numbers.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np

from jax_ensemble.data.tables import Table
from jax_ensemble.storage.atomic import read_verified_shared, write_verified
from jax_ensemble.storage.digests import arrays_digest, digest


@dataclasses.dataclass(frozen=True)
class LogitCache:
    """Logits on disk under ``directory``, keyed by ``identity`` (JSON-able settings that
    fix the network: base model, LoRA layout, evaluation batch size) and the call's inputs."""

    directory: Path
    identity: Mapping[str, Any]

    def key(self, kind: str, adapters: Any, table: Table) -> str:
        """The digest of (identity, ``kind``, every leaf of ``adapters``, every table column)."""
        leaves = {jax.tree_util.keystr(path): leaf
                  for path, leaf in jax.tree_util.tree_flatten_with_path(adapters)[0]}
        return digest({"identity": self.identity, "kind": kind, "adapters": arrays_digest(leaves),
                       "table": arrays_digest(table)})

    def get(self, kind: str, adapters: Any, table: Table, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """``compute()``'s array for these inputs: read back when a verified copy exists,
        else computed and written (in a multi-process run, process 0's copy on every process)."""
        path = Path(self.directory) / f"{kind}-{self.key(kind, adapters, table)}.npy"
        data = read_verified_shared(path)
        if data is not None:
            return np.load(io.BytesIO(data))
        out = np.asarray(compute())
        buffer = io.BytesIO()
        np.save(buffer, out)
        write_verified(path, buffer.getvalue())
        return out


def cached(cache: LogitCache | None, kind: str, adapters: Any, table: Table,
           compute: Callable[[], np.ndarray]) -> np.ndarray:
    """:meth:`LogitCache.get`, or plain ``compute()`` without a cache."""
    return compute() if cache is None else cache.get(kind, adapters, table, compute)
