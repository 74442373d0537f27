"""The grouped ensemble vs one adapter vs random groups, over several seeds (the main job repeated).

Runs :func:`jax_ensemble.pipeline.run` once per seed on a config (default
the shipped ``default`` config) with larger per-task sizes, each seed in its own run directory
``<out>/seed-<s>`` (cached: a rerun only finishes what is missing), and prints the average
test accuracy of each method per seed, their mean and standard deviation over seeds, and
the per-seed difference ensemble − single adapter (its mean and spread). The seed changes
the LoRA initialisation (hence the gradients' A), the data order, the random groups and the
boosting adapter; the train/validation/test splits stay fixed (``tasks.split_seed``).

    .venv/bin/python benchmarks/ensemble.py [--seeds 0 1 2] [--train-size 100] [--validation-size 40]
        [--test-size 100] [--epochs 2] [--config default] [--out runs/bench-ensemble] [--json]
        [key=value ...]

May take an hour or more on a 2-core CPU; not run in CI.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from jax_ensemble.config import load_config
from jax_ensemble.pipeline import run

METHODS = ("zero_shot", "single_adapter", "random_groups", "ensemble")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-size", type=int, default=100)
    parser.add_argument("--validation-size", type=int, default=40)
    parser.add_argument("--test-size", type=int, default=100)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--out", default="runs/bench-ensemble")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()

    per_seed = {}
    for seed in args.seeds:
        overrides = [f"seed={seed}", f"tasks.train_size={args.train_size}",
                     f"tasks.validation_size={args.validation_size}", f"tasks.test_size={args.test_size}",
                     f"training.epochs={args.epochs}", f"run_dir={args.out}/seed-{seed}", *args.overrides]
        start = time.perf_counter()
        run_dir = run(load_config(args.config, overrides))
        metrics = json.loads((run_dir / "metrics.json").read_text())
        per_seed[seed] = {"average_accuracy": metrics["average_accuracy"], "groups": metrics["groups"],
                          "wall_seconds": round(time.perf_counter() - start, 1),
                          "ensemble_overhead_percent": metrics["flops"]["ensemble_overhead_percent"]}
        print(f"seed {seed}: " + ", ".join(f"{m} {metrics['average_accuracy'][m]:.3f}" for m in METHODS),
              file=sys.stderr, flush=True)

    acc = {m: np.array([per_seed[s]["average_accuracy"][m] for s in args.seeds]) for m in METHODS}
    gain = acc["ensemble"] - acc["single_adapter"]
    result = {
        "seeds": args.seeds,
        "sizes": {"train": args.train_size, "validation": args.validation_size, "test": args.test_size,
                  "epochs": args.epochs},
        "per_seed": per_seed,
        "mean_accuracy": {m: float(v.mean()) for m, v in acc.items()},
        "std_accuracy": {m: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for m, v in acc.items()},
        "ensemble_minus_single_mean": float(gain.mean()),
        "ensemble_minus_single_std": float(gain.std(ddof=1)) if len(gain) > 1 else 0.0,
        "ensemble_minus_random_mean": float((acc["ensemble"] - acc["random_groups"]).mean()),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{'method':<16} " + " ".join(f"seed {s:>3}" for s in args.seeds) + "    mean ± std")
    for m in METHODS:
        print(f"{m:<16} " + " ".join(f"{x:>8.3f}" for x in acc[m])
              + f"    {acc[m].mean():.3f} ± {result['std_accuracy'][m]:.3f}")
    print(f"ensemble - single adapter: {result['ensemble_minus_single_mean']:+.3f} ± "
          f"{result['ensemble_minus_single_std']:.3f}; ensemble - random groups: "
          f"{result['ensemble_minus_random_mean']:+.3f}")


if __name__ == "__main__":
    main()
