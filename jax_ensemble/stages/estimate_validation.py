"""``jax-ensemble validate-estimates``: the affinity stage's estimates against real fine-tuning.

For the first K subsets S of the affinity stage (its sampler covers task pairs first),
one LoRA adapter is fine-tuned on the training rows of S's tasks with the training
stage's settings (:func:`jax_ensemble.stages.adapters.adapters_for_plan`: checkpoints
under ``adapters/subset-<task ids>/``, a killed run resumes, a finished adapter is reused),
and every task t ∈ S is scored on its validation rows four ways:

- ``actual``: the fine-tuned adapter through the network;
- ``linear``: the linear estimate f0 + ⟨g, ŵ_S⟩ (the affinity stage's numbers);
- ``weight_space``: the adapter θ0 + P·ŵ_S through the network (P regenerated from its seed);
- ``base``: θ0 itself (the base model, or with ``training.warm_start_steps`` the
  warm-started adapter), i.e. predicting "fine-tuning changes nothing" — the trivial
  estimate any useful one must beat.

Score = mean cross-entropy over the task's label words (binary: the logistic loss of the
log-odds, the same number) and accuracy. Errors per (subset, task): relative
|L̂ − L| / L for the loss and |Â − A| for the accuracy, then their means over pairs.

Wall time: estimating every one of the stage's S_total subsets costs the gradient stage
plus the one vmapped solve; fine-tuning costs the measured training seconds per subset
(compilation and periodic evaluation included) times S_total. ``speedup`` is their ratio;
``marginal_speedup`` leaves the one-off gradients out (solve per subset vs fine-tune per
subset). ``l2_sweep`` re-solves the linear estimate of the same subsets for a grid of
λ (``affinity.l2``): the regression's λ plays the part of the fine-tune's implicit
regularisation (steps × learning rate), so the sweep shows which λ tracks the training
recipe. Results go to ``<run_dir>/validate-estimates/<digest>/``: ``validation.json``
(written last; a finished directory is reused) and ``scatter.png``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from jax_ensemble.config import Config
from jax_ensemble.core.affinity import balancing_weights
from jax_ensemble.core.solvers import correct, example_losses
from jax_ensemble.core.trees import stack_trees
from jax_ensemble.data.tables import rows_of
from jax_ensemble.errors import ConfigError
from jax_ensemble.figures import png_bytes, pyplot
from jax_ensemble.models.lora_gradients import lora_feature_split
from jax_ensemble.stages.adapters import adapters_for_plan, suite_tables
from jax_ensemble.stages.ensemble import lifted_adapter, stacked_table_logits
from jax_ensemble.stages.gradients import load_gradients, stage_projector
from jax_ensemble.stages.grouping import affinity_stage, estimate_stacked, load_affinity, load_estimates, stack_tasks
from jax_ensemble.stages.model import load_run_model
from jax_ensemble.storage.atomic import atomic_write_bytes, read_verified_json, write_verified_json
from jax_ensemble.storage.digests import stage_dir
from jax_ensemble.training.mesh import check_rows_fit, make_mesh

log = logging.getLogger(__name__)

PREDICTORS = ("linear", "weight_space", "base")
"""The estimates compared with the fine-tuned outcome (see the module docstring)."""

LOSS_RANK_CORRELATIONS = ("loss_spearman", "loss_change_spearman", "within_task_loss_spearman")
"""The loss's Spearman correlations of :func:`summarize`: over pairs, of the change, within tasks."""
RANK_CORRELATIONS = ("loss_spearman", "accuracy_spearman", "loss_change_spearman", "within_task_loss_spearman")
"""Every Spearman correlation of :func:`summarize` (also in each :func:`l2_sweep` row)."""

L2_GRID = (1e-3, 1e-2, 0.1, 1.0, 10.0, 30.0, 100.0, 300.0, 1e3, 1e4)
"""λ values of the sweep: the linear estimate re-solved for the same subsets (cheap: no network)."""


def subset_adapter_name(task_ids: Sequence[int], balanced: bool = False) -> str:
    """``subset-<task ids joined by '-'>[-balanced]``: the adapter directory of a subset's fine-tune."""
    return "subset-" + "-".join(str(int(t)) for t in task_ids) + ("-balanced" if balanced else "")


