"""Tasks that arrive after a run: their affinity to the run's tasks and the group each joins,
without recomputing the old tasks (:func:`place_tasks`).

A finished run's gradient and affinity stages hold G, f0 and the subset estimates of its n
tasks. For the new tasks only:

1. their projected gradients, train and validation rows, at the run's θ0 (its warm start
   restored from the checkpoint) with the run's P (regenerated from the config);
2. for each new task t, as many subsets as an old task is in on average (⌈S·k/n⌉), of the
   run's size k, each holding t, the pairs (t, j) covered first
   (:func:`jax_ensemble.core.affinity.sample_subsets` with ``containing``); all of them solved
   in one batched program over the old and new rows;
3. the affinity over the union of the old and new subsets
   (:func:`jax_ensemble.core.affinity.affinity_matrix`): what a from-scratch affinity stage
   with these subsets computes (the old tasks' entries move a little: each task's scores
   are standardised over every subset that holds it);
4. each new task joins the group where the regressions estimate the most gain: for every
   group C_g the subsets C_g and C_g ∪ {t}, and {t} alone, are solved in the same batched
   program, and joining g is worth s_t(C_g ∪ t) + Σ_{j ∈ C_g} [s_j(C_g ∪ t) − s_j(C_g)]
   (s: minus the estimated validation loss, or the accuracy, per ``affinity.metric``): the
   new task's own fit plus what it does to the group's tasks. When {t} alone scores higher
   than every group, t gets a group of its own. The mean affinity to each group is
   reported beside it.

``place_tasks`` writes ``<run_dir>/added/<digest of the new tasks and settings>/placement.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from jax_ensemble.config import Config, config_from_dict
from jax_ensemble.core import affinity
from jax_ensemble.core import ensemble as ensemble_maths
from jax_ensemble.core.trees import stack_trees, zeros_like_member
from jax_ensemble.data import load_suite, load_task, tokenize_split
from jax_ensemble.data.hub import HUB_TASKS
from jax_ensemble.data.offline import OFFLINE_TASKS
from jax_ensemble.data.suites import suite_task_refs
from jax_ensemble.data.tables import eval_batch_count, rows_of, table_of_splits
from jax_ensemble.data.task import Task
from jax_ensemble.errors import CheckpointError, DataError
from jax_ensemble.stages.adapters import adapters_for_plan, suite_tables
from jax_ensemble.stages.ensemble import ensemble_table_logits, on_mesh, stacked_table_logits
from jax_ensemble.stages.gradients import GRADIENT_SPLITS, SplitGradients, gradients_at, load_gradients
from jax_ensemble.stages.grouping import estimate_stacked, grouping_stage, load_affinity, load_estimates, stack_tasks
from jax_ensemble.stages.model import RunModel, load_run_model
from jax_ensemble.storage.atomic import atomic_write_bytes, atomic_write_json
from jax_ensemble.storage.digests import stage_dir
from jax_ensemble.storage.processes import on_writer
from jax_ensemble.training.mesh import make_mesh
from jax_ensemble.training.progress import Progress

log = logging.getLogger(__name__)


def new_task_gradients(config: Config, tasks: Sequence[Task], model: RunModel, *,
                       progress: bool = True) -> dict[str, dict[str, SplitGradients]]:
    """``{task: {split: SplitGradients}}`` of ``tasks``' train and validation rows at the run's
    θ0 (``model.lora0``) with the run's projector: what the gradient stage would store for them."""
    max_length = config.tasks.max_length
    splits = {(task.name, split): tokenize_split(task, split, model.tokenizer, max_length)
              for task in tasks for split in GRADIENT_SPLITS}
    tables = {key: table_of_splits([s], pad_id=model.tokenizer.pad_id, max_length=max_length)
              for key, s in splits.items()}
    bar = Progress(sum(eval_batch_count(t, config.gradients.batch_size) for t in tables.values()),
                   "new tasks' gradients", "batch", enabled=progress)
    gradients = gradients_at(config, model.graphdef, model.lora0, model.base, make_mesh(config.mesh),
                             on_batch=lambda: bar.update(1))
    out: dict[str, dict[str, SplitGradients]] = {task.name: {} for task in tasks}
    for task in tasks:
        for split in GRADIENT_SPLITS:
            f0, grads = gradients(tables[task.name, split], task.num_classes)
            out[task.name][split] = SplitGradients(grads, f0, splits[task.name, split].labels.astype(np.int32))
    bar.close()
    return out


