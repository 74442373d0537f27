"""Tokenized splits of one or more tasks → one training table of equal-length rows.

A table is the batch mapping of :mod:`jax_ensemble.classification` with a leading example
axis N instead of B (``input_ids`` (N, T) …), plus ``task_index`` (N,) int32 (position of
the row's task in the given list). T is the smallest bucket length that holds the longest
prompt; the label-token axis is widened with -1 (no choice) to the largest K.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jax_ensemble.errors import DataError
from jax_ensemble.tasks.batching import TokenizedSplit, bucket_lengths

Table = dict[str, np.ndarray]


def training_table(splits: Sequence[TokenizedSplit], *, pad_id: int, max_length: int) -> Table:
    """Rows of every split in ``splits``, in order (right-padded, weight 1)."""
    prompts = [p for split in splits for p in split.prompts]
    if not prompts:
        raise DataError("no examples to build a table from (empty task list or empty splits)")
    longest = max(len(p) for p in prompts)
    length = next(t for t in bucket_lengths(max_length) if t >= longest)
    width = max(len(split.label_token_ids) for split in splits)
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