def task_scores(logits: np.ndarray, labels: np.ndarray, task_index: np.ndarray,
                tasks: Sequence[int]) -> dict[int, tuple[float, float]]:
    """task → (mean cross-entropy, accuracy) of label logits (N, K) on that task's rows."""
    losses = np.asarray(example_losses(jnp.asarray(logits, jnp.float32), jnp.asarray(labels)))
    hits = np.asarray(correct(jnp.asarray(logits, jnp.float32), jnp.asarray(labels)))
    return {int(t): (float(losses[task_index == t].mean()), float(hits[task_index == t].mean())) for t in tasks}


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0…n−1 of ``x`` (n,), ties sharing the mean of their positions."""
    positions = np.empty(len(x))
    positions[np.argsort(x, kind="stable")] = np.arange(len(x))
    _, tie, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(tie, weights=positions) / counts)[tie]


def rank_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's ρ of (n,) ``x`` and ``y``: the Pearson correlation of their average ranks;
    NaN when either side is constant up to float32 rounding (spread ≤ 1e-5 of its largest
    magnitude: the same rows scored in other batches differ by ~1e-7, ranks of that are noise)."""
    def constant(v: np.ndarray) -> bool:
        return bool(np.ptp(v) <= 1e-5 * np.abs(v).max())

    if len(x) < 2 or constant(x) or constant(y):
        return float("nan")
    return float(np.corrcoef(average_ranks(x), average_ranks(y))[0, 1])


