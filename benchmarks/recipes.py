"""Fine-tuning recipes against the fidelity of the first-order estimates: the frontier.

The affinity stage predicts fine-tuning from the gradients at θ0; how well depends on how
far the fine-tune moves from θ0. Each recipe below is a set of config overrides of the
training section; for each, on the same tasks and seeds:

1. ``study``: the linearization study (``jax-ensemble linearization-error``) on rt_polarity's
   200 training rows, 50 validation rows, measured after 25, 50 and 100 optimizer steps:
   the official error mean(((f_lin − f)/max(|f|, |f0|))²), Σ|f − f_lin|/Σ|f − f0|, the
   weight distance, and the accuracy of f and of f_lin;
2. ``estimates``: ``jax-ensemble validate-estimates --subsets N`` on the default config:
   mean accuracy error and relative loss error of the linear estimates against real
   fine-tunes, the base model's ("nothing changes") accuracy error, Spearman rank
   correlations over the (subset, task) pairs;
3. ``accuracy``: the main job on the default config: average test accuracy of the single
   adapter and of the grouped ensemble (and zero-shot, random groups).

Each recipe runs in ``<out>/<recipe>/`` (its adapters and checkpoints); the gradient,
affinity and grouping stages do not depend on the training section, so they are computed
once in ``<out>/shared/`` and linked into every recipe's directory. Every finished part of
every recipe is recorded in ``benchmarks/results/recipes.json`` (with the config hash), so a
killed or later run resumes with the missing parts. It prints one table, writes the frontier
(test accuracy against estimate fidelity) to ``benchmarks/results/recipes.png`` and, with
``--json``, the records.

    .venv/bin/python benchmarks/recipes.py [--recipes NAME ...] [--subsets 10] [--seed 0]
        [--parts study estimates accuracy] [--out runs/bench-recipes] [--json] [key=value ...]

Hours on a 2-core CPU (the main job and the subset fine-tunes per recipe); not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from jax_ensemble.cli import configure_logging
from jax_ensemble.config import Config, config_hash, load_config
from jax_ensemble.figures import png_bytes, pyplot
from jax_ensemble.pipeline import run
from jax_ensemble.stages.estimate_validation import (
    LOSS_RANK_CORRELATIONS,
    RANK_CORRELATIONS,
    summarize,
    validate_estimates,
)
from jax_ensemble.stages.linearization_study import run_study
from jax_ensemble.storage.atomic import atomic_write_bytes, atomic_write_json

COLD = "training.warm_start_steps=0"  # θ0 = LoRA's initialisation (B = 0), the default until 2026-12-05
RECIPES: dict[str, list[str]] = {
    "adamw-lr5e-4": [COLD],
    "adamw-lr1e-4": [COLD, "training.learning_rate=1e-4"],
    "adamw-lr2e-5": [COLD, "training.learning_rate=2e-5"],  # the paper's learning rate
    "l2-to-init-10": [COLD, "training.l2_to_init=10"],
    "lora-fa": [COLD, "training.train_lora_a=false"],
    # today's default: gradients and every fine-tune from θ0 = LoRA's init trained 10 steps on all tasks
    "warm-start-10": ["training.warm_start_steps=10"],
}
PINNED = ["clustering.solver=CLARABEL"]
"""Defaults changed after the recorded recipes ran, pinned to the recorded value so that their
config hashes still hold (auto picks CLARABEL at 10 tasks anyway)."""
PARTS = ("study", "estimates", "accuracy")
SHARED_STAGES = ("gradients", "affinity", "grouping")
STUDY = ["linearization.tasks=[rt_polarity]", "tasks.train_size=200", "linearization.steps=[25,50,100]",
         "linearization.validation_examples=50", "linearization.learning_rates=[]", "linearization.ranks=[]"]


def recipe_config(recipe: str, part: str, out: Path, seed: int, extra: list[str]) -> Config:
    """The default config with the recipe's overrides, in the recipe's run directory."""
    study = STUDY if part == "study" else []
    return load_config("default", [f"seed={seed}", f"run_dir={out / recipe}", *PINNED, *RECIPES[recipe], *study, *extra])


def link_shared_stages(out: Path, recipe: str) -> None:
    """``<out>/<recipe>/<stage>`` → ``<out>/shared/<stage>`` for the training-independent stages."""
    for stage in SHARED_STAGES:
        target, link = out / "shared" / stage, out / recipe / stage
        target.mkdir(parents=True, exist_ok=True)
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            if link.exists():
                raise SystemExit(f"error: {link} exists and is not a link to {target}: remove it or use another --out")
            os.symlink(target.resolve(), link)


def study_part(config: Config) -> dict[str, Any]:
    result = run_study(config)
    return {"settings": [{k: s[k] for k in ("steps", "learning_rate", "weight_distance", "relative_output_error",
                                            "relative_squared_error", "accuracy_f", "accuracy_f_lin")}
                         for s in result["settings"]],
            "accuracy_f0": result["accuracy_f0"]}


def estimates_part(config: Config, subsets: int) -> dict[str, Any]:
    summary = validate_estimates(config, subsets)
    linear, base = summary["errors"]["linear"], summary["errors"]["base"]
    return {"subsets": subsets, "accuracy_error": linear["mean_abs_error_accuracy"],
            "loss_relative_error": linear["mean_relative_error_loss"],
            "base_accuracy_error": base["mean_abs_error_accuracy"],
            **rank_correlations(linear), "speedup": summary["speedup"], "l2_sweep": summary["l2_sweep"]}


def rank_correlations(errors: dict[str, Any]) -> dict[str, float]:
    """The linear estimate's Spearman correlations of validate-estimates' ``errors``."""
    return {key: errors[key] for key in RANK_CORRELATIONS}


def recipe_validation(out: Path, recipe: str) -> dict[str, Any] | None:
    """The recipe's ``validation.json`` (validate-estimates' output), None when its run
    directory is not there."""
    found = sorted((out / recipe / "validate-estimates").glob("*/validation.json"))
    return json.loads(found[0].read_text()) if found else None


def backfill_rank_correlations(out: Path, records: dict[str, dict[str, Any]]) -> bool:
    """Records written before a rank correlation existed get it from their recipe's
    ``validation.json`` pairs (when the run directory is still there); whether any did."""
    changed = False
    for recipe, record in records.items():
        result = (record.get("estimates") or {}).get("result")
        if result is None or all(key in result for key in RANK_CORRELATIONS):
            continue
        if (validation := recipe_validation(out, recipe)) is not None:
            result.update(rank_correlations(summarize(validation["pairs"])["linear"]))
            changed = True
    return changed


def best_l2(out: Path, recipe: str, record: dict[str, Any]) -> dict[str, Any] | None:
    """The λ of validate-estimates' affinity.l2 sweep with the lowest accuracy error (in-sample:
    chosen on the pairs it is scored on, so optimistic), from the record or, for records
    written before the sweep was kept, from the recipe's validation.json."""
    sweep = ((record.get("estimates") or {}).get("result") or {}).get("l2_sweep")
    if sweep is None and (validation := recipe_validation(out, recipe)) is not None:
        sweep = validation["l2_sweep"]
    return None if not sweep else min(sweep, key=lambda r: r["mean_abs_error_accuracy"])


