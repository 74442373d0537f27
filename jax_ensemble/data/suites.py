"""Tasks and suites by name: ``load_task(ref, config)``, ``load_suite(config)``.

A task reference is a built-in task name (offline or hub) or the path of a local task spec
(``.yaml``/``.yml``/``.json``, see :mod:`jax_ensemble.data.local`). A suite is a built-in
name (``offline10``, ``superglue10``) or the path of a YAML file::

    tasks: [rt_polarity, strategyqa, my_tasks/sentiment.yaml]   # paths relative to the file
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

import datasets
import numpy as np

from jax_ensemble.data.hub import HUB_TASKS, hub_spec_and_pools
from jax_ensemble.data.local import SPEC_SUFFIXES, local_spec_and_pools, read_spec_file
from jax_ensemble.data.offline import OFFLINE_TASKS, offline_spec_and_pools
from jax_ensemble.data.splits import split_indices
from jax_ensemble.data.task import SPLITS, Task, TaskSpec, with_class_labels
from jax_ensemble.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class TasksConfig:
    """Which tasks, how they are split and tokenized.

    suite: a suite name (``offline10``, ``superglue10``) or a suite YAML file.
    train_size / validation_size / test_size: examples per task in each split (stratified,
      deterministic for ``split_seed``; scaled down together when a task has fewer).
    max_length: tokens per prompt; longer prompts lose tokens from the left (the answer
      position is kept). Batches are padded to the smallest of 32, 64, 128, ... (capped at
      max_length) that fits, so jit compiles few shapes.
    batch_size: examples per evaluation batch (padding rows have weight 0).
    hub_mirror: a local directory with ``<task>/<split>.jsonl`` in the hub's schema, read
      instead of the Hugging Face hub (``superglue10`` where the hub is unreachable).
    """

    suite: str = "offline10"
    train_size: int = 200
    validation_size: int = 50
    test_size: int = 100
    split_seed: int = 0
    max_length: int = 128
    batch_size: int = 16
    hub_mirror: str = ""

    def __post_init__(self) -> None:
        if not self.suite:
            raise ConfigError("tasks.suite is empty: give offline10, superglue10 or a suite .yaml file")
        for key in ("train_size", "validation_size", "test_size", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"tasks.{key} must be >= 1, got {getattr(self, key)}")
        if self.max_length < 8:
            raise ConfigError(f"tasks.max_length must be >= 8, got {self.max_length}")


SUITES: dict[str, tuple[str, ...]] = {
    "offline10": (
        "rt_polarity", "rt_subjectivity", "vitaminc", "epistemic_reasoning", "logical_fallacy",
        "winowhy", "strategyqa", "sports_understanding", "intent_recognition", "implicatures",
    ),
    "superglue10": tuple(HUB_TASKS),
    # three tasks the model learns, each beside its planted conflict (same prompts and splits,
    # other answers), and two unrelated tasks: grouping must keep each pair apart
    "planted_conflict": (
        "rt_polarity", "rt_polarity_swapped", "rt_subjectivity", "rt_subjectivity_swapped",
        "intent_recognition", "intent_recognition_rotated", "strategyqa", "implicatures",
    ),
}


def known_tasks() -> list[str]:
    return sorted(set(OFFLINE_TASKS) | set(HUB_TASKS))


def suite_task_refs(suite: str) -> list[str]:
    """Task references of a built-in suite name or a suite YAML file."""
    if suite in SUITES:
        return list(SUITES[suite])
    path = Path(suite).expanduser()
    if path.suffix in SPEC_SUFFIXES and path.exists():
        refs = read_spec_file(path).get("tasks")
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise DataError(f"suite file {path} must hold 'tasks: [task name or spec path, ...]' (non-empty)")
        return [r if r in OFFLINE_TASKS or r in HUB_TASKS else str(path.parent / r) for r in refs]
    raise DataError(f"unknown suite {suite!r}: not one of {', '.join(SUITES)} and not a suite .yaml file")


def build_task(spec: TaskSpec, pools: Mapping[str, datasets.Dataset], config: TasksConfig) -> Task:
    """Label, check and split ``pools`` (``{"all": ...}`` or ``{"train": ..., "heldout": ...}``) into a Task."""
    labelled = {pool: with_class_labels(spec, data) for pool, data in pools.items()}
    for pool, data in labelled.items():
        if len(data) == 0:
            raise DataError(f"task {spec.name!r}: the {pool!r} data is empty")
    counts = np.bincount(np.concatenate([np.asarray(d["label"]) for d in labelled.values()]),
                         minlength=spec.num_classes)
    if np.count_nonzero(counts) < 2:
        raise DataError(f"task {spec.name!r} has a single class ({spec.class_names[int(np.argmax(counts))]!r}); "
                        "classification needs at least two")
    sizes = {"train": config.train_size, "validation": config.validation_size, "test": config.test_size}
    plan = split_indices({p: d["label"] for p, d in labelled.items()}, sizes, config.split_seed,
                         salt=spec.split_salt or spec.name)
    splits = {s: labelled[pool].select(indices) for s, (pool, indices) in plan.items()}
    for s in SPLITS:
        if len(splits[s]) == 0:
            pool = plan[s][0]
            wanted = sum(sizes[x] for x in SPLITS if plan[x][0] == pool)
            raise DataError(f"task {spec.name!r}: the {s} split is empty ({len(labelled[pool])} examples for "
                            f"{wanted} requested, sizes scaled down together); add data or adjust tasks.*_size")
    train_counts = np.bincount(np.asarray(splits["train"]["label"]), minlength=spec.num_classes)
    if not train_counts.all():
        missing = spec.class_names[int(np.argmin(train_counts))]
        raise DataError(f"task {spec.name!r}: class {missing!r} has no training examples")
    return Task(spec, splits, available=sum(len(d) for d in labelled.values()))


def load_task(ref: str, config: TasksConfig) -> Task:
    """A task by built-in name or spec path, split according to ``config``."""
    if ref in OFFLINE_TASKS:
        spec, pools = offline_spec_and_pools(ref)
    elif ref in HUB_TASKS:
        spec, pools = hub_spec_and_pools(ref, config.hub_mirror)
    elif Path(ref).suffix in SPEC_SUFFIXES:
        spec, pools = local_spec_and_pools(Path(ref).expanduser())
    else:
        raise DataError(f"unknown task {ref!r}: not a built-in task ({', '.join(known_tasks())}) "
                        f"and not a task spec file ({'/'.join(SPEC_SUFFIXES)})")
    return build_task(spec, pools, config)


def load_suite(config: TasksConfig) -> list[Task]:
    """Every task of ``config.suite``, in suite order (names must be unique)."""
    tasks = [load_task(ref, config) for ref in suite_task_refs(config.suite)]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DataError(f"suite {config.suite!r} has two tasks named {dup!r}")
    return tasks
