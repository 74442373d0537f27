"""The one training engine: LoRA adapters on a frozen (int8) base, sharded, with exact resume.

:func:`train` trains either one adapter or M stacked members (leaves with a leading
member axis, advanced together by one vmapped step over one shared base) on any
:class:`~jax_ensemble.training.losses.Objective` (classification, boosting over a
fixed ensemble offset, KL to the base), with the same features for every caller: the
mesh's partition rules (members replicated over the member axis), orbax checkpoints
with a fingerprint and exact resume (the data order is a function of the step),
periodic validation with early stopping that keeps the best adapter (per member),
finite checks, per-step metrics (``metrics.jsonl`` and TensorBoard events,
:mod:`~jax_ensemble.training.metrics`) and a progress bar. docs/method.md §6.

Functional pieces (reusable with any ``loss_fn``):

- :func:`make_optimizer` — clip(global norm) → AdamW with linear warm-up then cosine decay
  (optionally decaying toward the initial adapter, or with LoRA A frozen);
- :func:`make_train_step` — one optimizer step over ``grad_accum_steps`` micro-batches
  (batch leaves shaped (A, b, ...)): the gradient is Σ_micro ∇Σ_i w_i ℓ_i / Σ w_i, exactly
  the full batch's weighted-mean gradient; LoRA dropout keys are fold_in(seed, step, micro);
- :func:`make_eval_step` — weighted loss / correct / weight sums of one batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_ensemble.core.batch import Table
from jax_ensemble.core.losses import weighted_cross_entropy
from jax_ensemble.core.trees import stack_trees
from jax_ensemble.data.tables import batch_indices, eval_batches, in_table_order, num_rows, take_batch
from jax_ensemble.errors import TrainingError
from jax_ensemble.training.checkpoints import checkpoint_manager, restore_checkpoint, save_checkpoint, seal_finished
from jax_ensemble.training.losses import LossFn, Objective, objective_loss
from jax_ensemble.training.mesh import (
    DEFAULT_RULES,
    Rules,
    batch_sharding,
    check_batch_fits,
    put_batch,
    put_global,
    put_tree,
    tree_shardings,
)
from jax_ensemble.training.metrics import MetricsWriter
from jax_ensemble.training.progress import Progress
from jax_ensemble.training.settings import TrainingConfig

log = logging.getLogger(__name__)


class TrainState(NamedTuple):
    """Everything that changes during training (all arrays, checkpointed as one pytree).

    step: () int32 optimizer steps taken (= batches consumed); lora: the adapter;
    opt_state: the optimizer's state; best_loss: () float32 lowest validation loss so
    far (inf before the first evaluation); best_lora: the adapter at best_loss;
    bad_evals: () int32 evaluations since best_loss last improved."""

    step: jax.Array
    lora: Any
    opt_state: Any
    best_loss: jax.Array
    best_lora: Any
    bad_evals: jax.Array


def learning_rate_schedule(config: TrainingConfig, total_steps: int) -> optax.Schedule:
    """lr(s) = lr·s/warmup for s < warmup, then lr·½(1 + cos(π·(s − warmup)/(total − warmup)))."""
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        0.0 if warmup else config.learning_rate,
        config.learning_rate,
        warmup,
        max(total_steps, warmup + 1),
        end_value=0.0,
    )


def decay_toward_init(rate: float) -> optax.GradientTransformation:
    """u ↦ u + rate·(θ − θ0), θ0 the parameters the state was initialised with (kept in the
    state): decoupled weight decay toward the start instead of toward 0."""

    def init(params: Any) -> Any:
        return jax.tree.map(jnp.copy, params)

    def update(updates: Any, start: Any, params: Any = None) -> tuple[Any, Any]:
        return jax.tree.map(lambda u, p, p0: u + rate * (p - p0), updates, params, start), start

    return optax.GradientTransformation(init, update)


def make_optimizer(config: TrainingConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm(max_grad_norm) (if > 0), then AdamW(schedule, weight_decay), with
    ``l2_to_init`` > 0 the decay toward θ0 (:func:`decay_toward_init`) beside AdamW's own, and
    with ``train_lora_a`` false no update (and no state) for the ``lora_a`` leaves."""
    schedule = learning_rate_schedule(config, total_steps)
    if config.l2_to_init > 0:  # AdamW's chain with one more decoupled decay before the learning rate
        adam = optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(config.weight_decay),
                           decay_toward_init(config.l2_to_init), optax.scale_by_learning_rate(schedule))
    else:
        adam = optax.adamw(schedule, weight_decay=config.weight_decay)
    optimizer = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adam) if config.max_grad_norm > 0 else adam
    if config.train_lora_a:
        return optimizer

    def labels(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if "lora_a" in jax.tree_util.keystr(path) else "trained", params)

    return optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()}, labels)