def within_task_rank_correlation(tasks: np.ndarray, x: np.ndarray, y: np.ndarray, min_pairs: int = 3) -> float:
    """Mean over tasks of Spearman's ρ between ``x`` and ``y`` (n,) across the pairs of that
    task (``tasks`` (n,) names), for tasks with at least ``min_pairs`` pairs and a defined ρ;
    NaN when none. For the affinity this asks: for task t, does the estimate rank the subsets
    containing t as fine-tuning does (which partners help t most)?"""
    values = [rank_correlation(x[tasks == t], y[tasks == t])
              for t in np.unique(tasks) if (tasks == t).sum() >= min_pairs]
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def summarize(pairs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean errors of every predictor over the (subset, task) pairs, and the Pearson and
    Spearman (Pearson of average ranks) correlations of estimated with actual loss and
    accuracy (NaN when either side is constant). Grouping needs the ranking more than the
    values, hence Spearman, in three forms for the loss: over all pairs (``loss_spearman``,
    dominated by how the tasks differ), of the change from the base model
    (``loss_change_spearman``: estimate − base against fine-tuned − base), and within each
    task across its subsets (``within_task_loss_spearman``, pairs with a ``task``; the
    question the grouping asks)."""
    actual_loss = np.array([p["actual"]["loss"] for p in pairs])
    actual_acc = np.array([p["actual"]["accuracy"] for p in pairs])
    base_loss = np.array([p["base"]["loss"] for p in pairs])
    tasks = np.array([p.get("task", "") for p in pairs])

    def corr(x: np.ndarray, y: np.ndarray) -> float:
        return float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else float("nan")

    out = {}
    for name in PREDICTORS:
        loss = np.array([p[name]["loss"] for p in pairs])
        acc = np.array([p[name]["accuracy"] for p in pairs])
        out[name] = {
            "mean_relative_error_loss": float(np.mean(np.abs(loss - actual_loss) / actual_loss)),
            "mean_abs_error_accuracy": float(np.mean(np.abs(acc - actual_acc))),
            "loss_correlation": corr(loss, actual_loss),
            "accuracy_correlation": corr(acc, actual_acc),
            "loss_spearman": rank_correlation(loss, actual_loss),
            "accuracy_spearman": rank_correlation(acc, actual_acc),
            "loss_change_spearman": rank_correlation(loss - base_loss, actual_loss - base_loss),
            "within_task_loss_spearman": within_task_rank_correlation(tasks, loss, actual_loss),
        }
    return out


def per_task(pairs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """task → its number of pairs, mean actual and estimated accuracy, and every
    predictor's mean errors over the subsets containing it (:func:`summarize` per task),
    worst linear accuracy error first: which tasks the estimate misses."""
    tasks = sorted({p["task"] for p in pairs})
    out = {}
    for task in tasks:
        group = [p for p in pairs if p["task"] == task]
        errors = summarize(group)
        out[task] = {
            "pairs": len(group),
            "accuracy": {n: float(np.mean([p[n]["accuracy"] for p in group])) for n in ("actual", *PREDICTORS)},
            "errors": {n: {k: e[k] for k in ("mean_relative_error_loss", "mean_abs_error_accuracy")}
                       for n, e in errors.items()},
        }
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["errors"]["linear"]["mean_abs_error_accuracy"]))


def l2_sweep(config: Config, gradients_directory: str | Path, subsets: np.ndarray, pairs: Sequence[Mapping[str, Any]],
             names: Sequence[str]) -> list[dict[str, float]]:
    """The linear estimate's mean errors and Spearman correlations against the same
    fine-tuned outcomes for every λ of :data:`L2_GRID` and ``affinity.l2`` (subsets: (K, n)
    bool): which λ makes the estimates track this training recipe. In-sample for these K
    subsets; check a chosen λ on others."""
    data = stack_tasks(load_gradients(gradients_directory))
    index = {name: i for i, name in enumerate(names)}
    rows = []
    for l2 in sorted({*L2_GRID, config.affinity.l2}):
        est = estimate_stacked(data, subsets, config, l2=l2)
        swept = [{**p, "linear": {"loss": float(est.loss[p["subset"], index[p["task"]]]),
                                  "accuracy": float(est.accuracy[p["subset"], index[p["task"]]])}} for p in pairs]
        errors = summarize(swept)["linear"]
        rows.append({"l2": l2, **{key: errors[key] for key in (
                         "mean_relative_error_loss", "mean_abs_error_accuracy", *RANK_CORRELATIONS)},
                     "mean_param_norm": float(np.linalg.norm(est.solution.params, axis=1).mean())})
    return rows


def timing(gradient_timing: Mapping[str, Any] | None, solve_seconds: float,
           finetune_seconds: Sequence[float | None], total_subsets: int) -> dict[str, Any]:
    """Wall time of estimating all ``total_subsets`` vs fine-tuning them (see the module docstring).
    Gradient seconds of a resumed stage are scaled from the shards that call computed; an
    unknown time (a stage or adapter from a version without timing, or a stage whose timed
    call computed no shard) gives ``None`` speedups."""
    known = [s for s in finetune_seconds if s is not None]
    per_subset = float(np.mean(known)) if known else None
    out: dict[str, Any] = {
        "subsets_in_stage": total_subsets,
        "solve_seconds_all_subsets": round(solve_seconds, 3),
        "finetune_seconds_per_subset": None if per_subset is None else round(per_subset, 2),
        "finetune_seconds_all_subsets": None if per_subset is None else round(per_subset * total_subsets, 1),
        "marginal_speedup": None if per_subset is None else per_subset * total_subsets / max(solve_seconds, 1e-9),
        "gradient_seconds": None, "gradient_seconds_extrapolated": False, "estimate_seconds_all_subsets": None,
        "estimate_seconds_per_subset": None, "speedup": None,
    }
    if gradient_timing is not None and gradient_timing["timed_shards"] > 0:
        grad_seconds = gradient_timing["seconds"] * gradient_timing["shards"] / max(gradient_timing["timed_shards"], 1)
        estimate_seconds = grad_seconds + solve_seconds
        out.update(gradient_seconds=round(grad_seconds, 2),
                   gradient_seconds_extrapolated=gradient_timing["timed_shards"] < gradient_timing["shards"],
                   estimate_seconds_all_subsets=round(estimate_seconds, 2),
                   estimate_seconds_per_subset=round(estimate_seconds / total_subsets, 3),
                   speedup=None if per_subset is None else per_subset * total_subsets / estimate_seconds)
    return out


def output_dir(config: Config, affinity_directory: Path, num_subsets: int) -> Path:
    """``<run_dir>/validate-estimates/<digest of the affinity stage, training settings and K>``."""
    key = {"affinity": affinity_directory.name, "training": config.training.identity(), "subsets": num_subsets}
    return stage_dir(config.resolved_run_dir(), "validate-estimates", key)


def find_validation(config: Config, affinity_directory: Path) -> dict[str, Any] | None:
    """The finished ``validate-estimates`` result for this affinity stage and these training
    settings with the most subsets, or None."""
    found = []
    for path in sorted((config.resolved_run_dir() / "validate-estimates").glob("*/validation.json")):
        summary = read_verified_json(path)
        if summary is not None and path.parent == output_dir(config, affinity_directory, len(summary["subsets"])):
            found.append(summary)
    return max(found, key=lambda s: len(s["subsets"]), default=None)


def validate_estimates(config: Config, num_subsets: int, *, progress: bool = True) -> dict[str, Any]:
    """Fine-tune the first ``num_subsets`` subsets of the affinity stage and compare; returns
    the summary written to ``validation.json`` (``directory`` and ``scatter_png`` included)."""
    total = config.affinity.num_subsets
    if not 1 <= num_subsets <= total:
        raise ConfigError(f"--subsets must be between 1 and {total} (affinity.num_subsets), got {num_subsets}")
    loaded = load_run_model(config, sanity_check=False)
    aff_dir = affinity_stage(config, progress=progress, model=loaded)
    stage = load_affinity(aff_dir)
    names: list[str] = stage["tasks"]
    out_dir = output_dir(config, aff_dir, num_subsets)
    if (done := read_verified_json(out_dir / "validation.json")) is not None:
        return done
    estimates = load_estimates(aff_dir)
    subsets = [np.flatnonzero(row).tolist() for row in estimates["subsets"][:num_subsets]]

    graphdef, lora0, base = loaded.graphdef, loaded.lora0, loaded.base
    tables = suite_tables(config, loaded.tokenizer, names, ("train", "validation"))
    train_rows = tables["train"]
    if config.affinity.balance_tasks:  # fine-tune on the objective the estimates solved (rows reweighted)
        train_rows["weight"] = balancing_weights(train_rows["task_index"], np.ones(len(train_rows["label"]), bool),
                                                 len(names))
    balanced = config.affinity.balance_tasks
    plan = {subset_adapter_name(ids, balanced): ids for ids in subsets}
    log.info("[validate-estimates] fine-tuning %d of the %d subsets (%s)", num_subsets, total, ", ".join(plan))
    adapters = adapters_for_plan(config, plan, graphdef, lora0, base, tables, names)

    projector = stage_projector(config, lora_feature_split(lora0)[0])
    validation, bs = tables["validation"], config.tasks.batch_size
    mesh = make_mesh(config.mesh)  # inference as the main job's: base by the partition rules, rows over (data, fsdp)
    check_rows_fit(bs, mesh, "tasks.batch_size")
    pairs = []
    for s, ids in enumerate(subsets):
        rows = rows_of(validation, ids)
        members = stack_trees([adapters[subset_adapter_name(ids, balanced)]["lora"],
                               lifted_adapter(projector, estimates["params"][s], lora0), lora0])
        logits = stacked_table_logits(graphdef, members, base, rows, bs, mesh=mesh)  # (3, n, K)
        scores = [task_scores(z, rows["label"], rows["task_index"], ids) for z in logits]
        for t in ids:
            pairs.append({
                "subset": s, "subset_tasks": [names[i] for i in ids], "task": names[t],
                "actual": dict(zip(("loss", "accuracy"), scores[0][t])),
                "linear": {"loss": float(estimates["loss"][s, t]), "accuracy": float(estimates["accuracy"][s, t])},
                "weight_space": dict(zip(("loss", "accuracy"), scores[1][t])),
                "base": dict(zip(("loss", "accuracy"), scores[2][t])),
            })
    errors = summarize(pairs)
    manifest = read_verified_json(Path(stage["gradients"]) / "manifest.json") or {}
    times = timing(manifest.get("timing"), stage["estimate_seconds"], [adapters[n]["seconds"] for n in plan], total)
    log.info("[validate-estimates] re-solving the linear estimates over a grid of affinity.l2")
    sweep = l2_sweep(config, stage["gradients"], estimates["subsets"][:num_subsets], pairs, names)
    summary = {
        "l2": config.affinity.l2,
        "mean_relative_error_loss": errors["linear"]["mean_relative_error_loss"],
        "mean_abs_error_accuracy": errors["linear"]["mean_abs_error_accuracy"],
        "speedup": times["speedup"],
        "errors": errors,
        "per_task": per_task(pairs),
        "timing": times,
        "l2_sweep": sweep,
        "subsets": [[names[i] for i in ids] for ids in subsets],
        "pairs": pairs,
        "training_steps": {n: adapters[n]["steps"] for n in plan},
        "affinity_dir": str(aff_dir),
        "directory": str(out_dir),
        "scatter_png": str(out_dir / "scatter.png"),
    }
    atomic_write_bytes(out_dir / "scatter.png", scatter_png(pairs))
    write_verified_json(out_dir / "validation.json", summary)
    return summary


def scatter_png(pairs: Sequence[Mapping[str, Any]]) -> bytes:
    """Estimated vs actual validation loss and accuracy, one point per (subset, task) and predictor."""
    plt = pyplot()

    style = {"linear": ("o", "tab:blue"), "weight_space": ("^", "tab:orange"), "base": ("x", "tab:gray")}
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 4.4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        actual = np.array([p["actual"][metric] for p in pairs])
        values = [actual] + [np.array([p[n][metric] for p in pairs]) for n in PREDICTORS]
        low, high = min(v.min() for v in values), max(v.max() for v in values)
        pad = 0.05 * (high - low or 1.0)
        ax.plot([low - pad, high + pad], [low - pad, high + pad], color="black", linewidth=0.8, label="y = x")
        for name in PREDICTORS:
            marker, color = style[name]
            ax.scatter(actual, [p[name][metric] for p in pairs], marker=marker, color=color, s=28, label=name)
        ax.set_xlabel(f"actual validation {metric} (fine-tuned)")
        ax.set_ylabel(f"estimated validation {metric}")
        ax.set_title(f"{metric}: {len(pairs)} (subset, task) pairs")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)
