"""The affinity and grouping stages: gradient shards → subsets, estimates, affinity → groups.

``affinity_stage(config)`` runs the gradient stage if it is not cached, stacks every
task's train and validation rows into one problem (:func:`stack_tasks`), samples the
subsets, solves them in one program and writes, under
``<run_dir>/affinity/<digest of the gradient directory and the affinity settings>/``,
``estimates.npz`` (subsets, per-(subset, task) loss and accuracy, the regressions'
parameters and convergence report) and then ``affinity.json`` (task names, subsets by
name, the affinity matrix, timings, convergence summary), both atomically and each with
its sha256 marker; a finished stage (both files matching their markers) is reused, a
corrupt one computed again (:func:`load_affinity`, :func:`load_estimates` read them).

``grouping_stage(config)`` clusters that matrix (:func:`jax_ensemble.core.clustering.cluster`)
and writes ``grouping.json`` and ``affinity.png`` (the matrix ordered by group) under
``<run_dir>/grouping/<digest>/``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jax_ensemble.config import Config
from jax_ensemble.core import affinity, clustering, solvers
from jax_ensemble.errors import CheckpointError
from jax_ensemble.figures import png_bytes, pyplot
from jax_ensemble.models.classification import NO_CHOICE_LOGIT
from jax_ensemble.stages.gradients import SplitGradients, gradient_stage, load_gradients
from jax_ensemble.stages.model import RunModel
from jax_ensemble.storage.atomic import (
    atomic_write_bytes,
    atomic_write_json,
    read_verified,
    read_verified_json,
    write_verified,
    write_verified_json,
)
from jax_ensemble.storage.digests import stage_dir
from jax_ensemble.storage.processes import on_writer

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class StackedTasks:
    """Every task's train and validation rows as one problem (N rows).

    features (N, d) and offsets (N,) when every task is binary (gold-relative log-odds,
    labels all 1); otherwise (N, K, d) and (N, K) with K the largest class count: a binary
    row becomes logits (f, 0) with label 0, and missing classes get offset
    NO_CHOICE_LOGIT and zero features (probability 0)."""

    names: tuple[str, ...]
    features: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    task_ids: np.ndarray
    train_mask: np.ndarray
    val_mask: np.ndarray


def _as_logits(part: SplitGradients, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features (n, width, d), offsets (n, width), labels (n,)) of one split."""
    n, d = part.grads.shape[0], part.grads.shape[-1]
    if part.f0.ndim == 1:  # binary, gold-relative: logits (f, 0), gold in slot 0
        grads, f0, labels = part.grads[:, None, :], part.f0[:, None], np.zeros(n, np.int32)
        grads = np.concatenate([grads, np.zeros((n, 1, d), np.float32)], axis=1)
        f0 = np.concatenate([f0, np.zeros((n, 1), np.float32)], axis=1)
    else:
        grads, f0, labels = part.grads, part.f0, part.labels.astype(np.int32)
    pad = width - grads.shape[1]
    features = np.concatenate([grads, np.zeros((n, pad, d), np.float32)], axis=1)
    offsets = np.concatenate([f0, np.full((n, pad), NO_CHOICE_LOGIT, np.float32)], axis=1)
    return features, offsets, labels


def stack_tasks(gradients: Mapping[str, Mapping[str, SplitGradients]]) -> StackedTasks:
    """One problem from ``load_gradients``' ``{task: {split: SplitGradients}}``."""
    names = tuple(gradients)
    parts = [(t, split, gradients[name][split]) for t, name in enumerate(names) for split in SPLITS]
    binary = all(p.f0.ndim == 1 for _, _, p in parts)
    if binary:
        features = np.concatenate([p.grads for _, _, p in parts])
        offsets = np.concatenate([p.f0 for _, _, p in parts])
        labels = np.ones(len(offsets), np.float32)
    else:
        width = max(2 if p.f0.ndim == 1 else p.f0.shape[1] for _, _, p in parts)
        stacked = [_as_logits(p, width) for _, _, p in parts]
        features, offsets, labels = (np.concatenate([s[i] for s in stacked]) for i in range(3))
    task_ids = np.concatenate([np.full(len(p.f0), t, np.int32) for t, _, p in parts])
    is_train = np.concatenate([np.full(len(p.f0), split == "train") for _, split, p in parts])
    return StackedTasks(names, features, offsets, labels, task_ids, is_train, ~is_train)


