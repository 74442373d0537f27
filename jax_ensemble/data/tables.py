"""Tables (whole splits as rows) and the batches cut from them.

A table is the batch mapping of :mod:`jax_ensemble.core.batch` with a leading example
axis N instead of B (``input_ids`` (N, T) …), plus ``task_index`` (N,) int32 (position of
the row's task in the given list). :func:`table_of_splits` builds one from tokenized
splits: T is the smallest bucket length that holds the longest prompt; the label-token
axis is widened with -1 (no choice) to the largest K.

Batches: :func:`batch_indices` is the training data order (a seeded permutation of the
rows per epoch; the step-s batch is rows [s·B, (s+1)·B) of their concatenation, so the
data position is a function of the step and resuming needs only the step);
:func:`take_batch` cuts those rows into micro-batches; :func:`eval_batches` walks a table
in order of prompt length for evaluation, each batch cut to its smallest bucket length.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jax_ensemble.core.batch import Table
from jax_ensemble.data.batching import TokenizedSplit, bucket_lengths
from jax_ensemble.errors import DataError


def table_of_splits(splits: Sequence[TokenizedSplit], *, pad_id: int, max_length: int,
                   num_choices: int | None = None) -> Table:
    """Rows of every split in ``splits``, in order (right-padded, weight 1); the choice axis
    is the largest K, or ``num_choices`` when that is larger (so tables of tasks with
    different K share shapes)."""
    prompts = [p for split in splits for p in split.prompts]
    if not prompts:
        raise DataError("no examples to build a table from (empty task list or empty splits)")
    longest = max(len(p) for p in prompts)
    length = next(t for t in bucket_lengths(max_length) if t >= longest)
    width = max([len(split.label_token_ids) for split in splits] + [num_choices or 0])
    n = len(prompts)
    table: Table = {
        "input_ids": np.full((n, length), pad_id, np.int32),
        "attention_mask": np.zeros((n, length), np.int32),
        "answer_position": np.asarray([len(p) - 1 for p in prompts], np.int32),
        "label_token_ids": np.concatenate([
            np.tile(np.pad(s.label_token_ids, (0, width - len(s.label_token_ids)), constant_values=-1),
                    (len(s.prompts), 1))
            for s in splits
        ]).astype(np.int32),
        "label": np.concatenate([s.labels for s in splits]).astype(np.int32),
        "weight": np.ones(n, np.float32),
        "task_index": np.concatenate([np.full(len(s.prompts), i, np.int32) for i, s in enumerate(splits)]),
    }
    for row, prompt in enumerate(prompts):
        table["input_ids"][row, : len(prompt)] = prompt
        table["attention_mask"][row, : len(prompt)] = 1
    return table


def batch_indices(num_rows: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Row indices (batch_size,) of the step-``step`` batch: positions [step·B, (step+1)·B)
    of the concatenated per-epoch permutations, epoch e's permutation drawn from (seed, e)."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = np.divmod(positions, num_rows)
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        permutation = np.random.default_rng([seed, int(epoch)]).permutation(num_rows)
        out[epochs == epoch] = permutation[offsets[epochs == epoch]]
    return out


def rows_of(table: Table, task_ids: Sequence[int]) -> Table:
    """The rows of ``table`` whose ``task_index`` is in ``task_ids``."""
    keep = np.isin(table["task_index"], task_ids)
    return {k: v[keep] for k, v in table.items()}


def take_batch(table: Table, indices: np.ndarray, num_micro: int = 1) -> dict[str, np.ndarray]:
    """Rows ``indices`` of ``table``, reshaped to (num_micro, len(indices)/num_micro, ...)."""
    return {k: v[indices].reshape((num_micro, -1) + v.shape[1:]) for k, v in table.items()}


def eval_batches(table: Table, batch_size: int):
    """Yields ``(batch, rows)``: batches of ``batch_size`` rows taken in order of prompt
    end (shortest first), each cut to the smallest bucket length (:func:`bucket_lengths` of
    the table's width) that holds its prompts, so short prompts skip most padding with a
    few compiled shapes; ``rows`` (batch_size,) are the table rows, −1 where the last batch
    is padded with weight-0 copies of a real row."""
    n = num_rows(table)
    width = table["input_ids"].shape[1]
    ends = width - np.argmax(table["attention_mask"][:, ::-1] > 0, axis=1)  # one past the last real token
    order = np.argsort(ends, kind="stable")
    buckets = np.asarray(bucket_lengths(width))
    for start in range(0, n, batch_size):
        rows = np.full(batch_size, -1, np.int64)
        rows[: min(batch_size, n - start)] = order[start : start + batch_size]
        batch = {k: v[0] for k, v in take_batch(table, np.where(rows >= 0, rows, order[start])).items()}
        batch["weight"] = np.where(rows >= 0, batch["weight"], 0).astype(np.float32)
        length = int(buckets[np.searchsorted(buckets, ends[rows[rows >= 0]].max())])
        for key in ("input_ids", "attention_mask"):
            batch[key] = batch[key][:, :length]
        yield batch, rows


def in_table_order(chunks: Sequence[np.ndarray], rows: Sequence[np.ndarray], axis: int = 0) -> np.ndarray:
    """Per-batch outputs of :func:`eval_batches` back in table order: ``chunks`` (one per
    batch, batch_size along ``axis``) and the batches' ``rows`` → N rows along ``axis``
    (padding rows, −1, dropped)."""
    order = np.concatenate(rows)
    real = np.flatnonzero(order >= 0)
    return np.take(np.concatenate(chunks, axis=axis), real[np.argsort(order[real])], axis=axis)


def eval_batch_count(table: Table, batch_size: int) -> int:
    """How many batches :func:`eval_batches` yields: ⌈N / batch_size⌉."""
    return -(-num_rows(table) // batch_size)


def num_rows(table: Table) -> int:
    """Rows of a table; DataError if it is empty or its columns disagree."""
    sizes = {len(v) for v in table.values()}
    if len(sizes) != 1 or not sizes.pop():
        raise DataError("a training/validation table is empty or its columns have different lengths")
    return len(next(iter(table.values())))
