"""Tasks: labelled datasets rendered as prompts whose answer is one of K label words.

``load_suite(config.tasks)`` / ``load_task(name, config.tasks)`` give :class:`Task` objects
(spec + ``datasets.Dataset`` splits); :func:`tokenize_split` turns a split into token ids,
:func:`~jax_ensemble.data.tables.table_of_splits` into a table of rows, and
:func:`~jax_ensemble.data.tables.eval_batches` / :func:`~jax_ensemble.data.tables.take_batch`
cut fixed-shape batches from it (the schema of :mod:`jax_ensemble.core.batch`).
"""

from jax_ensemble.data.batching import tokenize_split
from jax_ensemble.data.suites import SUITES, known_tasks, load_suite, load_task, suite_task_refs
from jax_ensemble.data.task import SPLITS, Task, TaskSpec, render_prompt

__all__ = [
    "SPLITS",
    "SUITES",
    "Task",
    "TaskSpec",
    "known_tasks",
    "load_suite",
    "load_task",
    "render_prompt",
    "suite_task_refs",
    "tokenize_split",
]
