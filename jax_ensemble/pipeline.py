"""The main job, stage by stage, each writing its result atomically under the run directory.

1. ``model``: load the model once for the whole run (int8/bf16/f32 base), attach LoRA,
   check that B = 0 leaves the logits unchanged, greedy-complete the sanity prompt
   (``model.json``; :func:`jax_ensemble.stages.model.load_run_model`);
2. ``grouping``: projected gradients → subset estimates → affinity → SDP groups
   (:mod:`jax_ensemble.stages.gradients`, :mod:`jax_ensemble.stages.grouping`; cached);
3. ``training``: one adapter per group, the same number of random groups, and one adapter
   on all tasks (the single-adapter baseline), each with orbax checkpoints under
   ``adapters/<name>/`` (a finished adapter is restored, a killed one resumes);
4. ``ensemble``: convex weights per task on validation logits, then boosting rounds whose
   learners train with the same engine from θ0 with B = 0 (the base model's function, as the
   boosting objective needs; checkpoints under ``adapters/boost-<r>/``, restored on a rerun);
5. ``evaluation``: per-task test accuracy of zero-shot, single adapter, random groups and
   the boosted ensemble, analytical FLOPs per stage, peak memory;
6. ``report``: ``metrics.json`` (written last), ``report.md``, ``affinity.png``,
   ``accuracy.png``, every adapter exported in PEFT format under ``peft/<name>/``, and,
   when ``jax-ensemble validate-estimates`` has run for this run's affinity stage,
   its errors and speedup plus ``estimates.png`` (estimated vs actual).

Stages 4–5 compute each logit pass once: the members' validation logits serve the weight
fit and boosting, the zero-shot test logits the boosted ensemble's base term, and every
pass is kept under ``logits/`` (:mod:`jax_ensemble.stages.logit_cache`), so a rerun or a
resumed run reads them back instead of running the network.

A multi-host job (``mesh.coordinator_address``, one process per host) runs every stage on
every process, the network passes as SPMD programs over the global mesh, meeting at a
barrier per stage; process 0 writes every file and runs the host-side solves (affinity,
SDP, ensemble weights), whose results it broadcasts (:mod:`jax_ensemble.storage.processes`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import datasets
import jax
import numpy as np
from flax import nnx

from jax_ensemble.config import Config, config_hash, config_to_dict
from jax_ensemble.core import clustering
from jax_ensemble.core import ensemble as ensemble_maths
from jax_ensemble.core.batch import Table
from jax_ensemble.core.trees import stack_trees, zeros_like_member
from jax_ensemble.data.tables import num_rows, rows_of
from jax_ensemble.models.lora import with_zero_b
from jax_ensemble.models.peft_export import export_peft_adapter
from jax_ensemble.report import write_report
from jax_ensemble.stages import accounting
from jax_ensemble.stages.adapters import adapter_fingerprint, adapters_for_plan, suite_tables
from jax_ensemble.stages.ensemble import boost_trained, ensemble_table_logits, on_mesh, stacked_table_logits
from jax_ensemble.stages.estimate_validation import find_validation
from jax_ensemble.stages.grouping import grouping_stage, load_affinity
from jax_ensemble.stages.logit_cache import LogitCache, cached
from jax_ensemble.stages.model import load_run_model
from jax_ensemble.storage.atomic import atomic_write_json
from jax_ensemble.storage.processes import barrier, is_writer, on_writer, on_writer_array
from jax_ensemble.training.engine import Evaluator, adapter_training
from jax_ensemble.training.losses import classification_objective
from jax_ensemble.training.mesh import check_rows_fit, initialize_distributed, make_mesh

log = logging.getLogger(__name__)

STAGES = ("model", "grouping", "training", "ensemble", "evaluation", "report")


class StageClock:
    """Logs ``[i/6] message`` as each stage of :data:`STAGES` starts and records every
    stage's wall seconds (``seconds``: stage → s, in order)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._running: tuple[str, float] | None = None

    def start(self, stage: str, message: str) -> None:
        self.stop()
        barrier(f"stage {stage}")  # a multi-process run enters each stage together
        log.info("[%d/%d] %s: %s", STAGES.index(stage) + 1, len(STAGES), stage, message)
        self._running = (stage, time.perf_counter())

    def stop(self) -> dict[str, float]:
        if self._running is not None:
            stage, since = self._running
            self.seconds[stage] = round(time.perf_counter() - since, 1)
            self._running = None
        return self.seconds


