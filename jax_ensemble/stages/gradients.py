"""The gradient stage: G (n × d) and base outputs f0 for every train and validation example
of a task suite, as checksummed shards plus a manifest.

Layout under ``<run_dir>/gradients/<digest of the settings>/``: one safetensors shard per
``shard_examples`` examples of a task's split, ``<task>/<split>-<i>.safetensors`` (arrays
``grads`` (n, d) or (n, K, d), ``f0`` (n,) or (n, K) (K > 2: logits minus class 0's, so
column 0 is 0), ``label`` (n,), ``example`` (n,) split indices), each followed by
``<shard>.sha256``; ``manifest.json`` (model, LoRA config,
projector, feature space, strategy, dtype, shard list with checksums, and ``timing``: the
wall seconds of the call that computed ``timed_shards`` of the ``shards``) is written last,
with its own ``manifest.json.sha256`` (:func:`jax_ensemble.storage.atomic.write_verified`).
A rerun skips every shard whose checksum file matches, so a killed run resumes and a
corrupt shard is recomputed; the same settings give byte-identical shards.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import safetensors.numpy
from flax import nnx
from jax.sharding import Mesh

from jax_ensemble.config import Config
from jax_ensemble.core.batch import Table
from jax_ensemble.core.linearize import forward_flops, resolve_strategy
from jax_ensemble.core.projection import Projector, make_projector
from jax_ensemble.data import load_suite, tokenize_split
from jax_ensemble.data.tables import eval_batch_count, eval_batches, num_rows, table_of_splits
from jax_ensemble.errors import CheckpointError, DataError, NumericalError
from jax_ensemble.kernels.backend import resolve_kernels
from jax_ensemble.models.lora_gradients import batch_gradients, feature_metadata, lora_feature_split, lora_output_fn
from jax_ensemble.stages.model import RunModel, load_run_model
from jax_ensemble.storage.atomic import marker_path, read_verified, read_verified_json, write_verified, write_verified_json
from jax_ensemble.storage.digests import sha256_hex, stage_dir
from jax_ensemble.storage.processes import on_writer
from jax_ensemble.training.mesh import BATCH_AXES, check_rows_fit, make_mesh, put_batch, put_tree, to_host
from jax_ensemble.training.progress import Progress

GRADIENT_SPLITS = ("train", "validation")
# v2: K > 2 outputs are logits relative to class 0 (v1 stored the K logits)
GRADIENT_FORMAT = "jax-ensemble-gradients-v2"


@dataclasses.dataclass(frozen=True)
class SplitGradients:
    """One split of one task: G (n, d) or (n, K, d), f0 (n,) or (n, K), labels (n,)."""

    grads: np.ndarray
    f0: np.ndarray
    labels: np.ndarray


def gradient_settings(config: Config) -> dict[str, Any]:
    """Everything that determines G and f0 (hashed into the stage's directory name)."""
    settings = {
        "model": config.model.cache_identity(),
        "lora": dataclasses.asdict(config.lora),
        "lora_init_seed": config.seed,
        "tasks": dataclasses.asdict(config.tasks),
        "projection": {k: getattr(config.gradients, k) for k in ("dim", "kind", "seed", "block_rows")},
        "strategy": config.gradients.strategy,
        "batch_size": config.gradients.batch_size,
        "shard_examples": config.gradients.shard_examples,
        "dtype": "float32",
        "format": GRADIENT_FORMAT,
    }
    if config.training.warm_start_steps:  # θ0 is a trained adapter: what trained it determines G and f0
        settings["warm_start"] = config.training.identity()
    return settings


def stage_projector(config: Config, features: Any, mesh: Mesh | None = None) -> Projector:
    """The stage's projector P for the feature leaves ``features`` (regenerated from the
    config's seed, kind and block size: the P that ``lift`` needs to map ŵ back to θ0 + P·ŵ);
    with ``mesh``, gradients' examples split over its (data, fsdp) axes."""
    gc = config.gradients
    return make_projector(features, gc.dim, seed=gc.seed, kind=gc.kind, block_rows=gc.block_rows,
                          kernels=resolve_kernels(config.model.kernels, "projection"), mesh=mesh,
                          batch_axes=BATCH_AXES)


def gradients_dir(config: Config) -> Path:
    """``<run_dir>/gradients/<digest of gradient_settings>``."""
    return stage_dir(config.resolved_run_dir(), "gradients", gradient_settings(config))


def _check_finite(grads: np.ndarray, f0: np.ndarray, task: str, split: str, examples: np.ndarray) -> None:
    bad = ~(np.isfinite(grads).reshape(len(grads), -1).all(axis=1) & np.isfinite(f0).reshape(len(f0), -1).all(axis=1))
    if bad.any():
        raise NumericalError(
            f"task {task!r} ({split}): NaN/inf in the outputs or projected gradients of {int(bad.sum())} "
            f"example(s) (first: #{int(examples[bad][0])}); try model.base_dtype=float32 / "
            "model.compute_dtype=float32 or check those prompts"
        )


def _shard_bytes(grads: np.ndarray, f0: np.ndarray, labels: np.ndarray, examples: np.ndarray) -> bytes:
    return safetensors.numpy.save(
        {"grads": grads, "f0": f0, "label": labels, "example": examples.astype(np.int32)},
        metadata={"format": GRADIENT_FORMAT},
    )


def table_gradients(
    table: Table,
    num_classes: int,
    *,
    graphdef: nnx.GraphDef,
    features: nnx.State,
    fixed: nnx.State,
    base_state: nnx.State,
    projector: Projector,
    config: Config,
    mesh: Mesh,
    strategies: dict[int, str],
    on_batch: Callable[[], None] = lambda: None,
) -> tuple[np.ndarray, np.ndarray]:
    """(f0 (n,) or (n, K), G (n, d) or (n, K, d)) of every row of ``table`` (the output of
    :func:`~jax_ensemble.models.lora_gradients.lora_output_fn`, K = ``num_classes``), batch by
    batch on ``mesh`` with the config's gradient settings. ``strategies`` caches the
    reverse/forward choice per sequence length across calls; ``on_batch`` after each batch."""
    gc = config.gradients
    output = lora_output_fn(graphdef)
    split_batch = sum(mesh.shape[a] > 1 for a in BATCH_AXES) > 1  # examples over two mesh axes
    n = num_rows(table)
    out_shape = (n,) if num_classes == 2 else (n, num_classes)
    grads = np.zeros(out_shape + (gc.dim,), np.float32)
    f0 = np.zeros(out_shape, np.float32)
    for batch, index in eval_batches(table, gc.batch_size):
        t = batch["input_ids"].shape[1]
        if t not in strategies:
            strategies[t] = resolve_strategy(
                gc.strategy,
                projector=projector,
                out_shape=jax.eval_shape(output, features, fixed, base_state, batch).shape,
                flops_fn=lambda: forward_flops(output, features, fixed, base_state, batch),
                direction_chunk=gc.direction_chunk,
                memory_budget_bytes=gc.memory_budget_mb * 2**20,
            )
        bf0, bg = to_host(batch_gradients(features, fixed, base_state, put_batch(batch, mesh), graphdef=graphdef,
                                          projector=projector, strategy=strategies[t],
                                          direction_chunk=gc.direction_chunk, separate_outputs=split_batch))
        real = index >= 0
        f0[index[real]] = bf0[real]
        grads[index[real]] = bg[real]
        on_batch()
    return f0, grads


def gradients_at(config: Config, graphdef: nnx.GraphDef, lora0: nnx.State, base_state: nnx.State, mesh: Mesh, *,
                 on_batch: Callable[[], None] = lambda: None) -> Callable[[Table, int], tuple[np.ndarray, np.ndarray]]:
    """``f(table, num_classes) -> (f0, G)``: :func:`table_gradients` at the LoRA state
    ``lora0`` (its feature leaves, :func:`lora_feature_split`) with the stage's projector
    (:func:`stage_projector`), the states placed on ``mesh`` once and the reverse/forward
    choice cached across calls: the gradient stage's rows for tables outside it."""
    features, fixed, _ = lora_feature_split(lora0)
    projector = stage_projector(config, features, mesh)
    base_state, features, fixed = (put_tree(t, mesh) for t in (base_state, features, fixed))
    strategies: dict[int, str] = {}
    return lambda table, num_classes: table_gradients(
        table, num_classes, graphdef=graphdef, features=features, fixed=fixed, base_state=base_state,
        projector=projector, config=config, mesh=mesh, strategies=strategies, on_batch=on_batch)


def gradient_stage(config: Config, *, progress: bool = True, model: RunModel | None = None) -> Path:
    """Projected gradients G and base outputs f0 of every train and validation example of
    the suite, written as checksummed shards ``<task>/<split>-<i>.safetensors`` (+ ``.sha256``)
    and, last, ``manifest.json``. Finished shards are skipped, so a killed run resumes; a
    shard failing its checksum is recomputed. ``model``: the run's loaded model (loaded here
    when not given). Returns the stage directory."""
    started = time.perf_counter()
    out_dir = gradients_dir(config)
    tasks = load_suite(config.tasks)
    if not tasks:
        raise DataError(f"the task suite {config.tasks.suite!r} is empty")
    gc = config.gradients
    model = model or load_run_model(config, sanity_check=False)
    graphdef, lora_state, base_state, tokenizer = model.graphdef, model.lora0, model.base, model.tokenizer
    features, fixed, space = lora_feature_split(lora_state)
    mesh = make_mesh(config.mesh)
    projector = stage_projector(config, features, mesh)
    check_rows_fit(gc.batch_size, mesh, "gradients.batch_size")
    # the base by the partition rules, the (small) LoRA features replicated or split by the same
    # rules, each batch's examples over (data, fsdp); G comes back gathered on the host
    base_state, features, fixed = (put_tree(t, mesh) for t in (base_state, features, fixed))
    max_length = config.tasks.max_length
    shard_rows = -(-gc.shard_examples // gc.batch_size) * gc.batch_size

    plan = []  # (task, split, tokenized, shard index, rows)
    for task in tasks:
        for split in GRADIENT_SPLITS:
            tokenized = tokenize_split(task, split, tokenizer, max_length)
            n = len(tokenized.prompts)
            if n == 0:
                raise DataError(f"task {task.name!r} has an empty {split} split")
            for i, start in enumerate(range(0, n, shard_rows)):
                plan.append((task, split, tokenized, i, np.arange(start, min(start + shard_rows, n))))

    def shard_path(task_name: str, split: str, i: int) -> Path:
        return out_dir / task_name / f"{split}-{i:05d}.safetensors"

    # process 0 decides which shards are missing; every process computes those (SPMD)
    missing = on_writer(lambda: [read_verified(shard_path(p[0].name, p[1], p[3])) is None for p in plan])
    todo = [p for p, m in zip(plan, missing) if m]
    sub_splits = {id(p): dataclasses.replace(
        p[2], prompts=tuple(p[2].prompts[j] for j in p[4]), labels=p[2].labels[p[4]]) for p in todo}
    tables = {id(p): table_of_splits([sub_splits[id(p)]], pad_id=tokenizer.pad_id, max_length=max_length) for p in todo}
    total = sum(eval_batch_count(tables[id(p)], gc.batch_size) for p in todo)
    strategies: dict[int, str] = {}
    bar = Progress(total, "gradients", "batch", enabled=progress)
    for p in todo:
        task, split, _, i, rows = p
        sub = sub_splits[id(p)]
        f0, grads = table_gradients(tables[id(p)], task.num_classes, graphdef=graphdef, features=features, fixed=fixed,
                                    base_state=base_state, projector=projector, config=config, mesh=mesh,
                                    strategies=strategies, on_batch=lambda: bar.update(1))
        _check_finite(grads, f0, task.name, split, rows)
        data = _shard_bytes(grads, f0, sub.labels.astype(np.int32), rows)
        write_verified(shard_path(task.name, split, i), data)
    bar.close()

    timing = {"seconds": round(time.perf_counter() - started, 2), "timed_shards": len(todo), "shards": len(plan)}

    def write_manifest() -> None:  # process 0: settings, timing and every shard's file and checksum
        previous = read_verified_json(out_dir / "manifest.json")
        manifest = {
            "format": GRADIENT_FORMAT,
            "timing": previous.get("timing", timing) if not todo and previous is not None else timing,
            "settings": gradient_settings(config),
            "architecture": dataclasses.asdict(model.architecture),
            "projector": projector.metadata(),
            **feature_metadata(space, features),
            "output": "binary: log-odds z_gold - z_other of the label-word logits (n,); K > 2: the K logits minus class 0's "
                      "(n, K), column 0 zero (K - 1 backward passes)",
            "strategies_by_length": {str(t): s for t, s in sorted(strategies.items())},
            "tasks": [
                {
                    "name": task.name,
                    "num_classes": task.num_classes,
                    "splits": {
                        split: [
                            {"file": str(shard_path(task.name, split, i).relative_to(out_dir)), "examples": len(rows),
                             "sha256": marker_path(shard_path(task.name, split, i)).read_text().strip()}
                            for (t2, s2, _, i, rows) in plan if t2 is task and s2 == split
                        ]
                        for split in GRADIENT_SPLITS
                    },
                }
                for task in tasks
            ],
        }
        write_verified_json(out_dir / "manifest.json", manifest)

    on_writer(write_manifest)
    return out_dir


def load_gradients(directory: str | Path) -> dict[str, dict[str, SplitGradients]]:
    """``{task: {split: SplitGradients}}`` from a finished stage directory, verifying every
    shard's checksum (CheckpointError names the shard to delete or recompute)."""
    directory = Path(directory)
    manifest = read_verified_json(directory / "manifest.json")
    if manifest is None:
        raise CheckpointError(f"{directory} has no verified manifest.json: run `jax-ensemble gradients` to finish "
                              "the stage")
    result: dict[str, dict[str, SplitGradients]] = {}
    for task in manifest["tasks"]:
        result[task["name"]] = {}
        for split, shards in task["splits"].items():
            parts = []
            for shard in shards:
                data = (directory / shard["file"]).read_bytes()
                if sha256_hex(data) != shard["sha256"]:
                    raise CheckpointError(f"gradient shard {directory / shard['file']} fails its checksum: "
                                          "rerun `jax-ensemble gradients` to recompute it")
                parts.append(safetensors.numpy.load(data))
            result[task["name"]][split] = SplitGradients(
                grads=np.concatenate([p["grads"] for p in parts]),
                f0=np.concatenate([p["f0"] for p in parts]),
                labels=np.concatenate([p["label"] for p in parts]),
            )
    return result
