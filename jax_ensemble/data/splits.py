"""Deterministic stratified train / validation / test splits.

Every example is given a key: its class-relative quantile ``(r + 0.5) / n_c``, where ``r``
is its rank in a seeded shuffle of its class ``c`` (``n_c`` examples). Sorting by that key
(ties by class index) interleaves the classes evenly, so *every* contiguous slice of the
order holds each class in proportion to its frequency (within one example). Splits are
consecutive slices of the order: disjoint by construction, stratified, and a function of
(labels, seed, task name) only.

A source either gives one labelled pool (train, validation and test are consecutive
slices of it) or a ``train`` pool plus a held-out pool (train is taken from the first;
validation and test are consecutive slices of the second; used for hub datasets whose
test labels are hidden). When a pool holds fewer examples than requested, the sizes drawn
from it are scaled down together, proportionally (floor).
"""

from __future__ import annotations

import zlib
from typing import Mapping, Sequence

import numpy as np

from jax_ensemble.errors import DataError


def stratified_order(labels: Sequence[int], seed: int, salt: str = "") -> np.ndarray:
    """(N,) int permutation of ``range(N)`` with classes evenly interleaved (see module doc)."""
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng([seed, zlib.crc32(salt.encode())])
    keys = np.empty(len(labels), dtype=np.float64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        shuffled = members[rng.permutation(len(members))]
        keys[shuffled] = (np.arange(len(members)) + 0.5) / len(members)
    return np.lexsort((labels, keys))


def scaled_sizes(requested: Sequence[int], available: int) -> list[int]:
    """``requested`` if their sum fits in ``available``, else each scaled by available/sum (floor)."""
    total = sum(requested)
    if total <= available:
        return list(requested)
    return [n * available // total for n in requested]


def split_indices(
    pools: Mapping[str, Sequence[int]], sizes: Mapping[str, int], seed: int, salt: str = ""
) -> dict[str, tuple[str, np.ndarray]]:
    """Where each split's rows come from: ``{split: (pool name, (n,) sorted row indices)}``.

    pools: class labels of each pool, ``{"all": labels}`` or ``{"train": ..., "heldout": ...}``.
    sizes: ``{"train": n, "validation": n, "test": n}``; ``salt`` (the task name) decorrelates tasks.
    """
    if set(pools) == {"all"}:
        plan = {"all": ("train", "validation", "test")}
    elif set(pools) == {"train", "heldout"}:
        plan = {"train": ("train",), "heldout": ("validation", "test")}
    else:
        raise DataError(f"a task source must give pools 'all' or 'train'+'heldout', got {sorted(pools)}")
    out: dict[str, tuple[str, np.ndarray]] = {}
    for pool, split_names in plan.items():
        labels = pools[pool]
        order = stratified_order(labels, seed, f"{salt}/{pool}")
        counts = scaled_sizes([sizes[s] for s in split_names], len(labels))
        start = 0
        for split, n in zip(split_names, counts):
            out[split] = (pool, np.sort(order[start : start + n]))
            start += n
    return out
