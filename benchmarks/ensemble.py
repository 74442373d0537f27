"""The grouped ensemble vs one adapter vs random groups, over several seeds (the main job repeated).

Runs :func:`jax_ensemble.pipeline.run` once per seed on a config, each seed in its own run
directory ``<out>/seed-<s>`` (every stage and adapter cached: a rerun or a killed benchmark
only finishes what is missing). Each finished seed's summary goes into a results file kept
in the repository (``benchmarks/results/ensemble-<config>.json``, with the config's hash),
so a seed finished in one session is not run again in the next, whose checkout has no
``runs/``. It prints per seed the average test accuracy of each
method; over seeds, mean ± std and the paired differences ensemble − single adapter and
ensemble − random groups with a 95% t-interval (and, when the config boosts, the boosting
gain: ensemble − the same groups without boosting); the per-task table (mean over seeds). The
seed changes the LoRA initialisation (hence the gradients' A), the data order, the random
groups and the boosting adapter; the splits stay fixed (``tasks.split_seed``).

With planted conflicts in the suite (a twin of
:data:`jax_ensemble.data.offline.PLANTED_CONFLICTS` beside its source task, the
``planted_conflict`` config), it also checks the mechanism per seed: is each twin pair's
affinity (both directions) below the mean affinity of the pairs that are not twins, are the
twins in different groups, and the same paired differences on the twins' tasks only.

    .venv/bin/python benchmarks/ensemble.py [--config default] [--seeds 0 1 2] [--train-size N]
        [--validation-size N] [--test-size N] [--epochs E] [--out runs/bench-<config>] [--results FILE] [--refresh] [--json]
        [key=value ...]

Sizes default to the config's. Hours on a 2-core CPU; not run in CI (the planted-conflict
mechanism is, at a tiny size, in tests/test_planted_conflict.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jax_ensemble.cli import configure_logging
from jax_ensemble.config import config_hash, load_config
from jax_ensemble.core.statistics import mean_std, paired_difference
from jax_ensemble.data.offline import PLANTED_CONFLICTS
from jax_ensemble.pipeline import run
from jax_ensemble.report import METHODS
from jax_ensemble.storage.atomic import atomic_write_json


def twin_pairs(tasks: Sequence[str]) -> list[tuple[str, str]]:
    """(source, planted twin) pairs present in ``tasks``."""
    return [(PLANTED_CONFLICTS[t], t) for t in tasks if PLANTED_CONFLICTS.get(t) in tasks]


def conflict_checks(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """Per twin pair: affinity both ways, the mean affinity of non-twin pairs, and whether
    the twins landed in different groups."""
    tasks = metrics["tasks"]
    pairs = twin_pairs(tasks)
    if not pairs:
        return None
    a = np.asarray(metrics["affinity"], np.float64)
    index = {t: i for i, t in enumerate(tasks)}
    twins = {(index[x], index[y]) for x, y in pairs} | {(index[y], index[x]) for x, y in pairs}
    others = [a[i, j] for i in range(len(tasks)) for j in range(len(tasks)) if i != j and (i, j) not in twins]
    group_of = {t: g for g, group in enumerate(metrics["groups"]) for t in group}
    out = {"non_twin_mean_affinity": float(np.mean(others)), "pairs": {}}
    for x, y in pairs:
        out["pairs"][y] = {"affinity": [float(a[index[x], index[y]]), float(a[index[y], index[x]])],
                           "separated": group_of[x] != group_of[y]}
        out["pairs"][y]["below_mean"] = max(out["pairs"][y]["affinity"]) < out["non_twin_mean_affinity"]
    out["all_separated"] = all(p["separated"] for p in out["pairs"].values())
    out["all_below_mean"] = all(p["below_mean"] for p in out["pairs"].values())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-size", type=int)
    parser.add_argument("--validation-size", type=int)
    parser.add_argument("--test-size", type=int)
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--out", default=None, help="default runs/bench-<config name>")
    parser.add_argument("--results", default=None,
                        help="per-seed results file, kept across sessions (default benchmarks/results/ensemble-<config>.json)")
    parser.add_argument("--refresh", action="store_true",
                        help="recompute recorded seeds from their run directories (cached: only rows added since "
                             "are computed), keeping their recorded wall seconds")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    configure_logging("info")  # stage lines and progress (one line per tenth in a log file) on stderr
    sizes = [f"tasks.{key}_size={value}" for key, value in
             (("train", args.train_size), ("validation", args.validation_size), ("test", args.test_size))
             if value is not None]
    sizes += [f"training.epochs={args.epochs}"] if args.epochs is not None else []
    out = args.out or f"runs/bench-{load_config(args.config).name}"

    results_path = Path(args.results or f"benchmarks/results/ensemble-{load_config(args.config).name}.json")
    recorded = json.loads(results_path.read_text()) if results_path.is_file() else {}
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in args.seeds:
        config = load_config(args.config, [f"seed={seed}", *sizes, f"run_dir={out}/seed-{seed}", *args.overrides])
        done, digest = recorded.get(str(seed)), config_hash(config)
        same = done is not None and done["config_hash"] == digest  # recorded with the same config
        if same and not args.refresh:
            per_seed[seed] = done  # finished in an earlier session
            continue
        start = time.perf_counter()
        metrics = json.loads((run(config) / "metrics.json").read_text())
        wall = done["wall_seconds"] if same else round(time.perf_counter() - start, 1)  # a refresh keeps the seed's
        per_seed[seed] = {"average_accuracy": metrics["average_accuracy"], "per_task_accuracy": metrics["per_task_accuracy"],
                          "groups": metrics["groups"], "wall_seconds": wall,
                          "ensemble_overhead_percent": metrics["flops"]["ensemble_overhead_percent"],
                          "training_budget": metrics.get("training_budget"), "conflicts": conflict_checks(metrics),
                          "config_hash": digest}
        recorded[str(seed)] = per_seed[seed]
        atomic_write_json(results_path, recorded)
        print(f"seed {seed}: " + ", ".join(f"{m} {a:.3f}" for m, a in metrics["average_accuracy"].items()),
              file=sys.stderr, flush=True)

    # the methods every seed reports (the row without boosting exists only when the config boosts)
    methods = [m for m in METHODS if all(m in per_seed[s]["average_accuracy"] for s in args.seeds)]
    tasks = list(per_seed[args.seeds[0]]["per_task_accuracy"][methods[0]])
    acc = {m: [per_seed[s]["average_accuracy"][m] for s in args.seeds] for m in methods}
    per_task = {t: {m: float(np.mean([per_seed[s]["per_task_accuracy"][m][t] for s in args.seeds])) for m in methods}
                for t in tasks}
    result: dict[str, Any] = {
        "config": args.config, "seeds": args.seeds, "overrides": [*sizes, *args.overrides], "per_seed": per_seed,
        "mean_accuracy": {m: mean_std(v)[0] for m, v in acc.items()},
        "std_accuracy": {m: mean_std(v)[1] for m, v in acc.items()},
        "ensemble_minus_single": paired_difference(acc["ensemble"], acc["single_adapter"]),
        "ensemble_minus_random": paired_difference(acc["ensemble"], acc["random_groups"]),
        "per_task_mean_accuracy": per_task,
    }
    if "ensemble_no_boosting" in acc:
        result["boosting_gain"] = paired_difference(acc["ensemble"], acc["ensemble_no_boosting"])
    twins = [t for pair in twin_pairs(tasks) for t in pair]
    if twins:
        def on_twins(m: str) -> list[float]:
            return [float(np.mean([per_seed[s]["per_task_accuracy"][m][t] for t in twins])) for s in args.seeds]
        result["twins"] = {
            "tasks": twins,
            "mean_accuracy": {m: float(np.mean(on_twins(m))) for m in methods},
            "ensemble_minus_single": paired_difference(on_twins("ensemble"), on_twins("single_adapter")),
            "separated_seeds": sum(per_seed[s]["conflicts"]["all_separated"] for s in args.seeds),
            "below_mean_seeds": sum(per_seed[s]["conflicts"]["all_below_mean"] for s in args.seeds),
        }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{'method':<20} " + " ".join(f"seed {s:>3}" for s in args.seeds) + "    mean ± std")
    for m in methods:
        print(f"{m:<20} " + " ".join(f"{x:>8.3f}" for x in acc[m])
              + f"    {result['mean_accuracy'][m]:.3f} ± {result['std_accuracy'][m]:.3f}")
    for name in ("ensemble_minus_single", "ensemble_minus_random", "boosting_gain"):
        if name not in result:
            continue
        d = result[name]
        ci = "" if d["ci95"] is None else f"  95% CI [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
        print(f"{name.replace('_', ' ')}: {d['mean']:+.3f} ± {d['std']:.3f}{ci}")
    print(f"\n{'task (mean over seeds)':<30} " + " ".join(f"{m:>20}" for m in methods))
    for t, row in per_task.items():
        print(f"{t:<30} " + " ".join(f"{row[m]:>20.3f}" for m in methods))
    if twins:
        tw = result["twins"]
        d = tw["ensemble_minus_single"]
        ci = "" if d["ci95"] is None else f", 95% CI [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
        print(f"\nplanted twins ({', '.join(twins)}): ensemble − single {d['mean']:+.3f}{ci}; separated in "
              f"{tw['separated_seeds']}/{len(args.seeds)} seeds; twin affinity below the non-twin mean in "
              f"{tw['below_mean_seeds']}/{len(args.seeds)} seeds")


if __name__ == "__main__":
    main()
