"""Can the affinity see a planted conflict? Twin-pair affinities per score and λ, from one gradient stage.

A planted twin (:data:`jax_ensemble.data.offline.PLANTED_CONFLICTS`) has its source task's
prompts with other answers, so training on both can only hurt either. This runs (or reuses)
the config's gradient stage, then for each λ and affinity score (minus the validation loss,
or the accuracy) solves the config's sampled subsets and prints, per twin pair:

- the source's estimated validation accuracy over subsets with and without its twin;
- the pair's affinity (the larger of T[a, b], T[b, a]) against the mean and the minimum
  affinity of the pairs that are not twins (the planted-conflict criterion: below the mean);
- whether the SDP (``clustering.num_groups`` groups) puts every twin pair apart.

``--subsample TRAIN VALIDATION DIM --repeats R`` repeats the check R times on random
subsets of each task's rows and the first DIM projected coordinates (rescaled by √(d/DIM):
a d-column Rademacher P restricted to DIM columns is a DIM-column one up to that scale),
with a new subset draw each time, and counts how often each criterion holds: how small a
run can still see the conflict (tests/test_planted_conflict.py runs at 80 / 40 / 400).

    .venv/bin/python benchmarks/planted_affinity.py [--config planted_conflict] [--l2 300 30]
        [--tasks T ...] [--subsample 80 40 400 --repeats 10] [--json] [key=value ...]

Minutes on a 2-core CPU when the gradient stage is cached; the stage itself is the main
job's (about 8 minutes for the planted_conflict suite).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Any, Mapping

import numpy as np

from jax_ensemble.cli import configure_logging
from jax_ensemble.config import Config, load_config
from jax_ensemble.core import affinity, clustering
from jax_ensemble.data.offline import PLANTED_CONFLICTS
from jax_ensemble.stages.gradients import SplitGradients, gradient_stage, load_gradients
from jax_ensemble.stages.grouping import estimate_stacked, stack_tasks

SCORES = ("loss", "accuracy")


def twin_index(names: tuple[str, ...]) -> list[tuple[int, int]]:
    """(source, twin) index pairs of the planted twins present in ``names``."""
    return [(names.index(PLANTED_CONFLICTS[n]), i) for i, n in enumerate(names) if PLANTED_CONFLICTS.get(n) in names]


def conflict_check(config: Config, gradients: Mapping[str, Mapping[str, SplitGradients]], l2: float,
                   subset_seed: int) -> dict[str, Any]:
    """Per score: twin affinities, non-twin mean / min, below-mean and separated flags, and
    the sources' estimated accuracy with / without their twin in the subset."""
    data = stack_tasks(gradients)
    names, n = data.names, len(data.names)
    pairs = twin_index(names)
    size = affinity.subset_size(n, config.affinity.subset_fraction)
    subsets = affinity.sample_subsets(n, min(config.affinity.num_subsets, math.comb(n, size)),
                                      fraction=config.affinity.subset_fraction, seed=subset_seed)
    est = estimate_stacked(data, subsets, config, l2=l2)
    twin_cells = {(a, b) for a, b in pairs} | {(b, a) for a, b in pairs}
    other = ~np.eye(n, dtype=bool)
    for cell in twin_cells:
        other[cell] = False
    out: dict[str, Any] = {"accuracy_with_without_twin": {}}
    for a, b in pairs:
        with_twin = subsets[:, a] & subsets[:, b]
        without = subsets[:, a] & ~subsets[:, b]
        out["accuracy_with_without_twin"][names[a]] = [float(est.accuracy[with_twin, a].mean()),
                                                       float(est.accuracy[without, a].mean())]
    for score in SCORES:
        matrix = affinity.affinity_matrix(-est.loss if score == "loss" else est.accuracy, subsets)
        twin = {names[b]: float(max(matrix[a, b], matrix[b, a])) for a, b in pairs}
        labels = clustering.cluster(matrix, method="sdp", num_groups=config.clustering.num_groups,
                                    solver=config.clustering.solver, seed=config.seed).labels
        mean = float(matrix[other].mean())
        out[score] = {"twin_affinity": twin, "non_twin_mean": mean, "non_twin_min": float(matrix[other].min()),
                      "all_below_mean": all(v < mean for v in twin.values()),
                      "all_separated": bool(all(labels[a] != labels[b] for a, b in pairs))}
    return out


