"""Grouping at scale: the low-rank JAX SDP beside cvxpy, and the whole affinity stage at n = 100 / 500 / 1,000 tasks.

1. **The SDP.** Planted affinities (T = [same group] + noise·N(0, 1), symmetrised) and random
   ones (T ~ N(0, 1)): at n ≤ ``--cvxpy-max`` both cvxpy's CLARABEL (SCS where CLARABEL
   ends 'optimal_inaccurate', which degenerate planted instances cause) and the low-rank
   Burer–Monteiro solver (:mod:`jax_ensemble.core.lowrank_sdp`), with the relative
   objective gap (F_cvxpy − F_lowrank)/|F_cvxpy|; beyond, the low-rank solver alone,
   against the planted partition's objective (a feasible point, so the optimum's lower
   bound) and the adjusted Rand index of the rounded groups against the planted ones.
2. **The affinity stage** of n synthetic tasks (``benchmarks/solvers.py``'s projected-
   gradient-shaped features, d = ``--dim``; task t labelled by teacher t mod ``--teachers``,
   the planted groups): sample the subsets (:func:`affinity.sample_subsets`), solve all
   their regressions in one program (:func:`affinity.estimate_subsets`), form T
   (:func:`affinity.affinity_matrix`) and group it (``clustering.solver: auto``); seconds
   per step (the solve's first call includes compilation), the growth exponent of each
   step between sizes (log t / log n), and the ARI of the groups against the teachers.

Timings are wall seconds of one run on this machine; the load average is printed.

    .venv/bin/python benchmarks/grouping_scale.py [--json] [--sizes 100 500 1000] [--sdp-sizes 20 40 60 100 500 1000]
        [--subset-size 5 --subsets-per-task 50]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.metrics import adjusted_rand_score
from solvers import synthetic_gradients

from jax_ensemble.core import affinity, clustering
from jax_ensemble.errors import SolverError


def planted_affinity(num_tasks: int, num_groups: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(T (n, n) symmetric with a zero diagonal, planted labels (n,))."""
    rng = np.random.default_rng(seed)
    labels = clustering.canonical_labels(rng.integers(0, num_groups, num_tasks))
    t = (labels[:, None] == labels[None, :]) + noise * rng.normal(size=(num_tasks, num_tasks))
    t = (t + t.T) / 2
    np.fill_diagonal(t, 0)
    return t, labels


def random_affinity(num_tasks: int, seed: int) -> np.ndarray:
    t = np.random.default_rng(seed).normal(size=(num_tasks, num_tasks))
    t = (t + t.T) / 2
    np.fill_diagonal(t, 0)
    return t


