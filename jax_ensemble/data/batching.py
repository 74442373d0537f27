"""Rendered examples → token ids: one tokenized split per task, and the padded lengths.

:func:`tokenize_split` renders and tokenizes every example of a split; a prompt longer
than ``max_length`` keeps its last ``max_length`` tokens (and the BOS token when the
tokenizer adds one), so the answer position (the last prompt token) survives truncation.
:func:`label_scoring` gives the token of each label word that scores its class: its first
token, or, when the words share a start (SmolLM2 encodes ``" 1"`` as ``" "``, ``"1"``), the
first token after that shared prefix, which is appended to every prompt. Padded lengths are the
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


def label_scoring(spec: TaskSpec, tokenizer: Tokenizer) -> tuple[list[int], np.ndarray]:
    """(prefix, ids): the longest token prefix that every label word starts with, and after it
    each word's next token, (K,) int32, whose logits score the classes.

    The prefix is appended to every prompt (:func:`tokenize_split`), so the answer position
    is its last token. That is exact for a next-token model: every answer starts with the
    prefix, so the classes differ first at the scored token, and P(word) ∝ P(scored token |
    prompt + prefix) up to the words' later tokens, which are not scored (as for one-token
    words' continuations). SmolLM2 splits ``" 1"`` into ``" "``, ``"1"``: digit labels get
    the prefix ``" "``. DataError if a word encodes to no tokens, is the prefix itself, or
    two words share the scored token."""
    encoded = []
    for word in spec.label_words:
        ids = tokenizer.encode(word, add_bos=False)
        if not ids:
            raise DataError(f"task {spec.name!r}: label word {word!r} encodes to no tokens")
        encoded.append(ids)
    shared = 0
    while all(len(ids) > shared for ids in encoded) and len({ids[shared] for ids in encoded}) == 1:
        shared += 1
    prefix = encoded[0][:shared]
    for word, ids in zip(spec.label_words, encoded):
        if len(ids) == shared:
            raise DataError(f"task {spec.name!r}: label word {word!r} is the start of every other label word "
                            f"(tokens {tokenizer.decode(prefix)!r}); choose label words that differ after a shared start")
    firsts = [ids[shared] for ids in encoded]
    for i, a in enumerate(firsts):
        for j in range(i):
            if firsts[j] == a:
                after = f" after the shared start {tokenizer.decode(prefix)!r}" if prefix else ""
                raise DataError(
                    f"task {spec.name!r}: label words {spec.label_words[j]!r} and {spec.label_words[i]!r} share "
                    f"their first scored token {tokenizer.decode([a])!r}{after}; choose label words that differ there"
                )
    return prefix, np.asarray(firsts, dtype=np.int32)


def label_token_ids(spec: TaskSpec, tokenizer: Tokenizer) -> np.ndarray:
    """(K,) int32: the token of each label word whose logit scores its class (the first
    token after the words' shared prefix; :func:`label_scoring`)."""
    return label_scoring(spec, tokenizer)[1]


def truncate_left(ids: list[int], max_length: int, bos_id: int | None) -> list[int]:
    """The last ``max_length`` tokens of ``ids``, keeping a leading BOS token if present."""
    if len(ids) <= max_length:
        return ids
    if bos_id is not None and ids and ids[0] == bos_id:
        return [bos_id] + ids[len(ids) - max_length + 1 :]
    return ids[len(ids) - max_length :]


def tokenize_split(task: Task, split: str, tokenizer: Tokenizer, max_length: int) -> TokenizedSplit:
    """Render and tokenize every example of ``task``'s ``split`` (each prompt followed by the
    label words' shared prefix, :func:`label_scoring`)."""
    data = task.split(split)
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    prefix, scored = label_scoring(task.spec, tokenizer)
    prompts, truncated = [], 0
    for row in data:
        ids = tokenizer.encode(render_prompt(task.spec, row))
        if not ids:
            raise DataError(f"task {task.name!r}: an example of the {split} split renders to an empty prompt")
        ids = ids + prefix  # the label words' shared start (usually none)
        kept = truncate_left(ids, max_length, bos)
        truncated += len(kept) < len(ids)
        prompts.append(np.asarray(kept, dtype=np.int32))
    return TokenizedSplit(
        task=task.name,
        prompts=tuple(prompts),
        label_token_ids=scored,
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

