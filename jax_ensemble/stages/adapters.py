"""Adapters on chosen task sets of a suite, shared by the main job and ``validate-estimates``.

:func:`suite_tables` tokenizes the suite's splits into one table each (rows carry their
task's position in ``names`` as ``task_index``); :func:`adapters_for_plan` trains one
adapter per named task set with the training stage's settings, each with orbax
checkpoints under ``<run_dir>/adapters/<name>/`` fingerprinted by what determines it
(model, LoRA, tasks, training, seed — not the mesh or later stages' settings), so a
finished adapter is restored and a killed one resumes, whichever command asks for it.
:func:`warm_start` trains the job's θ0 when ``training.warm_start_steps`` > 0.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from jax_ensemble.config import Config, config_identity
from jax_ensemble.data import load_suite, tokenize_split
from jax_ensemble.data.tables import Table, num_rows, rows_of, table_of_splits
from jax_ensemble.models.tokenizer import Tokenizer
from jax_ensemble.training.engine import adapter_training, train
from jax_ensemble.training.losses import classification_objective
from jax_ensemble.training.mesh import make_mesh, to_host

log = logging.getLogger(__name__)


def suite_tables(config: Config, tokenizer: Tokenizer, names: Sequence[str],
                 splits: Sequence[str] = ("train", "validation", "test")) -> dict[str, Table]:
    """split → one table of every task in ``names`` (in that order) of the config's suite."""
    tasks = {t.name: t for t in load_suite(config.tasks)}
    return {
        split: table_of_splits([tokenize_split(tasks[n], split, tokenizer, config.tasks.max_length) for n in names],
                              pad_id=tokenizer.pad_id, max_length=config.tasks.max_length)
        for split in splits
    }


def adapter_fingerprint(config: Config, task_names: Sequence[str]) -> dict[str, Any]:
    """What determines an adapter, stored with its checkpoints: the model, LoRA, task data,
    training settings and seed, and the tasks it trains on (not the config's name, run
    directory, mesh or later stages' settings), so ``jax-ensemble train`` and ``run`` share
    a finished adapter and a renamed config still resumes."""
    settings = {**config_identity(config), "model": config.model.cache_identity()}
    return {"settings": {k: settings[k] for k in ("model", "lora", "tasks", "training", "seed")},
            "tasks": list(task_names)}


def warm_start(config: Config, graphdef, lora0, base, tokenizer: Tokenizer) -> Any:
    """θ0 of the job: ``lora0`` (LoRA's initialisation, B = 0), or with
    ``training.warm_start_steps`` = N > 0 that adapter trained N steps on every task's
    training rows of the suite with the training settings (checkpointed under
    ``adapters/warm-start/``, so every command of the run gets the same θ0 back)."""
    steps = config.training.warm_start_steps
    if steps == 0:
        return lora0
    names = [task.name for task in load_suite(config.tasks)]
    table = suite_tables(config, tokenizer, names, ("train",))["train"]
    log.info("warm start: LoRA's initialisation trained %d steps on all %d tasks (%d rows)", steps, len(names),
             num_rows(table))
    result = train(classification_objective(graphdef), lora0, base, table,
                   dataclasses.replace(config.training, max_steps=steps, patience=0), make_mesh(config.mesh),
                   seeds=[config.seed], dropout=config.lora.dropout > 0,
                   run_dir=config.resolved_run_dir() / "adapters" / "warm-start",
                   fingerprint={**adapter_fingerprint(config, names), "warm_start": steps}, desc="warm-start")
    return to_host(result.lora)


def wall_seconds_of(history: Sequence[dict[str, Any]]) -> float | None:
    """Wall seconds of a training run from its per-step records (steps of earlier, resumed
    invocations included); None when a record predates step timing."""
    if not all("seconds" in r for r in history):
        return None
    return float(sum(r["seconds"] for r in history))


def adapters_for_plan(config: Config, plan: dict[str, list[int]], graphdef, lora0, base, tables: dict[str, Table],
                      names: Sequence[str], *, starts: Mapping[str, tuple[str, Any]] | None = None,
                      adapters_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """Train one adapter per entry of ``plan`` (name → task indices into ``names``) on the
    rows of ``tables["train"]`` (early stopping on ``tables["validation"]``; the length of each
    follows ``training.budget`` over all of ``tables["train"]``'s rows), from ``lora0`` or,
    for a name in ``starts``, from the adapter given there as (its name, its LoRA state),
    checkpointed under ``adapters_dir`` (default ``<run_dir>/adapters``); returns
    name → {lora (host arrays), steps, rows, seconds (training wall time, None if unknown), tasks,
    validation_logits: its logits on the validation rows of its tasks (table order), from
    training's last evaluation of it, or None when restored without evaluating}."""
    mesh = make_mesh(config.mesh)
    training = adapter_training(config.training, num_rows(tables["train"]))
    out = {}
    for i, (name, task_ids) in enumerate(plan.items()):
        train_rows, validation = rows_of(tables["train"], task_ids), rows_of(tables["validation"], task_ids)
        log.info("adapter %d/%d %r: %s (%d rows)", i + 1, len(plan), name, ", ".join(names[t] for t in task_ids),
                 len(train_rows["label"]))
        start_name, start = (starts or {}).get(name, (None, lora0))
        fingerprint = adapter_fingerprint(config, [names[t] for t in task_ids])
        result = train(
            classification_objective(graphdef), start, base, train_rows, training, mesh, seeds=[config.seed],
            validation=validation, dropout=config.lora.dropout > 0,
            run_dir=(adapters_dir or config.resolved_run_dir() / "adapters") / name,
            fingerprint=fingerprint if start_name is None else {**fingerprint, "start": start_name}, desc=name,
        )
        seconds = wall_seconds_of(result.history)
        out[name] = {"lora": to_host(result.lora), "steps": result.step, "rows": int(len(train_rows["label"])),
                     "seconds": None if seconds is None else round(seconds, 2),
                     "tasks": [names[t] for t in task_ids], "validation_logits": result.validation_logits}
    return out
