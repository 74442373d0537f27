"""Adding a task to a finished run against recomputing the whole run: groups, accuracies, wall time.

1. ``jax-ensemble add-tasks --run RUN TASK --json`` (a subprocess: the model load and the
   warm start's restore count): the new task's gradients and subsets, one group retrained,
   weights refit;
2. ``jax-ensemble run`` from scratch on the run's recorded config with the suite extended by
   TASK (the suite file add-tasks wrote), in ``<out>`` (default ``RUN-plus-TASK``): every
   stage recomputed (warm start, gradients of every task, subsets, SDP, every adapter).

Both with the persistent compilation cache off, each timed as a whole process (imports and
the model load included); ``RUN/added`` is deleted first, so add-tasks starts from nothing.
Prints the groups of each, the per-task
test accuracy of the ensemble, the averages over all tasks and the wall-time ratio
(from scratch / add-tasks). A finished from-scratch run in ``<out>`` is reused with its
recorded time (``scratch-seconds.json``), so the benchmark resumes.

    .venv/bin/python benchmarks/add_tasks.py --run runs/default --task hyperbaton [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml


def cli(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "JAX_ENSEMBLE_COMPILATION_CACHE": "0"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "jax_ensemble.cli", *args], capture_output=True, text=True, env=env)
    if result.returncode:
        sys.exit(f"jax-ensemble {args[0]} failed:\n{result.stderr[-3000:]}")
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished run's directory")
    parser.add_argument("--task", required=True, help="the task to add (built-in name or spec file)")
    parser.add_argument("--out", default=None, help="the from-scratch run's directory (default RUN-plus-TASK)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    run_dir = Path(args.run)
    out = Path(args.out or f"{run_dir}-plus-{Path(args.task).stem}")

    shutil.rmtree(run_dir / "added", ignore_errors=True)  # add-tasks from nothing: no retrained adapter to restore
    added_run, added_seconds = cli("add-tasks", "--run", str(run_dir), args.task, "--json")
    added = json.loads(added_run.stdout)

    timing = out / "scratch-seconds.json"
    if not timing.is_file():
        config = json.loads((run_dir / "config.json").read_text())["config"]
        config["run_dir"] = str(out)
        config["tasks"]["suite"] = str(Path(added["directory"]) / "suite.yaml")
        out.mkdir(parents=True, exist_ok=True)
        (out / "scratch-config.yaml").write_text(yaml.safe_dump(config))
        _, seconds = cli("run", "--config", str(out / "scratch-config.yaml"))
        timing.write_text(json.dumps({"seconds": seconds, "load_average_1min": os.getloadavg()[0]}))
    scratch = json.loads((out / "metrics.json").read_text())
    scratch_seconds = round(json.loads(timing.read_text())["seconds"], 1)

    run = json.loads((run_dir / "metrics.json").read_text())
    tasks = added["tasks"]
    result = {
        "run": str(run_dir), "task": args.task, "from_scratch_dir": str(out),
        "add_tasks_seconds": round(added_seconds, 1), "add_tasks_stage_seconds": added["seconds"],
        "from_scratch_seconds": scratch_seconds, "cheaper": round(scratch_seconds / added_seconds, 2),
        "groups": {"run": run["groups"], "add_tasks": added["groups"], "from_scratch": scratch["groups"]},
        "same_groups": sorted(map(sorted, added["groups"])) == sorted(map(sorted, scratch["groups"])),
        "placement": added["placement"],
        "accuracy": {"add_tasks": added["per_task_accuracy"]["ensemble"],
                     "from_scratch": scratch["per_task_accuracy"]["ensemble"],
                     "zero_shot": scratch["per_task_accuracy"]["zero_shot"]},
        "average_accuracy": {"run": run["average_accuracy"]["ensemble"], "add_tasks": added["average_accuracy"],
                             "from_scratch": scratch["average_accuracy"]["ensemble"]},
        "load_average_1min": os.getloadavg()[0], "cpu_count": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"adding {args.task} to {run_dir}: add-tasks {added_seconds:.0f} s, from scratch {scratch_seconds:.0f} s "
          f"({result['cheaper']:.1f}x)")
    for way in ("run", "add_tasks", "from_scratch"):
        print(f"  groups ({way}): " + " | ".join(", ".join(g) for g in result["groups"][way]))
    print(f"  same groups: {result['same_groups']}")
    print("  per-task ensemble accuracy (add-tasks / from scratch / zero-shot):")
    for name in tasks:
        print(f"    {name:24s} {result['accuracy']['add_tasks'][name]:.3f} / "
              f"{result['accuracy']['from_scratch'][name]:.3f} / {result['accuracy']['zero_shot'][name]:.3f}")
    avg = result["average_accuracy"]
    print(f"  average: run {avg['run']:.3f} ({len(tasks) - 1} tasks); add-tasks {avg['add_tasks']:.3f}, "
          f"from scratch {avg['from_scratch']:.3f} ({len(tasks)} tasks)")
    print(f"  (load average {result['load_average_1min']:.1f} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