def estimate_stacked(data: StackedTasks, subsets: np.ndarray, config: Config, *, l2: float) -> affinity.Estimates:
    """:func:`affinity.estimate_subsets` of ``subsets`` on ``data`` with the config's solver and
    task balancing and the given λ, as host arrays."""
    ac = config.affinity
    weights = affinity.balancing_weights(data.task_ids, data.train_mask, len(data.names)) if ac.balance_tasks else None
    est = affinity.estimate_subsets(
        jnp.asarray(data.features), jnp.asarray(data.offsets), jnp.asarray(data.labels), data.task_ids,
        data.train_mask, data.val_mask, subsets, l2=l2, example_weights=weights, method=ac.solver,
    )
    return jax.tree.map(np.asarray, jax.block_until_ready(est))


def affinity_dir(config: Config, gradients_directory: Path) -> Path:
    """``<run_dir>/affinity/<digest of the gradient directory and the affinity settings>``."""
    key = {"gradients": gradients_directory.name, "affinity": dataclasses.asdict(config.affinity)}
    return stage_dir(config.resolved_run_dir(), "affinity", key)


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def affinity_stage(config: Config, *, progress: bool = True, model: RunModel | None = None) -> Path:
    """Subsets → one vmapped solve → estimates → affinity matrix; returns the stage directory.
    In a multi-process run the solves run on process 0 (the gradient stage before them on
    every process)."""
    grad_dir = gradient_stage(config, progress=progress, model=model)
    out_dir = affinity_dir(config, grad_dir)
    on_writer(lambda: _estimate_affinity(config, grad_dir, out_dir))
    return out_dir


def _estimate_affinity(config: Config, grad_dir: Path, out_dir: Path) -> None:
    """Write ``estimates.npz`` and ``affinity.json`` under ``out_dir`` unless both are there."""
    if read_verified(out_dir / "estimates.npz") is not None and read_verified_json(out_dir / "affinity.json"):
        return
    ac = config.affinity
    data = stack_tasks(load_gradients(grad_dir))
    n = len(data.names)
    affinity.check_inputs(data.features, data.offsets, data.labels, data.task_ids, data.train_mask,
                          data.val_mask, n)
    size = affinity.subset_size(n, ac.subset_fraction)
    distinct = math.comb(n, size)
    if ac.num_subsets > distinct:
        log.info("affinity.num_subsets = %d is more than the %d distinct subsets of %d of %d tasks: using all %d "
                 "(exhaustive)", ac.num_subsets, distinct, size, n, distinct)
    subsets = affinity.sample_subsets(n, min(ac.num_subsets, distinct), fraction=ac.subset_fraction, seed=ac.seed)
    start = time.perf_counter()
    est = estimate_stacked(data, subsets, config, l2=ac.l2)
    seconds = time.perf_counter() - start
    scores = affinity.metric_scores(est.loss, est.accuracy, ac.metric)
    matrix = affinity.affinity_matrix(scores, subsets)
    sol = est.solution
    write_verified(out_dir / "estimates.npz", _npz_bytes(
        subsets=subsets, loss=est.loss, accuracy=est.accuracy, params=sol.params, objective=sol.objective,
        grad_norm=sol.grad_norm, iterations=sol.iterations, converged=sol.converged,
    ))
    write_verified_json(out_dir / "affinity.json", {
        "tasks": list(data.names),
        "metric": ac.metric,
        "affinity": matrix.tolist(),
        "subsets": [[data.names[t] for t in np.flatnonzero(row)] for row in subsets],
        "pair_coverage": affinity.pair_coverage(subsets),
        "solver": solvers.resolve_method(ac.solver, data.features.shape[-1]),
        "converged": int(sol.converged.sum()),
        "max_iterations": int(sol.iterations.max()),
        "max_grad_norm": float(sol.grad_norm.max()),
        "estimate_seconds": round(seconds, 3),
        "rows": int(len(data.labels)),
        "dim": int(data.features.shape[-1]),
        "gradients": str(grad_dir),
        "settings": dataclasses.asdict(ac),
    })


