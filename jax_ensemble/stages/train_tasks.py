"""``jax-ensemble train``: one LoRA adapter on the train splits of some tasks, evaluated per task.

Steps: join the processes of a multi-host run (``mesh.coordinator_address``), load the
model with its int8/bf16/f32 base straight into the mesh's shardings (each process
reading only its devices' blocks of the checkpoint), attach LoRA (key = ``seed``),
tokenize the tasks' train and validation splits into tables
(:func:`jax_ensemble.data.tables.table_of_splits`), measure each task's validation
accuracy at the start (B = 0: the base model, the zero-shot accuracy), train on the mesh
(:func:`jax_ensemble.training.engine.train`, early stopping on the pooled validation
loss, checkpoints under ``out/checkpoints``, resuming a killed run, even under another
mesh: the checkpoint fingerprint leaves the mesh section out), then measure each task's
validation accuracy again. The summary is written atomically to ``out/train.json``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import datasets
import jax

from jax_ensemble.config import Config, config_to_dict
from jax_ensemble.data import load_suite, load_task, tokenize_split
from jax_ensemble.data.tables import table_of_splits
from jax_ensemble.models.loading import load_pretrained
from jax_ensemble.models.lora import apply_lora, split_lora
from jax_ensemble.stages.adapters import adapter_fingerprint
from jax_ensemble.storage.atomic import atomic_write_json
from jax_ensemble.training.engine import Evaluator, train
from jax_ensemble.training.losses import classification_objective
from jax_ensemble.training.mesh import check_batch_fits, initialize_distributed, leaf_sharding, make_mesh


def adapter_on_tasks(config: Config, task_refs: Sequence[str] | None, out: str | Path, *,
                     progress: bool = True) -> dict[str, Any]:
    """Train one adapter on ``task_refs`` (default: the config's suite); return the summary
    (``per_task_accuracy``, ``zero_shot_accuracy``, ``checkpoint``, ...)."""
    initialize_distributed(config.mesh)
    mesh = make_mesh(config.mesh)
    check_batch_fits(config.training, mesh)
    datasets.disable_progress_bars()
    out = Path(out)
    tasks = [load_task(ref, config.tasks) for ref in task_refs] if task_refs else load_suite(config.tasks)
    model, tokenizer = load_pretrained(
        config.model.source, base_dtype=config.model.base_dtype, compute_dtype=config.model.compute_dtype,
        kernels=config.model.kernels, sharding=leaf_sharding(mesh),
    )
    apply_lora(model, config.lora, jax.random.key(config.seed))
    graphdef, lora, base = split_lora(model)
    del model

    def table(split: str, chosen) -> dict:
        splits = [tokenize_split(t, split, tokenizer, config.tasks.max_length) for t in chosen]
        return table_of_splits(splits, pad_id=tokenizer.pad_id, max_length=config.tasks.max_length)

    train_rows = table("train", tasks)
    validation = {t.name: table("validation", [t]) for t in tasks}
    objective = classification_objective(graphdef)
    evaluator = Evaluator(objective, base, mesh, config.training.eval_batch_size)
    zero_shot = {name: evaluator(lora, rows)["accuracy"] for name, rows in validation.items()}
    start = time.perf_counter()
    result = train(
        objective, lora, evaluator.base, train_rows, config.training, mesh, seeds=[config.seed],
        validation=table("validation", tasks), dropout=config.lora.dropout > 0, run_dir=out, progress=progress,
        fingerprint=adapter_fingerprint(config, [t.name for t in tasks]),
    )
    seconds = time.perf_counter() - start
    after = {name: evaluator(result.lora, rows) for name, rows in validation.items()}
    summary = {
        "tasks": [t.name for t in tasks],
        "per_task_accuracy": {name: r["accuracy"] for name, r in after.items()},
        "per_task_loss": {name: r["loss"] for name, r in after.items()},
        "zero_shot_accuracy": zero_shot,
        "validation_examples": {name: r["examples"] for name, r in after.items()},
        "train_examples": int(len(train_rows["label"])),
        "steps": result.step,
        "stopped_early": result.stopped_early,
        "train_seconds": round(seconds, 2),
        "checkpoint": str(result.checkpoint),
        "metrics": str(out.absolute() / "metrics.jsonl"),
        "mesh": dict(mesh.shape),
        "processes": jax.process_count(),
        "config": config_to_dict(config),
    }
    if jax.process_index() == 0:
        atomic_write_json(out / "train.json", summary)
    return summary