def added_subsets(num_old: int, num_new: int, old_subsets: np.ndarray, seed: int) -> np.ndarray:
    """(S', n + n_new) bool: for each new task (index n + i) ⌈S·k/n⌉ subsets of the old subsets'
    size k holding it (``seed + 1 + i``), pairs with it covered first."""
    k = int(old_subsets[0].sum())
    per_task = math.ceil(len(old_subsets) * k / num_old)
    total = num_old + num_new
    return np.concatenate([
        affinity.sample_subsets(total, min(per_task, math.comb(total - 1, k - 1)), fraction=k / total,
                                seed=seed + 1 + i, containing=num_old + i)
        for i in range(num_new)
    ])


def union_affinity(old_scores: np.ndarray, old_subsets: np.ndarray, new_scores: np.ndarray,
                   new_subsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T (n', n'), subsets (S + S', n')) over the old subsets (scores (S, n), widened with
    zero columns for tasks they do not hold, which the affinity ignores) and the new ones
    (scores (S', n'))."""
    width = new_subsets.shape[1]
    pad = ((0, 0), (0, width - old_subsets.shape[1]))
    subsets = np.concatenate([np.pad(old_subsets, pad), new_subsets])
    scores = np.concatenate([np.pad(old_scores, pad), new_scores])
    return affinity.affinity_matrix(scores, subsets), subsets


def candidate_subsets(groups: Sequence[Sequence[int]], new: Sequence[int], width: int) -> np.ndarray:
    """(m + len(new)·(m + 1), width) bool: each group C_g, then per new task t the subsets
    C_g ∪ {t} (g = 0..m−1) and {t} alone: the regressions :func:`placement_gains` compares."""
    rows = [set(g) for g in groups]
    for t in new:
        rows += [set(g) | {t} for g in groups] + [{t}]
    out = np.zeros((len(rows), width), bool)
    for r, members in enumerate(rows):
        out[r, sorted(members)] = True
    return out


def placement_gains(scores: np.ndarray, groups: Sequence[Sequence[int]], new: Sequence[int]) -> np.ndarray:
    """(len(new), m + 1) estimated gain of each choice for each new task t, from the
    :func:`candidate_subsets`' scores (higher is better, e.g. minus the validation loss):
    joining group g is s_t(C_g ∪ t) + Σ_{j ∈ C_g} [s_j(C_g ∪ t) − s_j(C_g)] (t's own fit and
    what it does to the group's tasks), a group of its own (column m) is s_t({t})."""
    m = len(groups)
    gains = np.empty((len(new), m + 1))
    for i, t in enumerate(new):
        block = scores[m + i * (m + 1): m + (i + 1) * (m + 1)]
        for g, members in enumerate(groups):
            gains[i, g] = block[g, t] + sum(block[g, j] - scores[g, j] for j in members)
        gains[i, m] = block[m, t]
    return gains


def place_tasks(config: Config, refs: Sequence[str], *, progress: bool = True,
                model: RunModel | None = None) -> dict[str, Any]:
    """Place the tasks ``refs`` (built-in names or spec paths) into the finished run of
    ``config`` (the module doc); returns and writes the placement: per new task its affinity
    to every old task and its mean affinity to each group, the estimated gain of each
    choice, and the group it joins (None: a group of its own)."""
    started = time.perf_counter()
    old_names = [t.name for t in load_suite(config.tasks)]
    tasks = [load_task(ref, config.tasks) for ref in refs]
    names = [t.name for t in tasks]
    if clash := sorted(set(names) & set(old_names)) or sorted({n for n in names if names.count(n) > 1}):
        raise DataError(f"task {clash[0]!r} is already in the run (or given twice): add tasks with new names")
    model = model or load_run_model(config, sanity_check=False)
    grouping = grouping_stage(config, progress=progress, model=model)
    seconds = {"run_stages": time.perf_counter() - started}

    start = time.perf_counter()
    run_gradients = load_gradients(load_affinity(grouping["affinity_dir"])["gradients"])
    gradients = {**run_gradients, **new_task_gradients(config, tasks, model, progress=progress)}
    seconds["gradients"] = time.perf_counter() - start

    start = time.perf_counter()
    ac = config.affinity
    old = load_estimates(grouping["affinity_dir"])
    data = stack_tasks(gradients)
    index = {name: i for i, name in enumerate(data.names)}
    groups = [[index[t] for t in g] for g in grouping["groups"]]
    new = [index[n] for n in names]
    new_subsets = added_subsets(len(old_names), len(names), old["subsets"], ac.seed)
    candidates = candidate_subsets(groups, new, len(data.names))
    est = estimate_stacked(data, np.concatenate([new_subsets, candidates]), config, l2=ac.l2)
    scores = affinity.metric_scores(est.loss, est.accuracy, ac.metric)
    matrix, subsets = union_affinity(affinity.metric_scores(old["loss"], old["accuracy"], ac.metric), old["subsets"],
                                     scores[: len(new_subsets)], new_subsets)
    gains = placement_gains(scores[len(new_subsets):], groups, new)
    seconds["estimates"] = time.perf_counter() - start

    placement = {}
    for i, name in enumerate(names):
        row = matrix[index[name]]
        best = int(np.argmax(gains[i]))
        placement[name] = {
            "affinity": {t: float(row[index[t]]) for t in old_names},
            "group_affinity": [float(np.mean(row[g])) for g in groups],
            "estimated_gain": {"groups": gains[i, :-1].tolist(), "alone": float(gains[i, -1])},
            "group": best if best < len(groups) else None,
        }
    result = {
        "tasks": names,
        "run_tasks": old_names,
        "groups": [list(g) for g in grouping["groups"]],
        "placement": placement,
        "metric": ac.metric,
        "new_subsets": [[data.names[t] for t in np.flatnonzero(s)] for s in new_subsets],
        "subsets": int(len(subsets)),
        "affinity": matrix.tolist(),
        "affinity_tasks": list(data.names),
        "all_converged": bool(np.all(est.solution.converged)),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    out_dir = stage_dir(config.resolved_run_dir(), "added", {"tasks": list(refs), "affinity": grouping["affinity_dir"]})
    on_writer(lambda: atomic_write_json(out_dir / "placement.json", result))
    for name in names:
        where, gain = placement[name]["group"], placement[name]["estimated_gain"]
        log.info("%s joins %s (estimated gain per group %s, alone %+.3f)", name,
                 "a group of its own" if where is None else f"group {where}",
                 ", ".join(f"{g:+.3f}" for g in gain["groups"]), gain["alone"])
    return {**result, "directory": str(out_dir)}


def run_record(run_dir: Path) -> tuple[Config, dict[str, Any]]:
    """(the config, metrics.json) a finished ``jax-ensemble run`` recorded in ``run_dir``."""
    paths = [run_dir / "config.json", run_dir / "metrics.json"]  # metrics.json is written last
    if not all(path.is_file() for path in paths):
        raise CheckpointError(f"{run_dir} holds no finished run (config.json and metrics.json): run "
                              "`jax-ensemble run` there first")
    saved, metrics = (json.loads(path.read_text()) for path in paths)
    return config_from_dict({**saved["config"], "run_dir": str(run_dir)}), metrics


def extended_suite(config: Config, refs: Sequence[str], directory: Path) -> Config:
    """``config`` whose suite is the run's tasks then ``refs`` (a suite file written to ``directory``)."""
    resolved = [r if r in OFFLINE_TASKS or r in HUB_TASKS else str(Path(r).expanduser().resolve()) for r in refs]
    path = directory / "suite.yaml"
    atomic_write_bytes(path, yaml.safe_dump({"tasks": [*suite_task_refs(config.tasks.suite), *resolved]}).encode())
    return dataclasses.replace(config, tasks=dataclasses.replace(config.tasks, suite=str(path)))


def grown_groups(placed: dict[str, Any]) -> tuple[list[list[int]], list[int]]:
    """(groups as indices into ``placed["affinity_tasks"]`` with every new task in the group
    :func:`place_tasks` chose, or in a new group of its own; the ids of the groups that changed)."""
    index = {name: i for i, name in enumerate(placed["affinity_tasks"])}
    groups = [[index[t] for t in group] for group in placed["groups"]]
    changed = set()
    for name in placed["tasks"]:
        group = placed["placement"][name]["group"]
        if group is None:
            groups.append([])
            group = len(groups) - 1
        groups[group].append(index[name])
        changed.add(group)
    return groups, sorted(changed)


def add_tasks(run_dir: str | Path, refs: Sequence[str], *, progress: bool = True) -> dict[str, Any]:
    """Add the tasks ``refs`` to the finished run in ``run_dir``: :func:`place_tasks`, then
    retrain only the groups that change (each from its own adapter on its old and new
    tasks; a new task's own group from θ0), refit the convex ensemble weights of the tasks
    those groups serve and of the new tasks, and score those tasks on their test rows (the
    other tasks keep the run's members, weights, boosting and accuracy unchanged). Writes
    ``metrics.json`` beside the placement and returns it."""
    started = time.perf_counter()
    run_dir = Path(run_dir)
    config, run_metrics = run_record(run_dir)
    model = load_run_model(config, sanity_check=False)
    placed = place_tasks(config, refs, progress=progress, model=model)
    out_dir = Path(placed["directory"])
    extended = extended_suite(config, refs, out_dir)
    names, old_names = placed["affinity_tasks"], placed["run_tasks"]
    index = {name: i for i, name in enumerate(names)}
    groups, changed = grown_groups(placed)

    old_tables = suite_tables(config, model.tokenizer, old_names)
    run_groups = {f"group-{g}": ids for g, ids in enumerate(groups[: len(placed["groups"])])}
    restored = adapters_for_plan(config, {n: [t for t in ids if t < len(old_names)] for n, ids in run_groups.items()},
                                 model.graphdef, model.lora0, model.base, old_tables, old_names)
    tables = suite_tables(extended, model.tokenizer, names)
    plan = {f"group-{g}": groups[g] for g in changed}
    starts = {n: (n, restored[n]["lora"]) for n in plan if n in restored}
    start = time.perf_counter()
    retrained = adapters_for_plan(extended, plan, model.graphdef, model.lora0, model.base, tables, names,
                                  starts=starts, adapters_dir=out_dir / "adapters")
    training_seconds = time.perf_counter() - start

    members = [retrained.get(f"group-{g}", restored.get(f"group-{g}")) for g in range(len(groups))]
    old_alpha = np.asarray(run_metrics["ensemble_weights"])  # (n, M) of the run's groups
    alpha = np.zeros((len(names), len(groups)))
    alpha[: len(old_names), : old_alpha.shape[1]] = old_alpha
    affected = sorted({index[n] for n in placed["tasks"]}
                      | set(np.flatnonzero(alpha[:, changed].sum(axis=1) > 0).tolist()))
    mesh = make_mesh(config.mesh)
    base, _ = on_mesh(mesh, model.base)
    bs = config.tasks.batch_size
    stacked = stack_trees([m["lora"] for m in members])
    validation = rows_of(tables["validation"], affected)
    logits = stacked_table_logits(model.graphdef, stacked, base, validation, bs, mesh=mesh,
                                  progress="validation logits (affected tasks)" if progress else None)
    local = np.searchsorted(affected, validation["task_index"])
    refit = ensemble_maths.fit_ensemble_weights(logits, validation["label"], validation["weight"], local, len(affected),
                                                per_task=config.ensemble.per_task_weights,
                                                solver=config.ensemble.weights_solver)
    alpha[affected] = ensemble_maths.prune_weights(refit, config.ensemble.prune_below)

    test = rows_of(tables["test"], affected)
    ensemble = ensemble_maths.make_ensemble(stacked, alpha)
    scored = ensemble_table_logits(model.graphdef, ensemble, base, test, bs, mesh=mesh,
                                   progress="test: affected tasks" if progress else None)
    new_rows = rows_of(tables["test"], [index[n] for n in placed["tasks"]])
    zero_shot = stack_trees([zeros_like_member(stack_trees([model.lora0]))])  # B = 0 and A = 0: the base model
    zero = stacked_table_logits(model.graphdef, zero_shot, base, new_rows, bs, mesh=mesh)[0]
    hits = np.argmax(scored, axis=-1) == test["label"]
    accuracy = {n: float(run_metrics["per_task_accuracy"]["ensemble"][n]) for n in old_names}
    accuracy.update({names[t]: float(hits[test["task_index"] == t].mean()) for t in affected})
    zero_hits = np.argmax(zero, axis=-1) == new_rows["label"]
    metrics = {
        "run_dir": str(run_dir),
        "tasks": names,
        "added": placed["tasks"],
        "groups": [[names[t] for t in g] for g in groups],
        "retrained": sorted(plan),
        "affected_tasks": [names[t] for t in affected],
        "placement": placed["placement"],
        "ensemble_weights": alpha.tolist(),
        "per_task_accuracy": {"ensemble": accuracy,
                              "zero_shot": {n: float(zero_hits[new_rows["task_index"] == index[n]].mean())
                                            for n in placed["tasks"]}},
        "run_average_accuracy": run_metrics["average_accuracy"]["ensemble"],
        "average_accuracy": float(np.mean(list(accuracy.values()))),
        "adapters": {n: {k: v for k, v in a.items() if k not in ("lora", "validation_logits")}
                     for n, a in retrained.items()},
        "seconds": {**placed["seconds"], "training": round(training_seconds, 3),
                    "total": round(time.perf_counter() - started, 3)},
    }
    on_writer(lambda: atomic_write_json(out_dir / "metrics.json", metrics))
    return {**metrics, "directory": str(out_dir)}