def sdp_rows(sizes: list[int], cvxpy_max: int, noise: float, report: Callable[[dict], None]) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        m = max(3, n // 50)
        planted_t, planted = planted_affinity(n, m, noise, seed=n)
        for kind, t in (("planted", planted_t), ("random", random_affinity(n, seed=n))):
            if kind == "random" and n > cvxpy_max:
                continue
            x, info = clustering.sdp_cluster_matrix(t, m, solver=clustering.LOWRANK_SOLVER)
            labels = clustering.round_similarity(x, m)
            row = {"kind": kind, "tasks": n, "groups": m, "lowrank_seconds": info["solve_seconds"],
                   "lowrank_objective": info["objective"], "infeasibility": info["infeasibility"],
                   "outer_iterations": info["outer_iterations"], "inner_iterations": info["inner_iterations"]}
            if kind == "planted":
                row["planted_objective"] = float(np.sum(t * clustering.partition_matrix(planted)))
                row["adjusted_rand_index"] = float(adjusted_rand_score(planted, labels))
            if n <= cvxpy_max:
                try:
                    _, reference = clustering.sdp_cluster_matrix(t, m, solver="CLARABEL")
                except SolverError as error:  # CLARABEL's 'optimal_inaccurate': SCS is the reference
                    row["clarabel_failed"] = str(error)
                    _, reference = clustering.sdp_cluster_matrix(t, m, solver="SCS")
                row["cvxpy_solver"] = reference["solver"]
                row["cvxpy_seconds"] = reference["solve_seconds"]
                row["cvxpy_objective"] = reference["objective"]
                row["relative_objective_gap"] = (reference["objective"] - info["objective"]) / abs(reference["objective"])
            rows.append(row)
            report(row)
    return rows


def stage_row(num_tasks: int, args: argparse.Namespace, report: Callable[[dict], None]) -> dict[str, Any]:
    rows_per_task = args.train_rows + args.validation_rows
    g, y, task_ids = synthetic_gradients(num_tasks, rows_per_task, args.dim, seed=num_tasks, num_teachers=args.teachers)
    train = np.tile(np.arange(rows_per_task) < args.train_rows, num_tasks)
    seconds: dict[str, float] = {}

    num_subsets = math.ceil(args.subsets_per_task * num_tasks / args.subset_size)
    start = time.perf_counter()
    subsets = affinity.sample_subsets(num_tasks, num_subsets, fraction=args.subset_size / num_tasks, seed=0)
    seconds["sample_subsets"] = time.perf_counter() - start

    start = time.perf_counter()
    estimates = affinity.estimate_subsets(jnp.asarray(g), jnp.zeros(len(y)), jnp.asarray(y), task_ids, train, ~train,
                                          subsets, l2=args.l2)
    loss = np.asarray(jax.block_until_ready(estimates.loss))
    seconds["estimate_subsets"] = time.perf_counter() - start

    start = time.perf_counter()
    t = affinity.affinity_matrix(-loss, subsets)
    seconds["affinity_matrix"] = time.perf_counter() - start

    start = time.perf_counter()
    grouping = clustering.cluster(t, num_groups=args.teachers, solver="auto")
    seconds["cluster"] = time.perf_counter() - start
    teachers = np.arange(num_tasks) % args.teachers
    row = {"tasks": num_tasks, "subsets": num_subsets, "subset_size": int(subsets[0].sum()),
           "rows": len(y), "dim": args.dim, "pair_coverage": affinity.pair_coverage(subsets),
           "solver": grouping.info["solver"], "all_converged": bool(np.all(estimates.solution.converged)),
           "adjusted_rand_index": float(adjusted_rand_score(teachers, grouping.labels)),
           "seconds": {k: round(v, 4) for k, v in seconds.items()}, "total_seconds": round(sum(seconds.values()), 4)}
    report(row)
    return row


def growth(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """log(t_last / t_first) / log(n_last / n_first) of each step and the total: time ∝
    n^exponent (None for a step under 10 ms at the smallest n: timer noise)."""
    first, last = rows[0], rows[-1]
    ratio = math.log(last["tasks"] / first["tasks"])
    times = [({**r["seconds"], "total": r["total_seconds"]}) for r in (first, last)]
    return {k: round(math.log(times[1][k] / times[0][k]) / ratio, 2) if times[0][k] >= 0.01 else None
            for k in times[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 1000], help="tasks of the affinity stage")
    parser.add_argument("--sdp-sizes", type=int, nargs="+", default=[20, 40, 60, 100, 500, 1000])
    parser.add_argument("--cvxpy-max", type=int, default=60, help="largest n also solved by cvxpy")
    parser.add_argument("--noise", type=float, default=1.0, help="planted SDP instances: noise std")
    parser.add_argument("--teachers", type=int, default=5, help="planted groups of the synthetic tasks")
    parser.add_argument("--train-rows", type=int, default=20)
    parser.add_argument("--validation-rows", type=int, default=10)
    parser.add_argument("--dim", type=int, default=400)
    parser.add_argument("--subset-size", type=int, default=5, help="tasks per subset k")
    parser.add_argument("--subsets-per-task", type=int, default=50,
                        help="subsets containing each task on average: S = ceil(this * n / k)")
    parser.add_argument("--l2", type=float, default=1.0, help="lambda (the synthetic features' scale, not a model's)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    def report(row: dict) -> None:  # progress: each row as it is measured
        if not args.json:
            print(json.dumps(row), flush=True)

    sdp = sdp_rows(args.sdp_sizes, args.cvxpy_max, args.noise, report)
    stage = [stage_row(n, args, report) for n in args.sizes]
    gaps = [r["relative_objective_gap"] for r in sdp if "relative_objective_gap" in r]
    result = {"sdp": sdp, "affinity_stage": stage, "growth_exponents": growth(stage) if len(stage) > 1 else None,
              "max_relative_objective_gap": max(gaps) if gaps else None, "cpu_count": os.cpu_count(),
              "load_average_1min": os.getloadavg()[0], "platform": platform.platform(), "jax": jax.__version__}
    if args.json:
        print(json.dumps(result))
        return
    print(f"SDP: worst objective gap to cvxpy {result['max_relative_objective_gap']:.2e} (n <= {args.cvxpy_max})")
    for r in sdp:
        cvx = (f", {r['cvxpy_solver']} {r['cvxpy_seconds']:.2f} s, gap {r['relative_objective_gap']:+.1e}"
               if "cvxpy_seconds" in r else "")
        ari = f", ARI {r['adjusted_rand_index']:.3f}" if "adjusted_rand_index" in r else ""
        print(f"  {r['kind']:7s} n = {r['tasks']:5d}, m = {r['groups']:2d}: low-rank {r['lowrank_seconds']:.2f} s{cvx}{ari}")
    print("affinity stage:")
    for r in stage:
        steps = ", ".join(f"{k} {v:.2f} s" for k, v in r["seconds"].items())
        print(f"  n = {r['tasks']:5d}: {r['total_seconds']:.1f} s ({steps}); solver {r['solver']}, "
              f"ARI {r['adjusted_rand_index']:.3f}, pair coverage {r['pair_coverage']:.2f}")
    if result["growth_exponents"]:
        print("  time ~ n^k, k per step: " + ", ".join(f"{k} {v}" for k, v in result["growth_exponents"].items()))
    print(f"  (load average {result['load_average_1min']:.1f} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