def init_state(lora: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """The state before step 0."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        lora=lora,
        opt_state=optimizer.init(lora),
        best_loss=jnp.full((), jnp.inf, jnp.float32),
        best_lora=lora,
        bad_evals=jnp.zeros((), jnp.int32),
    )


def make_train_step(
    loss_fn: LossFn, optimizer: optax.GradientTransformation, *, seed: int, dropout: bool
) -> Callable[[TrainState, Any, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """``step(state, frozen, batch) -> (state, metrics)``; batch leaves are (A, b, ...):
    A micro-batches of b rows, whose gradients are summed before the one update.

    metrics: ``loss`` (weighted mean over the batch), ``grad_norm`` (before clipping)."""

    def step(state: TrainState, frozen: Any, batch: Mapping[str, jax.Array]):
        key = jax.random.fold_in(jax.random.key(seed), state.step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def micro(carry, xs):
            grads, loss_sum, weight_sum = carry
            micro_batch, index = xs
            dropout_key = jax.random.fold_in(key, index) if dropout else None
            (loss, weight), g = grad_fn(state.lora, frozen, micro_batch, dropout_key)
            return (jax.tree.map(jnp.add, grads, g), loss_sum + loss, weight_sum + weight), None

        num_micro = jax.tree.leaves(batch)[0].shape[0]
        zeros = jax.tree.map(jnp.zeros_like, state.lora)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, loss_sum, weight_sum), _ = jax.lax.scan(micro, init, (batch, jnp.arange(num_micro)))
        denominator = jnp.maximum(weight_sum, 1e-12)
        grads = jax.tree.map(lambda g: g / denominator, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.lora)
        lora = optax.apply_updates(state.lora, updates)
        metrics = {"loss": loss_sum / denominator, "grad_norm": optax.tree.norm(grads)}
        return state._replace(step=state.step + 1, lora=lora, opt_state=opt_state), metrics

    return step


def make_eval_step(logits_fn: Callable[[Any, Any, Mapping[str, jax.Array]], jax.Array]):
    """``eval(params, frozen, batch) -> {loss_sum, correct_sum, weight_sum, logits}`` for one
    batch, from ``logits_fn(params, frozen, batch) -> (B, K)`` (the logits come back too, so
    a later stage need not run the adapter on these rows again)."""

    def eval_step(params, frozen, batch):
        logits = logits_fn(params, frozen, batch)
        loss_sum, weight_sum = weighted_cross_entropy(logits, batch["label"], batch["weight"])
        correct = (jnp.argmax(logits, axis=-1) == batch["label"]).astype(jnp.float32)
        return {"loss_sum": loss_sum, "correct_sum": jnp.sum(correct * batch["weight"]), "weight_sum": weight_sum,
                "logits": logits}

    return eval_step


def total_steps(config: TrainingConfig, rows: int) -> int:
    """``max_steps`` if > 0, else ceil(epochs · rows / batch_size)."""
    return config.max_steps or max(1, math.ceil(config.epochs * rows / config.batch_size))


def adapter_training(config: TrainingConfig, job_rows: int) -> TrainingConfig:
    """The settings of one adapter in a job whose adapters train on subsets of ``job_rows``
    rows: under ``budget: equal`` its length is fixed to ``total_steps(config, job_rows)``
    (the single adapter's), whatever its own rows; under ``epochs`` ``config`` unchanged."""
    if config.budget != "equal" or config.max_steps:
        return config
    return dataclasses.replace(config, max_steps=total_steps(config, job_rows))


def early_stopping_update(best_loss: Any, bad_evals: Any, val_loss: Any) -> tuple[Any, Any, Any]:
    """(improved, best_loss, bad_evals) after one validation loss; scalars, or (M,) arrays
    with one entry per stacked member, updated elementwise."""
    improved = np.asarray(val_loss) < np.asarray(best_loss)
    return improved, np.where(improved, val_loss, best_loss), np.where(improved, 0, np.asarray(bad_evals) + 1)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """The trained adapter (the best by validation loss when validation data was given,
    else the last; stacked (M, …) when training members) as global arrays, the step
    reached, per-step records, the checkpoint directory of the final step (None without
    a run directory), whether early stopping ended the run, and the returned adapter's
    logits on the validation table ((N, K), (M, N, K) stacked; None without validation, or
    when the best adapter was evaluated before a resume and not in this call)."""

    lora: Any
    step: int
    history: list[dict[str, Any]]
    checkpoint: Path | None
    stopped_early: bool
    validation_logits: np.ndarray | None = None


class Evaluator:
    """A jitted evaluation on a mesh: ``evaluator(lora, table) -> {loss, accuracy, examples,
    logits}`` (weighted means of the objective's CE and accuracy over the table's rows,
    dropout off, and the (N, K) logits in table order), the frozen base laid out once. With
    ``stacked=True`` ``lora`` holds M members, every scalar is an (M,) list and the logits
    are (M, N, K)."""

    def __init__(self, objective: Objective, base: Any, mesh: Mesh, batch_size: int,
                 rules: Rules = DEFAULT_RULES, *, stacked: bool = False):
        self.mesh = mesh
        self.batch_size = batch_size
        self.rules = rules
        self.stacked = stacked
        self.base_shardings = tree_shardings(base, mesh, rules)
        self.base = put_global(base, self.base_shardings)
        step = make_eval_step(lambda lora, frozen, batch: objective.logits(lora, frozen, batch, None))
        if stacked:
            step = jax.vmap(step, in_axes=(0, None, None))
        self.step = jax.jit(step, out_shardings=NamedSharding(mesh, P()))

    def __call__(self, lora: Any, table: Table) -> dict[str, Any]:
        lora = put_tree(lora, self.mesh, self.rules, leading=int(self.stacked))
        totals: dict[str, Any] = {"loss_sum": 0.0, "correct_sum": 0.0, "weight_sum": 0.0}
        chunks, order = [], []
        for batch, rows in eval_batches(table, self.batch_size):
            sums = jax.device_get(self.step(lora, self.base, put_batch(batch, self.mesh)))
            chunks.append(np.asarray(sums.pop("logits")))
            order.append(rows)
            for k, v in sums.items():
                totals[k] = totals[k] + np.asarray(v, np.float64)
        logits = in_table_order(chunks, order, axis=-2)
        weight = np.maximum(totals["weight_sum"], 1e-12)
        out = {"loss": totals["loss_sum"] / weight, "accuracy": totals["correct_sum"] / weight,
               "examples": np.rint(totals["weight_sum"]).astype(int)}
        if self.stacked:
            return {**{k: v.tolist() for k, v in out.items()}, "logits": logits}
        return {"loss": float(out["loss"]), "accuracy": float(out["accuracy"]), "examples": int(out["examples"]),
                "logits": logits}


def train(
    objective: Objective,
    lora: Any,
    base: Any,
    train_table: Table,
    config: TrainingConfig,
    mesh: Mesh,
    *,
    seeds: Sequence[int],
    stacked: bool = False,
    validation: Table | None = None,
    dropout: bool = False,
    run_dir: str | Path | None = None,
    rules: Rules = DEFAULT_RULES,
    fingerprint: Mapping[str, Any] | None = None,
    progress: bool = True,
    desc: str = "train",
    on_step: Callable[[int, TrainState], None] | None = None,
) -> TrainResult:
    """Train ``lora`` on ``train_table`` under ``objective`` with the frozen ``base``, on ``mesh``.

    One adapter (``stacked=False``, ``seeds`` = one seed: data order and dropout keys) or
    M stacked members (``stacked=True``: leaves (M, …), member m reading the table in the
    order of ``seeds[m]``; one compiled step advances all). Length: ``total_steps`` of the
    table's rows. With ``validation``: evaluation every ``eval_every`` steps and at the
    end, early stopping after ``patience`` evaluations without improvement (all members),
    the best adapter (per member) returned. With ``run_dir``: metrics go to
    ``run_dir/metrics.jsonl``, checkpoints to ``run_dir/checkpoints/<step>``, and an
    existing checkpoint there is resumed (it must carry the same ``fingerprint``: the
    caller's description of model, data and settings; a finished run is restored
    without training). ``dropout``: draw LoRA dropout masks. ``on_step(step, state)``
    runs after every step (e.g. to measure the adapter along the way).
    """
    seeds = [int(s) for s in seeds]
    if not stacked and len(seeds) != 1:
        raise TrainingError(f"one adapter trains with one seed, got {len(seeds)}")
    check_batch_fits(config, mesh)
    if dropout and all(mesh.shape[a] > 1 for a in mesh.axis_names) and \
            config.batch_size // config.grad_accum_steps == mesh.shape["data"] * mesh.shape["fsdp"]:
        log.warning("LoRA dropout with one example per device on a data x fsdp x tensor mesh trains differently from "
                    "one device (an XLA partitioning issue measured on jax 0.10); give each device at least 2 rows "
                    "of a micro-batch (training.batch_size / grad_accum_steps)")
    rows = num_rows(train_table)
    steps = total_steps(config, rows)
    optimizer = make_optimizer(config, steps)
    leading = int(stacked)
    if stacked:
        host_state = jax.vmap(lambda one: init_state(one, optimizer))(lora)
    else:
        host_state = init_state(lora, optimizer)
    state_shardings = tree_shardings(host_state, mesh, rules, leading=leading)
    evaluator = Evaluator(objective, base, mesh, config.eval_batch_size, rules, stacked=stacked)
    base, base_shardings = evaluator.base, evaluator.base_shardings
    state = put_global(host_state, state_shardings)

    def batch_at(step: int) -> dict[str, np.ndarray]:
        parts = [take_batch(train_table, batch_indices(rows, config.batch_size, s, step), config.grad_accum_steps)
                 for s in seeds]
        return stack_trees(parts) if stacked else parts[0]

    example = batch_at(0)
    batch_shardings = {k: batch_sharding(mesh, np.ndim(v), leading=1 + leading) for k, v in example.items()}
    loss_fn = objective_loss(objective)
    if stacked:
        def step_fn(states, frozen, batches):
            def one(state, batch, seed):
                return make_train_step(loss_fn, optimizer, seed=seed, dropout=dropout)(state, frozen, batch)

            return jax.vmap(one)(states, batches, jnp.asarray(seeds, jnp.int32))
    else:
        step_fn = make_train_step(loss_fn, optimizer, seed=seeds[0], dropout=dropout)
    train_step = jax.jit(
        step_fn,
        in_shardings=(state_shardings, base_shardings, batch_shardings),
        out_shardings=(state_shardings, NamedSharding(mesh, P())),
    )
    fingerprint = {**dict(fingerprint or {}), "training": config.identity(),
                   "seed": seeds if stacked else seeds[0], "rows": rows}
    fingerprint = json.loads(json.dumps(fingerprint))
    writer = MetricsWriter(run_dir)
    manager = checkpoint_manager(Path(run_dir) / "checkpoints", config.keep_last) if run_dir else None
    start = 0
    if manager is not None:
        found = restore_checkpoint(manager, host_state, state_shardings, fingerprint)
        if found is not None:
            state, start = found
    writer.start(after_step=start)

    def checkpoint(step: int) -> None:
        if manager is not None and manager.latest_step() != step:
            writer.flush()
            save_checkpoint(manager, step, state, fingerprint)

    def stopped(s: TrainState) -> bool:
        return config.patience > 0 and bool(np.all(np.asarray(s.bad_evals) >= config.patience))

    bar = Progress(steps, desc, "step", enabled=progress and jax.process_index() == 0, initial=start)
    schedule = learning_rate_schedule(config, steps)
    step = start
    clock = time.perf_counter()
    best_logits = None  # the best adapter's validation logits, when this call evaluated it
    try:
        while step < steps and not stopped(state):
            batch = put_global(batch_at(step), batch_shardings)
            state, metrics = train_step(state, base, batch)
            step += 1
            record = {"step": step, **{k: _scalar_or_list(v) for k, v in jax.device_get(metrics).items()}}
            if not (np.isfinite(record["loss"]).all() and np.isfinite(record["grad_norm"]).all()):
                raise TrainingError(
                    f"non-finite loss or gradient at step {step} (loss {record['loss']}, grad norm "
                    f"{record['grad_norm']}); lower training.learning_rate or check the data"
                )
            record["learning_rate"] = float(schedule(step - 1))
            if validation is not None and (step % config.eval_every == 0 or step == steps):
                state, val, improved = _evaluate_and_track(state, evaluator, validation, state_shardings)
                record.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
                if best_logits is None:
                    best_logits = np.full_like(val["logits"], np.nan)
                best_logits = np.where(np.reshape(improved, np.shape(improved) + (1, 1)), val["logits"], best_logits)
            if on_step is not None:
                on_step(step, state)
            now = time.perf_counter()
            record["seconds"] = round(now - clock, 4)  # this step's wall time, evaluation and compilation included
            clock = now
            writer.write(record)
            bar.update(1, f"loss={float(np.mean(record['loss'])):.4f}")
            if step % config.checkpoint_every == 0:
                checkpoint(step)
    finally:
        bar.close()
        writer.close()
    checkpoint(step)
    if manager is not None:
        seal_finished(manager)
        manager.close()
    final = state.best_lora if validation is not None else state.lora
    return TrainResult(
        lora=final,
        step=step,
        history=writer.records,
        checkpoint=Path(run_dir).absolute() / "checkpoints" / str(step) if run_dir else None,
        stopped_early=stopped(state),
        validation_logits=None if best_logits is None or np.isnan(best_logits).any() else best_logits,
    )


def _scalar_or_list(value: Any) -> float | list[float]:
    value = np.asarray(value, np.float64)
    return float(value) if value.ndim == 0 else value.tolist()


def _evaluate_and_track(state: TrainState, evaluator: Evaluator, validation: Table, shardings: TrainState):
    """Evaluate ``state.lora``; update best_loss / best_lora / bad_evals (per member when stacked).
    Returns the new state, the evaluation and whether it improved (bool, or (M,) when stacked)."""
    val = evaluator(state.lora, validation)
    losses = np.asarray(val["loss"], np.float64)
    best = np.asarray(jax.device_get(state.best_loss), np.float64)
    bad = np.asarray(jax.device_get(state.bad_evals))
    improved, new_best, new_bad = early_stopping_update(best, bad, losses)
    scalars = put_global(
        (np.asarray(new_best, np.float32), np.asarray(new_bad, np.int32)), (shardings.best_loss, shardings.bad_evals)
    )
    if improved.ndim == 0:
        best_lora = state.lora if bool(improved) else state.best_lora
    else:
        keep = jnp.asarray(improved)
        best_lora = jax.tree.map(lambda new, old: jnp.where(keep.reshape((-1,) + (1,) * (new.ndim - 1)), new, old),
                                 state.lora, state.best_lora)
    return state._replace(best_loss=scalars[0], bad_evals=scalars[1], best_lora=best_lora), val, improved
