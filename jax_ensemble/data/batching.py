"""Rendered, tokenized examples → fixed-shape classification batches.

A batch follows :mod:`jax_ensemble.core.batch`: ``input_ids`` (B, T) int32,
``attention_mask`` (B, T) int32, ``answer_position`` (B,) int32 (the last prompt token),
``label_token_ids`` (B, K) int32 (first token of each label word; -1 pads extra choices),
``label`` (B,) int32, ``weight`` (B,) float32. Prompts are right-padded; one longer than ``max_length`` keeps its
last ``max_length`` tokens (and the BOS token when the tokenizer adds one), so the answer
position survives truncation. T is the smallest bucket length (32, 64, 128, ... capped at
``max_length``) that holds the prompt, so a jitted function compiles one program per
bucket. Padding rows (to fill the last batch of a bucket) repeat the pad token with one
attended position, weight 0 and index -1, so their logits stay finite.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Protocol, Sequence

import numpy as np

from jax_ensemble.core.batch import Batch
from jax_ensemble.data.task import Task, TaskSpec, render_prompt
from jax_ensemble.errors import DataError


class Tokenizer(Protocol):
    """What tokenizing a split needs from a tokenizer (:class:`jax_ensemble.models.Tokenizer` has it)."""

    bos_id: int | None
    add_bos: bool

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class TokenizedSplit:
    """One split of one task as token ids.

    prompts: N arrays (T_i,) int32 with T_i <= max_length; label_token_ids (K,) int32;
    labels (N,) int32; truncated: how many prompts lost tokens on the left.
    """

    task: str
    prompts: tuple[np.ndarray, ...]
    label_token_ids: np.ndarray
    labels: np.ndarray
    truncated: int


def label_token_ids(spec: TaskSpec, tokenizer: Tokenizer) -> np.ndarray:
    """(K,) int32 first token of each label word; DataError if one is empty or two coincide."""
    firsts = []
    for word in spec.label_words:
        ids = tokenizer.encode(word, add_bos=False)
        if not ids:
            raise DataError(f"task {spec.name!r}: label word {word!r} encodes to no tokens")
        firsts.append(ids[0])
    for i, a in enumerate(firsts):
        for j in range(i):
            if firsts[j] == a:
                raise DataError(
                    f"task {spec.name!r}: label words {spec.label_words[j]!r} and {spec.label_words[i]!r} share "
                    f"their first token {tokenizer.decode([a])!r}; choose label words that start differently"
                )
    return np.asarray(firsts, dtype=np.int32)


def truncate_left(ids: list[int], max_length: int, bos_id: int | None) -> list[int]:
    """The last ``max_length`` tokens of ``ids``, keeping a leading BOS token if present."""
    if len(ids) <= max_length:
        return ids
    if bos_id is not None and ids and ids[0] == bos_id:
        return [bos_id] + ids[len(ids) - max_length + 1 :]
    return ids[len(ids) - max_length :]


def tokenize_split(task: Task, split: str, tokenizer: Tokenizer, max_length: int) -> TokenizedSplit:
    """Render and tokenize every example of ``task``'s ``split``."""
    data = task.split(split)
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    prompts, truncated = [], 0
    for row in data:
        ids = tokenizer.encode(render_prompt(task.spec, row))
        if not ids:
            raise DataError(f"task {task.name!r}: an example of the {split} split renders to an empty prompt")
        kept = truncate_left(ids, max_length, bos)
        truncated += len(kept) < len(ids)
        prompts.append(np.asarray(kept, dtype=np.int32))
    return TokenizedSplit(
        task=task.name,
        prompts=tuple(prompts),
        label_token_ids=label_token_ids(task.spec, tokenizer),
        labels=np.asarray(data["label"], dtype=np.int32),
        truncated=truncated,
    )


def bucket_lengths(max_length: int, smallest: int = 32) -> tuple[int, ...]:
    """Padded lengths: powers of two from ``smallest`` below ``max_length``, then ``max_length``."""
    lengths = []
    n = smallest
    while n < max_length:
        lengths.append(n)
        n *= 2
    return (*lengths, max_length)


def _buckets(tokenized: TokenizedSplit, max_length: int) -> list[tuple[int, np.ndarray]]:
    """(padded length, example indices) of each non-empty bucket."""
    buckets = bucket_lengths(max_length)
    which = np.searchsorted(np.asarray(buckets), [len(p) for p in tokenized.prompts])
    return [(t, np.flatnonzero(which == b)) for b, t in enumerate(buckets) if np.any(which == b)]


def num_batches(tokenized: TokenizedSplit, batch_size: int, max_length: int) -> int:
    """How many batches :func:`bucketed_batches` yields."""
    return sum(-(-len(members) // batch_size) for _, members in _buckets(tokenized, max_length))


def bucketed_batches(
    tokenized: TokenizedSplit, batch_size: int, max_length: int, pad_id: int, num_choices: int | None = None
) -> Iterator[tuple[Batch, np.ndarray]]:
    """Yield ``(batch, index)``: fixed-shape batches (module doc) and their (B,) example indices
    (-1 for padding rows), bucket by bucket (shortest first), examples in split order.

    ``num_choices`` >= K widens ``label_token_ids`` to (B, num_choices) with -1 columns (no
    choice), so tasks with different K share shapes."""
    k = len(tokenized.label_token_ids)
    if num_choices is not None and num_choices < k:
        raise DataError(f"task {tokenized.task!r} has {k} classes, more than num_choices={num_choices}")
    choices = np.concatenate([tokenized.label_token_ids, np.full((num_choices or k) - k, -1, np.int32)])
    for t, members in _buckets(tokenized, max_length):
        for start in range(0, len(members), batch_size):
            index = np.full(batch_size, -1, dtype=np.int32)
            chunk = members[start : start + batch_size]
            index[: len(chunk)] = chunk
            batch: Batch = {
                "input_ids": np.full((batch_size, t), pad_id, dtype=np.int32),
                "attention_mask": np.zeros((batch_size, t), dtype=np.int32),
                "answer_position": np.zeros(batch_size, dtype=np.int32),
                "label_token_ids": np.broadcast_to(choices, (batch_size, len(choices))).copy(),
                "label": np.zeros(batch_size, dtype=np.int32),
                "weight": np.zeros(batch_size, dtype=np.float32),
            }
            batch["attention_mask"][:, 0] = 1
            for row, i in enumerate(chunk):
                n = len(tokenized.prompts[i])
                batch["input_ids"][row, :n] = tokenized.prompts[i]
                batch["attention_mask"][row, :n] = 1
                batch["answer_position"][row] = n - 1
                batch["label"][row] = tokenized.labels[i]
                batch["weight"][row] = 1.0
            yield batch, index
