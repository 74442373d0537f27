"""Tasks: labelled datasets rendered as prompts whose answer is one of K label words.

``load_suite(config.tasks)`` / ``load_task(name, config.tasks)`` give :class:`Task` objects
(spec + ``datasets.Dataset`` splits); :func:`tokenize_split` and :func:`bucketed_batches`
turn a split into fixed-shape classification batches (:mod:`jax_ensemble.models.classification`).
"""

from jax_ensemble.data.batching import bucketed_batches, tokenize_split
from jax_ensemble.data.suites import SUITES, known_tasks, load_suite, load_task, suite_task_refs
from jax_ensemble.data.task import SPLITS, Task, TaskSpec, render_prompt

__all__ = [
    "SPLITS",
    "SUITES",
    "Task",
    "TaskSpec",
    "bucketed_batches",
    "known_tasks",
    "load_suite",
    "load_task",
    "render_prompt",
    "suite_task_refs",
    "tokenize_split",
]
