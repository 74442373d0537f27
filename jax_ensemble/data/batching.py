"""Rendered examples → token ids: one tokenized split per task, and the padded lengths.

:func:`tokenize_split` renders and tokenizes every example of a split; a prompt longer
than ``max_length`` keeps its last ``max_length`` tokens (and the BOS token when the
tokenizer adds one), so the answer position (the last prompt token) survives truncation.
:func:`label_token_ids` gives the first token of each label word. Padded lengths are the
buckets of :func:`bucket_lengths` (32, 64, 128, ... capped at ``max_length``), so a jitted
function compiles few programs. Tables and batches are built from tokenized splits in
:mod:`jax_ensemble.data.tables`.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import numpy as np

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

