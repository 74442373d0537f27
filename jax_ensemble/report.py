"""The main job's report: ``metrics.json``, ``report.md`` and PNG figures, each written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jax_ensemble.figures import png_bytes, pyplot
from jax_ensemble.storage.atomic import atomic_write_bytes, atomic_write_json

METHODS = ("zero_shot", "single_adapter", "random_groups", "ensemble_no_boosting", "ensemble")


def accuracy_png(per_task: Mapping[str, Mapping[str, float]]) -> bytes:
    """Grouped bars: per-task test accuracy of each method (``per_task[method][task]``)."""
    plt = pyplot()

    methods = [m for m in METHODS if m in per_task]
    tasks = list(per_task[methods[0]])
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(tasks), 4.0))
    for i, method in enumerate(methods):
        ax.bar(np.arange(len(tasks)) + (i - (len(methods) - 1) / 2) * width,
               [per_task[method][t] for t in tasks], width, label=method)
    ax.set_xticks(np.arange(len(tasks)), tasks, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=len(methods))
    fig.tight_layout()
    return png_bytes(fig)


def markdown(metrics: Mapping[str, Any]) -> str:
    """A human-readable summary of ``metrics`` (see :func:`write_report`)."""
    per_task, average = metrics["per_task_accuracy"], metrics["average_accuracy"]
    methods = [m for m in METHODS if m in per_task]
    lines = [f"# jax-ensemble run `{metrics['run_name']}`", "",
             f"Model `{metrics['model']}` ({metrics['base_dtype']} base), {len(metrics['tasks'])} tasks, "
             f"{len(metrics['groups'])} groups ({metrics['grouping_method']}), "
             f"{metrics['boosting_steps']} boosting step(s).", "", "## Groups", ""]
    lines += [f"- group {i}: {', '.join(g)}" for i, g in enumerate(metrics["groups"])]
    lines += ["", "## Test accuracy", "", "| task | " + " | ".join(methods) + " |",
              "| --- |" + " ---: |" * len(methods)]
    for task in metrics["tasks"]:
        lines.append(f"| {task} | " + " | ".join(f"{per_task[m][task]:.3f}" for m in methods) + " |")
    lines.append("| **average** | " + " | ".join(f"**{average[m]:.3f}**" for m in methods) + " |")
    flops = metrics["flops"]
    lines += ["", "## Compute (analytical FLOPs)", "", "| stage | FLOPs |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.3e} |" for k, v in flops.items() if isinstance(v, float) and not k.endswith("percent")]
    lines += ["", f"Ensemble overhead over the single adapter: **{flops['ensemble_overhead_percent']:.1f}%** "
              "(gradients + solves + group and boosting training + ensemble inference, against single-adapter "
              "training + inference), by stage: " + ", ".join(
                  f"{stage} {pct:+.1f}%" for stage, pct in flops["ensemble_overhead_percent_by_stage"].items())
              + ". Ensemble inference runs on each task's rows only the members whose weight for the task is not "
              f"0: {flops['inference_ensemble']:.3e} FLOPs against {flops['inference_ensemble_dense']:.3e} "
              "with every member on every row.", "",
              f"Peak memory: {metrics['peak_memory_bytes']['host_peak_rss'] / 2**20:.0f} MiB host RSS.", ""]
    lines += ["## Wall time per stage", "", "| stage | seconds |", "| --- | ---: |"]
    lines += [f"| {stage} | {sec:.1f} |" for stage, sec in metrics["stage_seconds"].items()]
    lines += [f"| **total** | **{metrics['wall_seconds']:.1f}** |", ""]
    lines += ["![affinity](affinity.png)", "", "![accuracy](accuracy.png)", ""]
    check = metrics.get("estimate_validation")
    if check:
        speedup = "unknown" if check["speedup"] is None else f"{check['speedup']:.1f}x"
        lines += ["## Estimates vs real fine-tuning", "",
                  f"`jax-ensemble validate-estimates` on {check['subsets']} subsets: mean relative error of the "
                  f"validation loss {check['mean_relative_error_loss']:.3f}, mean absolute error of the accuracy "
                  f"{check['mean_abs_error_accuracy']:.3f} (the base model as the estimate: "
                  f"{check['base_mean_relative_error_loss']:.3f} / {check['base_mean_abs_error_accuracy']:.3f}); "
                  f"speedup of estimating over fine-tuning every subset: {speedup}.", "",
                  "![estimates](estimates.png)", ""]
    return "\n".join(lines)


def write_report(run_dir: Path, metrics: Mapping[str, Any], heatmap_png: bytes,
                 estimates_png: bytes | None = None) -> None:
    """``metrics.json``, ``report.md``, ``affinity.png``, ``accuracy.png`` and, when a
    ``validate-estimates`` result exists, ``estimates.png`` in ``run_dir`` (metrics.json
    last: a run directory with it is complete)."""
    atomic_write_bytes(run_dir / "affinity.png", heatmap_png)
    if estimates_png is not None:
        atomic_write_bytes(run_dir / "estimates.png", estimates_png)
    atomic_write_bytes(run_dir / "accuracy.png", accuracy_png(metrics["per_task_accuracy"]))
    atomic_write_bytes(run_dir / "report.md", markdown(metrics).encode())
    atomic_write_json(run_dir / "metrics.json", dict(metrics))
