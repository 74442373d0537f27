"""Zero-shot baseline: the base model's accuracy on each task's label words.

For every example, z(x) ∈ R^K are the next-token logits after the prompt restricted to the
first token of each label word (:func:`jax_ensemble.models.classification.label_logits`); the
prediction is ``argmax z``. One jitted program per padded length runs over fixed-shape
batches; the label-token axis is padded with -1 (no choice) to the largest K of the
evaluated tasks, and those columns are dropped before the argmax, so tasks with different
K share programs.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jax_ensemble.core.batch import Batch
from jax_ensemble.data.batching import TokenizedSplit, tokenize_split
from jax_ensemble.data.tables import eval_batches, table_of_splits
from jax_ensemble.data.task import Task
from jax_ensemble.models.classification import label_logits
from jax_ensemble.models.tokenizer import Tokenizer
from jax_ensemble.training.mesh import check_rows_fit, put_batch, put_tree, to_host
from jax_ensemble.training.progress import Progress


def jitted_label_logits(model: nnx.Module, mesh: Mesh | None = None) -> Callable[[Batch], np.ndarray]:
    """``f(batch) -> (B, K)`` label logits of ``model``, jitted over the batch (weights passed
    as an argument). With ``mesh``: the weights laid out by the partition rules, each batch's
    rows split over (data, fsdp), the logits gathered to the host."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def apply(state: nnx.State, batch: Batch) -> jax.Array:
        return label_logits(nnx.merge(graphdef, state), batch)

    if mesh is None:
        return lambda batch: np.asarray(apply(state, batch))
    state = put_tree(state, mesh)
    return lambda batch: to_host(apply(state, put_batch(batch, mesh)))


def split_label_logits(
    logits_fn: Callable[[Batch], np.ndarray],
    tokenized: TokenizedSplit,
    *,
    batch_size: int,
    max_length: int,
    pad_id: int,
    num_choices: int | None = None,
    on_batch: Callable[[], Any] = lambda: None,
) -> np.ndarray:
    """(N, K) label logits of every example of ``tokenized``, batch by batch.

    ``num_choices`` >= K pads the label-token axis with -1 (see module doc); batches are
    :func:`~jax_ensemble.data.tables.eval_batches` of the split's table."""
    k = len(tokenized.label_token_ids)
    out = np.zeros((len(tokenized.prompts), k), dtype=np.float32)
    table = table_of_splits([tokenized], pad_id=pad_id, max_length=max_length, num_choices=num_choices)
    for batch, rows in eval_batches(table, batch_size):
        z = logits_fn(batch)[:, :k]
        real = rows >= 0
        out[rows[real]] = z[real]
        on_batch()
    return out


def evaluate_zero_shot(
    model: nnx.Module,
    tokenizer: Tokenizer,
    tasks: Sequence[Task],
    *,
    split: str = "validation",
    batch_size: int = 16,
    max_length: int = 128,
    progress: bool = True,
    mesh: Mesh | None = None,
) -> list[dict[str, Any]]:
    """Per-task zero-shot accuracy on ``split``: a list of JSON-able dicts with ``task``,
    ``num_classes``, ``examples``, ``accuracy``, ``majority_baseline`` (share of the most
    frequent gold class), ``prediction_counts`` (per class), ``truncated`` and ``seconds``.
    ``mesh``: run on it (:func:`jitted_label_logits`; ``batch_size`` must split over its
    data x fsdp axes)."""
    if mesh is not None:
        check_rows_fit(batch_size, mesh, "tasks.batch_size")
    logits_fn = jitted_label_logits(model, mesh)
    tokenized = [tokenize_split(t, split, tokenizer, max_length) for t in tasks]
    width = max(t.num_classes for t in tasks)
    total = sum(-(-len(tk.prompts) // batch_size) for tk in tokenized)
    results = []
    with Progress(total, f"zero-shot ({split})", "batch", enabled=progress) as bar:
        for task, tk in zip(tasks, tokenized):
            start = time.perf_counter()
            z = split_label_logits(logits_fn, tk, batch_size=batch_size, max_length=max_length,
                                   pad_id=tokenizer.pad_id, num_choices=width,
                                   on_batch=lambda name=task.name: bar.update(1, name))
            pred = z.argmax(axis=1)
            gold_counts = np.bincount(tk.labels, minlength=task.num_classes)
            results.append({
                "task": task.name,
                "num_classes": task.num_classes,
                "examples": int(len(tk.labels)),
                "accuracy": float(np.mean(pred == tk.labels)),
                "majority_baseline": float(gold_counts.max() / len(tk.labels)),
                "prediction_counts": np.bincount(pred, minlength=task.num_classes).tolist(),
                "truncated": tk.truncated,
                "seconds": round(time.perf_counter() - start, 2),
            })
    return results
