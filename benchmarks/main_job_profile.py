"""Where a finished main job's time went: per stage, per adapter (optimizer steps against
in-training evaluations), and the arithmetic rate the CPU sustained in each.

Reads ``<run_dir>/metrics.json`` (``stage_seconds``) and every adapter's ``metrics.jsonl``
(per-step wall seconds, the step that evaluated marked by ``val_loss``), and prices the
work with the project's analytical accounting (:mod:`jax_ensemble.stages.accounting`: the
decoder's matmuls, backward = 2 × forward) on the run's own shapes: one training step
(``training.batch_size`` rows at the table's width) and the test table in inference batches
(``tasks.batch_size`` rows cut to their bucket length). XLA's own cost analysis is no use
here: it counts the body of the scan over layers once. Achieved FLOP/s = FLOPs / measured
seconds; the gap to the machine's peak is what a faster kernel could still win, the padded
share of the tokens what finer batching could.

    .venv/bin/python benchmarks/main_job_profile.py --config default [--run-dir runs/default] [--json]

Seconds of compilation are inside the first step and the first batch of each shape.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import median
from typing import Any

from jax_ensemble.config import load_config
from jax_ensemble.data import load_suite
from jax_ensemble.data.batching import bucket_lengths
from jax_ensemble.data.tables import eval_batches
from jax_ensemble.stages import accounting
from jax_ensemble.stages.adapters import suite_tables
from jax_ensemble.stages.model import load_run_model


def adapter_times(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Per adapter: steps, their seconds (first step, which compiles, apart), evaluations."""
    out = {}
    for path in sorted(run_dir.glob("adapters/*/metrics.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        evals = [r for r in records if "val_loss" in r]
        plain = [r["seconds"] for r in records[1:] if "val_loss" not in r]
        out[path.parent.name] = {"steps": len(records), "seconds": round(sum(r["seconds"] for r in records), 1),
                                 "first_step_seconds": records[0]["seconds"],
                                 "median_step_seconds": median(plain) if plain else None,
                                 "evaluations": len(evals),
                                 "evaluation_step_seconds": round(sum(r["seconds"] for r in evals), 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    config = load_config(args.config, [*args.overrides, *([f"run_dir={args.run_dir}"] if args.run_dir else [])])
    run_dir = config.resolved_run_dir()
    stages = json.loads((run_dir / "metrics.json").read_text())["stage_seconds"]
    adapters = adapter_times(run_dir)

    model = load_run_model(config, sanity_check=False)
    arch = model.architecture
    tables = suite_tables(config, model.tokenizer, [t.name for t in load_suite(config.tasks)])
    tc = config.training
    width = tables["train"]["input_ids"].shape[1]
    train_flops = (1 + accounting.BACKWARD_FACTOR) * accounting.forward_flops(arch, tc.batch_size, width)
    train_step_seconds = median([a["median_step_seconds"] for a in adapters.values() if a["median_step_seconds"]])

    real = padded = 0
    for batch, rows in eval_batches(tables["test"], config.tasks.batch_size):
        real += int(batch["attention_mask"][rows >= 0].sum())
        padded += batch["input_ids"].shape[1] * config.tasks.batch_size
    result = {
        "stage_seconds": stages,
        "adapters": adapters,
        "training_step": {"rows": tc.batch_size, "length": int(width), "flops": train_flops,
                          "median_seconds": train_step_seconds, "achieved_gflops": train_flops / train_step_seconds / 1e9,
                          "real_token_share": float(tables["train"]["attention_mask"].mean())},
        "inference": {"buckets": list(bucket_lengths(width)), "test_tokens_real": real, "test_tokens_computed": padded,
                      "padding_share": 1 - real / padded},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    print("| adapter | steps | seconds | first step | median step | evaluations (seconds) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, a in adapters.items():
        print(f"| {name} | {a['steps']} | {a['seconds']} | {a['first_step_seconds']:.1f} | "
              f"{a['median_step_seconds']:.2f} | {a['evaluations']} ({a['evaluation_step_seconds']}) |")
    ts, inf = result["training_step"], result["inference"]
    print(f"training step ({ts['rows']} rows x {ts['length']} tokens, {100 * ts['real_token_share']:.0f}% of them "
          f"real): {ts['flops'] / 1e9:.0f} GFLOP, median {ts['median_seconds']:.2f} s: {ts['achieved_gflops']:.0f} GFLOP/s")
    print(f"inference: test tokens {inf['test_tokens_real']:,} real of {inf['test_tokens_computed']:,} computed "
          f"({100 * inf['padding_share']:.0f}% padding) with buckets {inf['buckets']}")


if __name__ == "__main__":
    main()