def load_affinity(directory: str | Path) -> dict[str, Any]:
    """``affinity.json`` of a finished affinity stage (CheckpointError if missing or corrupt)."""
    stage = read_verified_json(Path(directory) / "affinity.json")
    if stage is None:
        raise CheckpointError(f"{directory} has no verified affinity.json: run `jax-ensemble estimate` to compute it")
    return stage


def load_estimates(directory: str | Path) -> dict[str, np.ndarray]:
    """The arrays of ``estimates.npz`` of a finished affinity stage (CheckpointError if
    missing or corrupt)."""
    data = read_verified(Path(directory) / "estimates.npz")
    if data is None:
        raise CheckpointError(f"{directory} has no verified estimates.npz: run `jax-ensemble estimate` to compute it")
    return dict(np.load(io.BytesIO(data)))


def grouping_stage(config: Config, *, progress: bool = True, model: RunModel | None = None) -> dict[str, Any]:
    """Cluster the affinity matrix; writes grouping.json and affinity.png; returns the summary
    (in a multi-process run computed on process 0 and broadcast)."""
    aff_dir = affinity_stage(config, progress=progress, model=model)
    return on_writer(lambda: _group(config, aff_dir))


def _group(config: Config, aff_dir: Path) -> dict[str, Any]:
    stage = load_affinity(aff_dir)
    names, matrix = stage["tasks"], np.array(stage["affinity"])
    cc = config.clustering
    grouping = clustering.cluster(matrix, method=cc.method, num_groups=cc.num_groups, solver=cc.solver,
                                  seed=config.seed)
    out_dir = stage_dir(config.resolved_run_dir(), "grouping", {"affinity": aff_dir.name, **dataclasses.asdict(cc),
                                                                 "seed": config.seed})
    summary = {
        "method": grouping.method,
        "num_groups": int(grouping.labels.max()) + 1,
        "groups": [[names[i] for i in group] for group in grouping.groups()],
        "info": grouping.info,
        "affinity_dir": str(aff_dir),
        "heatmap": str(out_dir / "affinity.png"),
    }
    atomic_write_bytes(out_dir / "affinity.png", heatmap_png(matrix, names, grouping.labels))
    atomic_write_json(out_dir / "grouping.json", summary)
    return summary


def heatmap_png(matrix: np.ndarray, names: list[str], labels: np.ndarray) -> bytes:
    """PNG of the affinity matrix with tasks ordered by group, group boundaries drawn."""
    plt = pyplot()

    matrix_order = np.argsort(labels, kind="stable")
    ordered = matrix[np.ix_(matrix_order, matrix_order)]
    size = 2.5 + 0.35 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    bound = float(np.abs(ordered).max()) or 1.0
    image = ax.imshow(ordered, cmap="RdBu_r", vmin=-bound, vmax=bound)
    ticks = np.arange(len(names))
    ax.set_xticks(ticks, [names[i] for i in matrix_order], rotation=90, fontsize=7)
    ax.set_yticks(ticks, [names[i] for i in matrix_order], fontsize=7)
    for edge in np.flatnonzero(np.diff(labels[matrix_order])) + 0.5:
        ax.axhline(edge, color="black", linewidth=1.5)
        ax.axvline(edge, color="black", linewidth=1.5)
    ax.set_title("task affinity (z-scored), ordered by group")
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    return png_bytes(fig)