def per_task_accuracy(logits: np.ndarray, table: Table, names: Sequence[str]) -> dict[str, float]:
    """task name → accuracy of argmax ``logits`` (N, K) on the table's rows of that task."""
    hits = np.argmax(logits, axis=-1) == table["label"]
    return {name: float(hits[table["task_index"] == t].mean()) for t, name in enumerate(names)}


def compute_flops(config: Config, arch, tables: dict[str, Table], adapters: dict[str, dict[str, Any]],
                  affinity: dict[str, Any], inference_passes: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Analytical FLOPs per stage and the ensemble's overhead over the single adapter (percent).

    ``inference_passes``: ensemble name → adapter passes over test rows, ``routed`` (what
    runs) and ``dense`` (every member on every row; :func:`ensemble_maths.routed_passes`)."""
    fwd = {split: accounting.table_forward_flops(arch, t) for split, t in tables.items()}
    per_row = {split: fwd[split] / len(t["label"]) for split, t in tables.items()}
    gradients = accounting.BACKWARD_FACTOR * (fwd["train"] + fwd["validation"])
    train_rows = np.bincount(tables["train"]["task_index"], minlength=len(affinity["tasks"]))
    index = {name: t for t, name in enumerate(affinity["tasks"])}
    width = tables["train"]["label_token_ids"].shape[1]
    solves = accounting.affinity_solve_flops(
        affinity["solver"], [int(sum(train_rows[index[n]] for n in subset)) for subset in affinity["subsets"]],
        int(train_rows.sum()), 1 if width == 2 else width, affinity["dim"], affinity["max_iterations"])

    def fine_tuning_flops(names: Sequence[str]) -> float:
        return sum(accounting.BACKWARD_FACTOR * per_row["train"] * a["steps"] * config.training.batch_size
                   for n, a in adapters.items() if n in names)

    groups = [n for n in adapters if n.startswith("group-")]
    boosters = [n for n in adapters if n.startswith("boost-")]
    single_inference = per_row["test"] * len(tables["test"]["label"])
    inference = {name: {way: per_row["test"] * count for way, count in passes.items()}
                 for name, passes in inference_passes.items()}
    warm_start = (accounting.BACKWARD_FACTOR * per_row["train"] * config.training.warm_start_steps
                  * config.training.batch_size)  # θ0 trained first (training.warm_start_steps), for every adapter
    single_total = warm_start + fine_tuning_flops(["single"]) + single_inference
    ensemble_total = (warm_start + gradients + solves + fine_tuning_flops(groups + boosters)
                      + inference["ensemble"]["routed"])
    return {
        "warm_start": warm_start,
        "gradients": gradients,
        "affinity_solves": solves,
        "training_single_adapter": fine_tuning_flops(["single"]),
        "training_groups": fine_tuning_flops(groups),
        "training_boosting": fine_tuning_flops(boosters),
        "training_random_groups": fine_tuning_flops([n for n in adapters if n.startswith("random-")]),
        "inference_single_adapter": single_inference,
        "inference_ensemble": inference["ensemble"]["routed"],
        "inference_ensemble_dense": inference["ensemble"]["dense"],
        "inference_random_groups": inference.get("random_groups", {}).get("routed", 0.0),
        "inference_random_groups_dense": inference.get("random_groups", {}).get("dense", 0.0),
        "single_adapter_total": single_total,
        "ensemble_total": ensemble_total,
        "ensemble_overhead_percent": 100.0 * (ensemble_total / single_total - 1.0),
        "ensemble_overhead_percent_by_stage": {
            stage: 100.0 * flops / single_total for stage, flops in (
                ("gradients", gradients), ("affinity_solves", solves),
                ("training", fine_tuning_flops(groups + boosters) - fine_tuning_flops(["single"])),
                ("inference", inference["ensemble"]["routed"] - single_inference))},
    }


def run(config: Config) -> Path:
    """Run the main job for ``config``; return the run directory (printed last)."""
    initialize_distributed(config.mesh)  # a multi-host run: one process per host, process 0 writes
    run_dir = config.resolved_run_dir()
    datasets.disable_progress_bars()
    atomic_write_json(run_dir / "config.json", {"hash": config_hash(config), "config": config_to_dict(config)})
    started = time.perf_counter()

    clock = StageClock()
    clock.start("model", f"{config.model.source} with a {config.model.base_dtype} base, LoRA sanity check")
    loaded = load_run_model(config)
    summary = loaded.summary
    graphdef, lora0, base, tokenizer = loaded.graphdef, loaded.lora0, loaded.base, loaded.tokenizer
    atomic_write_json(run_dir / "model.json", summary)
    p = summary["parameters"]
    print(f"model: {config.model.source}, base {config.model.base_dtype} ({p['base_bytes'] / 2**20:.0f} MiB), "
          f"LoRA rank {config.lora.rank} on {', '.join(summary['lora_targets'])}: {p['lora_params']:,} parameters; "
          f"sanity {config.sanity_prompt!r} -> {summary['sanity_completion']!r}")

    clock.start("grouping", "projected gradients -> subset estimates -> affinity -> groups (cached stages)")
    grouping = grouping_stage(config, model=loaded)
    affinity = on_writer(lambda: load_affinity(grouping["affinity_dir"]))
    names = affinity["tasks"]
    index = {name: i for i, name in enumerate(names)}
    groups = [[index[t] for t in group] for group in grouping["groups"]]
    print(f"groups ({grouping['method']}): " + " | ".join(", ".join(g) for g in grouping["groups"]))

    clock.start("training", "one adapter per group, random groups, and one adapter on all tasks")
    tables = suite_tables(config, tokenizer, names)
    plan = {"single": list(range(len(names)))}
    plan.update({f"group-{g}": ids for g, ids in enumerate(groups)})
    random_groups: list[list[int]] = []
    if config.ensemble.random_groups:
        random_labels = clustering.cluster(np.array(affinity["affinity"]), method="random",
                                           num_groups=len(groups), seed=config.seed).labels
        random_groups = [np.flatnonzero(random_labels == g).tolist() for g in range(len(groups))]
        plan.update({f"random-{g}": ids for g, ids in enumerate(random_groups)})
    adapters = adapters_for_plan(config, plan, graphdef, lora0, base, tables, names)

    clock.start("ensemble", f"convex weights per task, {config.ensemble.boosting_steps} boosting step(s)")
    bs = config.tasks.batch_size
    val = tables["validation"]
    mesh = make_mesh(config.mesh)  # inference: base by the partition rules, rows over (data, fsdp)
    check_rows_fit(bs, mesh, "tasks.batch_size")
    base, _ = on_mesh(mesh, base)

    # every logit pass below is kept under runs/<name>/logits/, keyed by its inputs: a rerun reads it back
    cache = LogitCache(run_dir / "logits", {"model": config.model.cache_identity(), "lora": dataclasses.asdict(config.lora),
                                            "batch_size": bs, "eval_batch_size": config.training.eval_batch_size})

    def stacked_logits(stacked: Any, table: Table, progress: str) -> np.ndarray:
        return cached(cache, "stacked", stacked, table,
                      lambda: stacked_table_logits(graphdef, stacked, base, table, bs, progress=progress, mesh=mesh))

    def ensemble_logits(ensemble: ensemble_maths.Ensemble, table: Table, progress: str,
                        base_logits: np.ndarray | None = None) -> np.ndarray:
        return cached(cache, "ensemble", ensemble, table, lambda: ensemble_table_logits(
            graphdef, ensemble, base, table, bs, progress=progress, mesh=mesh, base_logits=base_logits))

    evaluator = Evaluator(classification_objective(graphdef), base, mesh, config.training.eval_batch_size)

    def validation_logits(name: str) -> np.ndarray:
        """(N, K) logits of adapter ``name`` on every validation row: its own tasks' rows from
        its training's last evaluation (or, for an adapter restored without one, from the same
        evaluation program on the same rows: the same numbers), the other rows computed here."""
        adapter = adapters[name]
        own = np.isin(val["task_index"], [index[t] for t in adapter["tasks"]])
        known, own_rows = adapter.get("validation_logits"), {k: v[own] for k, v in val.items()}
        logits = np.empty((len(own), val["label_token_ids"].shape[1]), np.float32)
        logits[own] = cached(cache, "evaluation", adapter["lora"], own_rows,
                             (lambda: known) if known is not None else lambda: evaluator(adapter["lora"], own_rows)["logits"])
        if not own.all():
            rest = {k: v[~own] for k, v in val.items()}
            logits[~own] = stacked_logits(stack_trees([adapter["lora"]]), rest, f"validation logits ({name})")[0]
        return logits

    def weighted(prefix: str, count: int) -> tuple[ensemble_maths.Ensemble, np.ndarray]:
        members = stack_trees([adapters[f"{prefix}-{g}"]["lora"] for g in range(count)])
        logits = np.stack([validation_logits(f"{prefix}-{g}") for g in range(count)])
        alpha = on_writer_array(lambda: ensemble_maths.prune_weights(ensemble_maths.fit_ensemble_weights(
            logits, val["label"], val["weight"], val["task_index"], len(names),
            per_task=config.ensemble.per_task_weights, solver=config.ensemble.weights_solver),
            config.ensemble.prune_below))
        return ensemble_maths.make_ensemble(members, alpha), logits

    grouped, group_val_logits = weighted("group", len(groups))
    unboosted = grouped  # kept for the ensemble_no_boosting row
    chosen: list[int] = []
    if config.ensemble.boosting_steps:
        boosting_training = adapter_training(config.training, num_rows(tables["train"]))
        grouped, chosen, boost_steps = boost_trained(
            graphdef, grouped, with_zero_b(lora0), base, tables["train"], groups, boosting_training, mesh,
            steps=config.ensemble.boosting_steps, step_size=config.ensemble.step_size, seed=config.seed,
            batch_size=bs, validation=val, validation_member_logits=group_val_logits,
            run_dir=run_dir / "adapters", fingerprint={**adapter_fingerprint(config, names), "groups": groups},
            progress=True, cache=cache)
        for r, g in enumerate(chosen):
            group_rows = int(np.isin(tables["train"]["task_index"], groups[g]).sum())
            adapters[f"boost-{r}"] = {"lora": jax.tree.map(lambda x: x[r], grouped.boosters),
                                      "steps": boost_steps[r], "rows": group_rows,
                                      "tasks": [names[t] for t in groups[g]]}

    clock.start("evaluation", "per-task test accuracy")
    test = tables["test"]
    single = stacked_logits(stack_trees([adapters["single"]["lora"]]), test, "test: single adapter")[0]
    zero = stacked_logits(stack_trees([zeros_like_member(stack_trees([lora0]))]), test, "test: zero-shot")[0]
    boosted = ensemble_logits(grouped, test, "test: ensemble", base_logits=zero)
    per_task = {  # the zero-shot logits are also the boosted ensemble's base term z_base
        "zero_shot": per_task_accuracy(zero, test, names),
        "single_adapter": per_task_accuracy(single, test, names),
        "ensemble": per_task_accuracy(boosted, test, names),
    }
    if chosen:  # the same groups without the boosting rounds, run on the boosted groups' rows only
        boosted_tasks = sorted({t for g in chosen for t in groups[g]})  # (the other rows: boosting adds 0)
        unboosted_logits = boosted.copy()
        unboosted_logits[np.isin(test["task_index"], boosted_tasks)] = ensemble_logits(
            unboosted, rows_of(test, boosted_tasks), "test: ensemble without boosting")
        per_task["ensemble_no_boosting"] = per_task_accuracy(unboosted_logits, test, names)
    passes = {"ensemble": ensemble_maths.routed_passes(grouped, test["task_index"])}
    if random_groups:
        random_ensemble, _ = weighted("random", len(random_groups))
        per_task["random_groups"] = per_task_accuracy(
            ensemble_logits(random_ensemble, test, "test: random groups"), test, names)
        passes["random_groups"] = ensemble_maths.routed_passes(random_ensemble, test["task_index"])
    average = {method: float(np.mean(list(acc.values()))) for method, acc in per_task.items()}
    flops = compute_flops(config, loaded.architecture, tables, adapters, affinity, passes)

    clock.start("report", "metrics.json, report.md, PNGs, PEFT adapters")
    for name, adapter in adapters.items() if is_writer() else ():
        export_peft_adapter(nnx.merge(graphdef, adapter["lora"], base), run_dir / "peft" / name,
                            base_model_name_or_path=config.model.source)
    metrics = {
        "run_name": config.name,
        "model": config.model.source,
        "base_dtype": config.model.base_dtype,
        "tasks": list(names),
        "groups": grouping["groups"],
        "grouping_method": grouping["method"],
        "grouping_info": grouping["info"],
        "affinity": affinity["affinity"],
        "random_groups": [[names[t] for t in g] for g in random_groups],
        "boosting_steps": len(chosen),
        "boosted_groups": [grouping["groups"][g] for g in chosen],
        "ensemble_weights": np.asarray(grouped.weights).tolist(),
        "per_task_accuracy": per_task,
        "average_accuracy": average,
        "flops": flops,
        "peak_memory_bytes": accounting.peak_memory_bytes(),
        "training_budget": {"rule": config.training.budget, "patience": config.training.patience,
                            "max_steps": adapter_training(config.training, num_rows(tables["train"])).max_steps},
        "adapters": {n: {k: v for k, v in a.items() if k not in ("lora", "validation_logits")} for n, a in adapters.items()},
        "test_examples": int(len(test["label"])),
        "stage_seconds": clock.stop(),  # the report stage up to here: PEFT export (metrics and PNGs follow)
        "wall_seconds": round(time.perf_counter() - started, 1),
        "config_hash": config_hash(config),
    }
    check = on_writer(lambda: find_validation(config, Path(grouping["affinity_dir"])))
    if check is not None:
        metrics["estimate_validation"] = {
            "subsets": len(check["subsets"]),
            "mean_relative_error_loss": check["mean_relative_error_loss"],
            "mean_abs_error_accuracy": check["mean_abs_error_accuracy"],
            "base_mean_relative_error_loss": check["errors"]["base"]["mean_relative_error_loss"],
            "base_mean_abs_error_accuracy": check["errors"]["base"]["mean_abs_error_accuracy"],
            "speedup": check["speedup"],
            "directory": check["directory"],
        }
    if is_writer():
        write_report(run_dir, metrics, Path(grouping["heatmap"]).read_bytes(),
                     None if check is None else Path(check["scatter_png"]).read_bytes())
    barrier("report written")
    print("wall time per stage: " + ", ".join(f"{stage} {sec:.1f} s" for stage, sec in metrics["stage_seconds"].items())
          + f"; total {metrics['wall_seconds']:.1f} s")
    print("average test accuracy: " + ", ".join(f"{m} {a:.3f}" for m, a in average.items()))
    print(f"ensemble overhead over the single adapter: {flops['ensemble_overhead_percent']:.1f}% FLOPs "
          f"(inference routed to the members each task uses: {passes['ensemble']['routed']:,} adapter passes over "
          f"test rows, {passes['ensemble']['dense']:,} dense)")
    print(f"run directory: {run_dir}")
    return run_dir