def accuracy_part(config: Config) -> dict[str, Any]:
    metrics = json.loads((run(config) / "metrics.json").read_text())
    return {"average_accuracy": metrics["average_accuracy"], "groups": metrics["groups"]}


def table(records: dict[str, dict[str, Any]], out: Path) -> str:
    """One row per recipe: the study at 100 steps, the estimate errors (at affinity.l2 and at
    the sweep's best λ), test accuracy."""
    def get(rec: dict[str, Any], *path: str) -> Any:
        for key in path:
            rec = rec.get(key) if isinstance(rec, dict) else None
        return rec

    def num(x: Any, fmt: str) -> str:
        return "—" if x is None else format(x, fmt)

    lines = ["| recipe | official error @100 | Σ|f−f_lin|/Σ|f−f0| @100 | weight distance | acc f / f_lin | "
             "acc error (base) | loss error | loss Spearman: pairs / change / within task | best λ: acc / loss error "
             "| single | ensemble |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, rec in records.items():
        last = (get(rec, "study", "result", "settings") or [{}])[-1]
        est = get(rec, "estimates", "result") or {}
        acc = get(rec, "accuracy", "result", "average_accuracy") or {}
        lines.append(" | ".join([
            f"| {name}", num(last.get("relative_squared_error"), ".3g"), num(last.get("relative_output_error"), ".3f"),
            num(last.get("weight_distance"), ".2e"),
            f"{num(last.get('accuracy_f'), '.3f')} / {num(last.get('accuracy_f_lin'), '.3f')}",
            f"{num(est.get('accuracy_error'), '.3f')} ({num(est.get('base_accuracy_error'), '.3f')})",
            num(est.get("loss_relative_error"), ".3f"),
            " / ".join(num(est.get(key), ".2f") for key in LOSS_RANK_CORRELATIONS),
            "—" if (best := best_l2(out, name, rec)) is None else
            f"{best['l2']:g}: {best['mean_abs_error_accuracy']:.3f} / {best['mean_relative_error_loss']:.3f}",
            num(acc.get("single_adapter"), ".3f"), num(acc.get("ensemble"), ".3f") + " |"]))
    return "\n".join(lines)


def frontier_png(records: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Test accuracy (ensemble and single adapter) against two measures of estimate fidelity:
    validate-estimates' accuracy error (left) and the study's official linearization error at
    its longest fine-tune (right, log scale), beside zero-shot accuracy and the targets (0.05
    accuracy error, 1% error). Every recipe with the parts a panel needs."""
    def fidelity(rec: dict[str, Any], panel: str) -> float | None:
        if panel == "estimates":
            return (rec.get("estimates") or {}).get("result", {}).get("accuracy_error")
        settings = (rec.get("study") or {}).get("result", {}).get("settings") or [None]
        return None if settings[-1] is None else settings[-1]["relative_squared_error"]

    panels = {"estimates": "validate-estimates: mean |estimated − fine-tuned accuracy|",
              "study": "linearization study: official error at the longest fine-tune (log)"}
    points = {panel: [(name, x, rec["accuracy"]["result"]["average_accuracy"]) for name, rec in records.items()
                      if "accuracy" in rec and (x := fidelity(rec, panel)) is not None] for panel in panels}
    if not any(points.values()):
        return None
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, (panel, label) in zip(axes, panels.items()):
        for method, marker in (("ensemble", "o"), ("single_adapter", "s")):
            ax.scatter([p[1] for p in points[panel]], [p[2][method] for p in points[panel]], marker=marker,
                       label=method)
        for name, x, acc in points[panel]:
            ax.annotate(name, (x, acc["ensemble"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        zero_shot = [p[2]["zero_shot"] for p in points[panel] if "zero_shot" in p[2]]
        if zero_shot:
            ax.axhline(zero_shot[0], color="gray", linestyle=":", label="zero-shot")
        ax.axvline(0.05 if panel == "estimates" else 0.01, color="gray", linestyle="--", label="target")
        if panel == "study":
            ax.set_xscale("log")
        ax.set_xlabel(label)
    axes[0].set_ylabel("average test accuracy (main job)")
    axes[0].legend()
    fig.suptitle("Fine-tuning recipes: test accuracy against estimate fidelity (lower x: the estimate follows)")
    return atomic_write_bytes(path, png_bytes(fig))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--subsets", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-recipes")
    parser.add_argument("--results", default="benchmarks/results/recipes.json")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    configure_logging("info")
    out, results_path = Path(args.out), Path(args.results)
    records: dict[str, dict[str, Any]] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if backfill_rank_correlations(out, records):
        atomic_write_json(results_path, records)
    runners: dict[str, Callable[[Config], dict[str, Any]]] = {
        "study": study_part, "estimates": lambda c: estimates_part(c, args.subsets), "accuracy": accuracy_part}
    for recipe in args.recipes:
        link_shared_stages(out, recipe)
        for part in args.parts:
            config = recipe_config(recipe, part, out, args.seed, args.overrides)
            done = records.get(recipe, {}).get(part)
            if done is not None and done["config_hash"] == config_hash(config):
                continue
            print(f"[recipes] {recipe}: {part}", file=sys.stderr, flush=True)
            start = time.perf_counter()
            result = runners[part](config)
            records.setdefault(recipe, {})[part] = {"result": result, "config_hash": config_hash(config),
                                                    "overrides": RECIPES[recipe], "seed": args.seed,
                                                    "wall_seconds": round(time.perf_counter() - start, 1)}
            atomic_write_json(results_path, records)
    shown = {r: records[r] for r in RECIPES if r in records}
    print(table(shown, out))
    png = frontier_png(shown, results_path.with_suffix(".png"))
    if png is not None:
        print(f"frontier: {png}")
    if args.json:
        print(json.dumps(shown, indent=2))


if __name__ == "__main__":
    main()
