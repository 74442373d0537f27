"""The one batch schema every stage shares (docs/method.md §1).

A classification **batch** maps names to arrays with a leading row axis B:

- ``input_ids`` (B, T) int32 and ``attention_mask`` (B, T) (1 = token, 0 = padding);
- ``answer_position`` (B,) int32: the position whose next-token logits score the answer
  (the last prompt token);
- ``label_token_ids`` (B, K) int32: the token id scoring each of the K answer choices
  (the first token of each label word); rows of tasks with fewer choices pad with -1,
  whose logit is :data:`~jax_ensemble.core.losses.NO_CHOICE_LOGIT`;
- ``label`` (B,) int32 gold class; ``weight`` (B,) float32 (0 for padding rows);
- optionally ``task_index`` (B,) int32 (the row's task) and per-row extras a loss reads,
  such as ``offset_logits`` or ``base_logits`` (B, K).

A **table** is the same mapping with a leading example axis N over a whole split (host
numpy arrays, every row padded to one length); batches are cut from it.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

Batch = Mapping[str, Any]
"""Name → (B, ...) array (numpy on the host, jax.Array inside jit)."""

Table = Mapping[str, np.ndarray]
"""Name → (N, ...) host array: a whole split as rows."""

MODEL_KEYS = ("input_ids", "attention_mask", "answer_position", "label_token_ids")
"""The batch keys the network reads (the rest are for losses and bookkeeping)."""
