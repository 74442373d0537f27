"""The linearization-error study: how well f_lin(θ) = f(θ0) + ⟨∇f(θ0), θ − θ0⟩ predicts the
fine-tuned output f(θ) as LoRA fine-tuning moves θ away from θ0.

For each (rank, learning rate) of ``config.linearization``, LoRA is fine-tuned from θ0
(A random, B = 0) on the train rows of the study's tasks with the training section's
optimizer (the training engine, :func:`jax_ensemble.training.engine.train`: AdamW, warm-up + cosine decay
over the largest step count, by default the training stage's own length, so that point
is exactly the default fine-tune); after each requested step count (a point on that run;
one compiled train step per run) it reports on the validation rows:

- ``weight_distance`` = ‖s·AB‖_F / ‖W0‖_F over all adapted modules (s = alpha / rank,
  W0 the dequantized base weights of those modules);
- ``relative_output_error`` = Σ|f − f_lin| / Σ|f − f0| (None while Σ|f − f0| ≈ 0) and
  ``relative_squared_error`` =
  mean(((f_lin − f) / max(|f|, |f0|))²) (the official code's measure), see
  :func:`jax_ensemble.core.linearize.linearization_errors`;
- ``accuracy_f`` / ``accuracy_f_lin``: accuracy of the fine-tuned network and of its
  linearization (binary: log-odds of the gold word > 0; K > 2: argmax of (0, z_1 − z_0, …)).

The output is the classification output of :mod:`jax_ensemble.models.lora_gradients` (binary
log-odds z_gold − z_other, else the K − 1 log-odds z_k − z_0 against class 0).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_ensemble.config import Config
from jax_ensemble.core.linearize import linearization_errors, linearize, logits_of_output
from jax_ensemble.data import load_suite, load_task, tokenize_split
from jax_ensemble.data.tables import eval_batches, table_of_splits
from jax_ensemble.figures import png_bytes, pyplot
from jax_ensemble.models.loading import load_pretrained
from jax_ensemble.models.lora import apply_lora, split_lora
from jax_ensemble.models.lora_gradients import lora_output_fn
from jax_ensemble.models.quantization import dequantize_int8
from jax_ensemble.storage.atomic import atomic_write_bytes, atomic_write_json
from jax_ensemble.training.engine import total_steps, train
from jax_ensemble.training.losses import classification_objective
from jax_ensemble.training.mesh import check_rows_fit, leaf_sharding, make_mesh, put_batch, put_tree, to_host
from jax_ensemble.training.progress import Progress


def lora_weight_distance(lora: nnx.State, base: nnx.State, scaling: float, start: nnx.State | None = None) -> float:
    """‖s·(AB − A0B0)‖_F / ‖W0‖_F summed over every adapted module (W0 dequantized: q·scale;
    A0, B0 from ``start``, default B0 = 0: the distance from LoRA's initialisation)."""
    flat_base = {tuple(path): var[...] for path, var in nnx.to_flat_state(base)}
    flat_lora = {tuple(path): var[...] for path, var in nnx.to_flat_state(lora)}
    flat_start = {} if start is None else {tuple(path): var[...] for path, var in nnx.to_flat_state(start)}
    delta_sq = base_sq = 0.0
    for path, a in flat_lora.items():
        if path[-1] != "lora_a":
            continue
        prefix = path[:-1]
        b = flat_lora[prefix + ("lora_b",)]
        if start is not None:
            a, b = jnp.concatenate([a, flat_start[path]], -1), jnp.concatenate([b, -flat_start[prefix + ("lora_b",)]], -2)
        w0 = jnp.asarray(flat_base[prefix + ("kernel",)], jnp.float32)
        if prefix + ("scale",) in flat_base:  # int8: one scale per output channel
            w0 = dequantize_int8(w0, flat_base[prefix + ("scale",)], reduce_axis=w0.ndim - 2)
        delta_sq += float(jnp.sum((scaling * jnp.matmul(a, b)) ** 2))
        base_sq += float(jnp.sum(w0**2))
    return math.sqrt(delta_sq / base_sq)


@functools.partial(jax.jit, static_argnames="graphdef")
def _outputs(lora: nnx.State, lora0: nnx.State, base: nnx.State, batch: Any, *, graphdef: nnx.GraphDef):
    """(f(θ), f_lin(θ)) of one batch: (B,) or (B, K − 1) each."""
    output = lora_output_fn(graphdef)
    fn = lambda p, x: output(p, nnx.State({}), base, x)  # noqa: E731  (binds jit arguments)
    return fn(lora, batch), linearize(fn, lora0)(lora, batch)


def _correct(f: np.ndarray, label: np.ndarray) -> np.ndarray:
    return (f > 0) if f.ndim == 1 else (np.argmax(np.asarray(logits_of_output(f)), axis=-1) == label)


def _evaluate(graphdef, lora, lora0, base, tables, batch_size, mesh) -> dict[str, np.ndarray]:
    """Concatenated f, f_lin, label over the validation tables (real rows only), each batch's
    rows split over the mesh's (data, fsdp) axes (weights laid out on ``mesh`` beforehand)."""
    fs, flins, labels = [], [], []
    for table in tables:
        for batch, _ in eval_batches(table, batch_size):
            f, f_lin = to_host(_outputs(lora, lora0, base, put_batch(batch, mesh), graphdef=graphdef))
            real = batch["weight"] > 0
            fs.append(np.asarray(f)[real].reshape(int(real.sum()), -1))
            flins.append(np.asarray(f_lin)[real].reshape(int(real.sum()), -1))
            labels.append(batch["label"][real])
    return {"f": fs, "f_lin": flins, "label": labels}


def _summary(ev: dict, ev0: dict) -> dict[str, float]:
    errs = [linearization_errors(jnp.asarray(f), jnp.asarray(fl), jnp.asarray(f0))
            for f, fl, f0 in zip(ev["f"], ev["f_lin"], ev0["f"])]
    moved = sum(float(np.sum(np.abs(f - f0))) for f, f0 in zip(ev["f"], ev0["f"]))
    off = sum(float(np.sum(np.abs(f - fl))) for f, fl in zip(ev["f"], ev["f_lin"]))
    sizes = [f.size for f in ev["f"]]
    sq = sum(float(e["relative_squared_error"]) * n for e, n in zip(errs, sizes)) / sum(sizes)

    def accuracy(key: str) -> float:
        hits = [_correct(x.squeeze(-1) if x.shape[-1] == 1 else x, y) for x, y in zip(ev[key], ev["label"])]
        return float(np.mean(np.concatenate(hits)))

    return {
        # undefined (None) while fine-tuning has not moved the outputs (e.g. a warm-up step at lr 0)
        "relative_output_error": off / moved if moved > 1e-6 * sum(sizes) else None,
        "relative_squared_error": sq,
        "accuracy_f": accuracy("f"),
        "accuracy_f_lin": accuracy("f_lin"),
        "validation_examples": int(sum(len(y) for y in ev["label"])),
    }


def run_study(config: Config, *, progress: bool = True) -> dict[str, Any]:
    """Run the study of ``config.linearization``; returns the JSON-able result
    (``settings``: one entry per rank × learning rate × step count)."""

    study = config.linearization
    tasks = [load_task(t, config.tasks) for t in study.tasks] if study.tasks else load_suite(config.tasks)
    mesh = make_mesh(config.mesh)  # fine-tunes and evaluations: base by the partition rules, rows over (data, fsdp)
    eval_bs = config.training.eval_batch_size
    check_rows_fit(eval_bs, mesh, "training.eval_batch_size")
    model, tokenizer = load_pretrained(
        config.model.source, base_dtype=config.model.base_dtype, compute_dtype=config.model.compute_dtype,
        kernels=config.model.kernels, sharding=leaf_sharding(mesh) if mesh.size > 1 else None,
    )
    max_length = config.tasks.max_length
    train_table = table_of_splits([tokenize_split(t, "train", tokenizer, max_length) for t in tasks],
                           pad_id=tokenizer.pad_id, max_length=max_length)
    validation = []
    for task in tasks:
        split = tokenize_split(task, "validation", tokenizer, max_length)
        keep = slice(0, study.validation_examples)
        split = dataclasses.replace(split, prompts=split.prompts[keep], labels=split.labels[keep])
        validation.append(table_of_splits([split], pad_id=tokenizer.pad_id, max_length=max_length))
    rows = len(train_table["label"])
    default_steps = total_steps(config.training, rows)
    step_counts = sorted({s or default_steps for s in study.steps})
    ranks = study.ranks or (config.lora.rank,)
    rates = study.learning_rates or (config.training.learning_rate,)
    settings = []
    bar = Progress(len(ranks) * len(rates) * step_counts[-1], "linearization-error", "step", enabled=progress)
    for rank in ranks:
        lora_config = dataclasses.replace(config.lora, rank=rank, dropout=0.0)
        adapted = nnx.clone(model)
        apply_lora(adapted, lora_config, jax.random.key(config.seed))
        graphdef, lora0, base = split_lora(adapted)
        base, lora0 = put_tree(base, mesh), put_tree(lora0, mesh)
        if warm := config.training.warm_start_steps:  # θ0: LoRA's init trained on the study's rows first
            lora0 = train(classification_objective(graphdef), lora0, base, train_table,
                          dataclasses.replace(config.training, max_steps=warm, patience=0), mesh,
                          seeds=[config.seed], progress=False).lora
        ev0 = _evaluate(graphdef, lora0, lora0, base, validation, eval_bs, mesh)
        for lr in rates:
            training = dataclasses.replace(config.training, learning_rate=lr, max_steps=step_counts[-1])
            start = time.perf_counter()

            def measure(step: int, state, rank=rank, lr=lr, lora0=lora0, graphdef=graphdef, base=base,
                        ev0=ev0, scaling=lora_config.alpha / rank, start=start) -> None:
                bar.update(1)
                if step not in step_counts:
                    return
                ev = _evaluate(graphdef, state.lora, lora0, base, validation, eval_bs, mesh)
                settings.append({
                    "steps": step,
                    "rank": rank,
                    "learning_rate": lr,
                    "is_default_training_length": step == default_steps,
                    "weight_distance": lora_weight_distance(state.lora, base, scaling,
                                                            lora0 if config.training.warm_start_steps else None),
                    **_summary(ev, ev0),
                    "seconds": round(time.perf_counter() - start, 1),
                })

            train(classification_objective(graphdef), lora0, base, train_table, training, mesh, seeds=[config.seed],
                  progress=False, on_step=measure)
    bar.close()
    return {
        "model": config.model.source,
        "base_dtype": config.model.base_dtype,
        "tasks": [t.name for t in tasks],
        "train_rows": rows,
        "default_training_steps": default_steps,
        "output": "binary: log-odds z_gold - z_other of the label-word logits; K > 2: the K - 1 log-odds z_k - z_0",
        "accuracy_f0": _summary(ev0, ev0)["accuracy_f"],
        "settings": settings,
    }


def plot_study(result: dict[str, Any], path: Path) -> Path:
    """PNG: both errors and the weight distance against steps, one line per (rank, lr)."""
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    groups: dict[tuple, list] = {}
    for s in result["settings"]:
        groups.setdefault((s["rank"], s["learning_rate"]), []).append(s)
    for (rank, lr), rows in groups.items():
        steps = [r["steps"] for r in rows]
        label = f"rank {rank}, lr {lr:g}"
        for ax, key in zip(axes, ("relative_output_error", "relative_squared_error", "weight_distance")):
            ax.plot(steps, [r[key] for r in rows], marker="o", label=label)
    for ax, title in zip(axes, ("|f - f_lin| / |f - f0|", "mean(((f_lin - f)/max(|f|,|f0|))^2)",
                                "||s AB|| / ||W0||")):
        ax.set_xscale("log")
        ax.set_xlabel("fine-tuning steps")
        ax.set_title(title, fontsize=10)
        ax.axvline(result["default_training_steps"], color="grey", linestyle=":", linewidth=1)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"linearization error: {result['model']} on {', '.join(result['tasks'])}", fontsize=11)
    fig.tight_layout()
    return atomic_write_bytes(path, png_bytes(fig))


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of the settings."""
    lines = [f"{'rank':>4} {'lr':>8} {'steps':>6} {'w-dist':>9} {'rel-err':>8} {'sq-err':>9} "
             f"{'acc f':>6} {'acc lin':>7}"]
    for s in result["settings"]:
        mark = " *" if s["is_default_training_length"] else ""
        lines.append(f"{s['rank']:>4} {s['learning_rate']:>8.1e} {s['steps']:>6} {s['weight_distance']:>9.2e} "
                     f"{s['relative_output_error'] if s['relative_output_error'] is not None else float('nan'):>8.4f} "
                     f"{s['relative_squared_error']:>9.2e} "
                     f"{s['accuracy_f']:>6.3f} {s['accuracy_f_lin']:>7.3f}{mark}")
    lines.append(f"* = the training stage's own length ({result['default_training_steps']} steps on "
                 f"{result['train_rows']} rows); base accuracy {result['accuracy_f0']:.3f}")
    return "\n".join(lines)


def study_outputs(config: Config, result: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``linearization_error.json`` and ``.png`` under the run directory."""
    run_dir = config.resolved_run_dir()
    return (atomic_write_json(run_dir / "linearization_error.json", result),
            plot_study(result, run_dir / "linearization_error.png"))