def subsample(gradients: Mapping[str, Mapping[str, SplitGradients]], sizes: dict[str, int], dim: int,
              rng: np.random.Generator) -> dict[str, dict[str, SplitGradients]]:
    """Random ``sizes[split]`` rows of every task's split and the first ``dim`` projected
    coordinates, scaled by √(d/dim)."""
    out: dict[str, dict[str, SplitGradients]] = {}
    for task, splits in gradients.items():
        out[task] = {}
        for split, part in splits.items():
            d = part.grads.shape[-1]
            rows = rng.choice(len(part.f0), size=min(sizes[split], len(part.f0)), replace=False)
            out[task][split] = dataclasses.replace(part, grads=part.grads[rows][..., :dim] * np.sqrt(d / dim),
                                                   f0=part.f0[rows], labels=part.labels[rows])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="planted_conflict")
    parser.add_argument("--l2", type=float, nargs="+", default=None, help="default: the config's affinity.l2")
    parser.add_argument("--subsample", type=int, nargs=3, metavar=("TRAIN", "VALIDATION", "DIM"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tasks", nargs="+", help="only these tasks of the suite (default: all)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    configure_logging("info")  # stage lines and progress (one line per tenth in a log file) on stderr
    config = load_config(args.config, args.overrides)
    gradients = load_gradients(gradient_stage(config))
    if args.tasks:
        missing = sorted(set(args.tasks) - set(gradients))
        if missing:
            sys.exit(f"error: not in the suite {config.tasks.suite!r}: {', '.join(missing)}")
        gradients = {t: gradients[t] for t in args.tasks}
    if not twin_index(tuple(gradients)):
        sys.exit("error: the suite has no planted twin beside its source task (see the planted_conflict suite)")
    result: dict[str, Any] = {"config": args.config, "overrides": args.overrides, "l2": {}}
    for l2 in args.l2 or [config.affinity.l2]:
        if args.subsample is None:
            result["l2"][l2] = conflict_check(config, gradients, l2, config.affinity.seed)
            continue
        train, validation, dim = args.subsample
        rng = np.random.default_rng(0)
        runs = [conflict_check(config, subsample(gradients, {"train": train, "validation": validation}, dim, rng),
                               l2, seed) for seed in range(args.repeats)]
        result["l2"][l2] = {score: {key: sum(r[score][key] for r in runs) for key in ("all_below_mean", "all_separated")}
                            for score in SCORES}
        result["subsample"] = {"train": train, "validation": validation, "dim": dim, "repeats": args.repeats}
    if args.json:
        print(json.dumps(result))
        return
    for l2, check in result["l2"].items():
        print(f"== λ = {l2:g}")
        if args.subsample is not None:
            for score in SCORES:
                c = check[score]
                print(f"  {score:<8}: twins below the non-twin mean in {c['all_below_mean']}/{args.repeats}, "
                      f"all twins apart in {c['all_separated']}/{args.repeats}")
            continue
        for task, (with_twin, without) in check["accuracy_with_without_twin"].items():
            print(f"  {task:<22} estimated accuracy with its twin {with_twin:.3f}, without {without:.3f}")
        for score in SCORES:
            c = check[score]
            twins = ", ".join(f"{t} {v:+.2f}" for t, v in c["twin_affinity"].items())
            print(f"  {score:<8}: twins {twins}; non-twin mean {c['non_twin_mean']:+.2f} (min {c['non_twin_min']:+.2f}); "
                  f"below mean: {c['all_below_mean']}; apart in the SDP groups: {c['all_separated']}")


if __name__ == "__main__":
    main()
