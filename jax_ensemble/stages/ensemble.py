"""Running the grouped ensemble through the model: stacked multi-adapter inference and boosting.

M adapters stacked on a leading axis (:func:`~jax_ensemble.core.trees.stack_trees`) run
over one shared frozen (int8) base in one jitted, vmapped call; the array-level maths
(weights, combination, boosting residuals) is :mod:`jax_ensemble.core.ensemble`.
docs/method.md §7.

- :func:`stacked_label_logits` — z_m(x) for every adapter m (M, B, K); the base is a jit
  argument, never a constant; :func:`stacked_table_logits` over a whole table.
- :func:`ensemble_logits` — Σ_m α[t,m] z_m + Σ_j η[j,t] (z_j − z_base): members, boosters
  and (with boosters) the base model evaluated as one stacked call;
  :func:`ensemble_table_logits` over a table, routed: each task's rows run only the
  members with α[t,m] > 0 and the boosters serving t (equal to the dense call).
- :func:`boost` runs boosting rounds with a learner; :func:`boost_trained` trains each
  learner with the training engine (:func:`jax_ensemble.training.engine.train`, the
  :func:`~jax_ensemble.training.losses.boosting_objective`: checkpointed, resumable and
  restored on a rerun when given a run directory); :func:`boost_closed_form` fits a ridge
  regression of the residuals on projected gradients and maps it back to an adapter
  θ0 + P·w (:func:`lifted_adapter`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jax_ensemble.core.batch import MODEL_KEYS, Batch, Table
from jax_ensemble.core.ensemble import (
    DEFAULT_STEP_SIZE,
    Ensemble,
    active_calls,
    add_booster,
    boosted_logits,
    boosting_offsets,
    combine_logits,
    group_losses,
    group_step_sizes,
    logit_features,
    residuals,
    restrict,
    ridge_fit,
)
from jax_ensemble.core.projection import Projector, lift
from jax_ensemble.core.trees import stack_trees, unstack_tree, zeros_like_member
from jax_ensemble.data.tables import eval_batches, in_table_order, num_rows, rows_of
from jax_ensemble.errors import ConfigError, DataError
from jax_ensemble.models.classification import lora_label_logits_fn
from jax_ensemble.models.lora_gradients import lora_feature_split
from jax_ensemble.stages.gradients import SplitGradients
from jax_ensemble.stages.logit_cache import LogitCache, cached
from jax_ensemble.training.engine import train
from jax_ensemble.training.losses import boosting_objective
from jax_ensemble.training.mesh import put_batch, put_tree, to_host
from jax_ensemble.training.progress import Progress
from jax_ensemble.training.settings import TrainingConfig


@functools.partial(jax.jit, static_argnames="graphdef")
def stacked_label_logits(graphdef: nnx.GraphDef, stacked_lora: Any, base: nnx.State, batch: Batch) -> jax.Array:
    """(M, B, K) label logits of the M stacked adapters (leaves (M, …)) over one shared base."""
    batch = {k: batch[k] for k in MODEL_KEYS}
    return jax.vmap(lora_label_logits_fn(graphdef), in_axes=(0, None, None))(stacked_lora, base, batch)


def table_outputs(fn: Callable[[Batch], jax.Array], table: Table, batch_size: int, axis: int = 0,
                  progress: str | None = None, mesh: Mesh | None = None) -> np.ndarray:
    """``fn`` over ``table`` in batches of ``batch_size`` rows (:func:`eval_batches`: length
    ordered), put back in table order along the row axis ``axis`` of its output: N rows.
    ``progress``: a progress bar on stderr with this description (None: none). ``mesh``:
    each batch's rows split over the mesh's (data, fsdp) axes, outputs gathered to the host
    (``fn``'s weights are expected laid out on the same mesh: :func:`on_mesh`)."""
    chunks, rows = [], []
    with Progress(-(-num_rows(table) // batch_size), progress or "", "batch", enabled=progress is not None) as bar:
        for batch, batch_rows in eval_batches(table, batch_size):
            chunks.append(np.asarray(fn(batch)) if mesh is None else to_host(fn(put_batch(batch, mesh))))
            rows.append(batch_rows)
            bar.update(1)
    return in_table_order(chunks, rows, axis)


def on_mesh(mesh: Mesh | None, base: nnx.State, stacked: Any = None) -> tuple[nnx.State, Any]:
    """``(base, stacked)`` laid out on ``mesh`` by the partition rules (the stacked adapters'
    leading member axis replicated); unchanged without a mesh or when already laid out."""
    if mesh is None:
        return base, stacked
    base = put_tree(base, mesh)
    if stacked is not None:
        stacked = put_tree(stacked, mesh, leading=1)
    return base, stacked


def stacked_table_logits(graphdef: nnx.GraphDef, stacked_lora: Any, base: nnx.State, table: Table,
                         batch_size: int, progress: str | None = None, mesh: Mesh | None = None) -> np.ndarray:
    """(M, N, K) label logits of the stacked adapters over every row of ``table`` (on
    ``mesh`` when given: :func:`table_outputs`)."""
    base, stacked_lora = on_mesh(mesh, base, stacked_lora)
    return table_outputs(lambda b: stacked_label_logits(graphdef, stacked_lora, base, b), table, batch_size, axis=1,
                         progress=progress, mesh=mesh)


@functools.partial(jax.jit, static_argnames="graphdef")
def ensemble_logits(graphdef: nnx.GraphDef, ensemble: Ensemble, base: nnx.State, batch: Batch) -> jax.Array:
    """(B, K) ensemble logits Σ_m α[t,m] z_m + Σ_j η[j,t] (z_j − z_base), t = batch
    ``task_index``: members, boosters and the base model evaluated as one stacked call (the
    base model only when there are boosters: b = 0 needs no z_base, and not when the batch
    brings z_base as ``base_logits`` (B, K), e.g. from the zero-shot evaluation)."""
    m, b = ensemble.weights.shape[1], ensemble.step_sizes.shape[0]
    if b == 0:
        return combine_logits(stacked_label_logits(graphdef, ensemble.members, base, batch), ensemble.weights,
                              batch["task_index"])
    given = batch.get("base_logits")
    extra = [] if given is not None else [zeros_like_member(ensemble.members)]
    everything = jax.tree.map(lambda x, y, *z: jnp.concatenate([x, y, *(w[None] for w in z)]),
                              ensemble.members, ensemble.boosters, *extra)
    z = stacked_label_logits(graphdef, everything, base, batch)
    mixed = combine_logits(z[:m], ensemble.weights, batch["task_index"])
    return boosted_logits(mixed, z[m:m + b], z[-1] if given is None else given, ensemble.step_sizes,
                          batch["task_index"])


def ensemble_table_logits(graphdef: nnx.GraphDef, ensemble: Ensemble, base: nnx.State, table: Table,
                          batch_size: int, progress: str | None = None, mesh: Mesh | None = None,
                          base_logits: np.ndarray | None = None) -> np.ndarray:
    """(N, K) ensemble logits over every row of ``table`` (needs ``task_index``), routed: the
    tasks that need the same members and boosters (:func:`active_calls`) are evaluated
    together by the :func:`restrict`-ed ensemble, so a member with α[t, m] = 0 never runs on
    task t's rows (:func:`routed_passes` counts the passes saved). Equal to
    :func:`ensemble_logits` over the whole table. ``base_logits`` (N, K): the base model's
    logits on these rows when already computed (the zero-shot evaluation's), so boosted
    tasks do not run the base model again. ``progress``, ``mesh``: as :func:`table_outputs`."""
    if base_logits is not None:
        table = {**table, "base_logits": np.asarray(base_logits, np.float32)}
    task_index = np.asarray(table["task_index"])
    base, _ = on_mesh(mesh, base)
    calls = active_calls(ensemble)
    out: np.ndarray | None = None
    for pattern in np.unique(calls[np.unique(task_index)], axis=0):
        tasks = np.flatnonzero((calls == pattern).all(axis=1))
        rows = np.isin(task_index, tasks)
        part = restrict(ensemble, pattern)
        if mesh is not None:
            part = part._replace(members=on_mesh(mesh, base, part.members)[1],
                                 boosters=on_mesh(mesh, base, part.boosters)[1])
        logits = table_outputs(lambda b, part=part: ensemble_logits(graphdef, part, base, b),
                               rows_of(table, tasks), batch_size, progress=progress, mesh=mesh)
        if out is None:
            out = np.empty((len(task_index), *logits.shape[1:]), logits.dtype)
        out[rows] = logits
    return out


class BoostingRound(NamedTuple):
    """What a boosting learner sees: round ``index``, the chosen ``group``, its training
    ``rows`` (bool (N,)), the ensemble logits F and base logits z_base (N, K) of the
    training table (z_base is computed on the rows of the groups chosen so far, the only
    rows where boosting uses it, and 0 elsewhere), and the group's validation rows with
    their ``offset_logits`` F − z_base (None without validation data)."""

    index: int
    group: int
    rows: np.ndarray
    logits: np.ndarray
    base_logits: np.ndarray
    validation: Table | None


Learner = Callable[[BoostingRound], Any]
"""``learner(round) -> adapter`` (one adapter, leaves without the member axis)."""


def boost(graphdef: nnx.GraphDef, ensemble: Ensemble, base: nnx.State, train_table: Table,
          groups: Sequence[Sequence[int]], learner: Learner, *, steps: int, step_size: float = DEFAULT_STEP_SIZE,
          batch_size: int = 32, validation: Table | None = None,
          validation_member_logits: np.ndarray | None = None, mesh: Mesh | None = None,
          cache: LogitCache | None = None) -> tuple[Ensemble, list[int]]:
    """``steps`` boosting rounds on the training table (needs ``task_index``): each picks the
    group g with the highest training loss under the current ensemble (:func:`group_losses`),
    gets an adapter from ``learner`` for g's rows and adds it with η = ``step_size`` on g's
    tasks. With ``validation``, each learner also gets g's validation rows with the current
    ensemble's offsets (``validation_member_logits`` (M, Nv, K): the members' logits there,
    when already computed). ``mesh``: inference on the mesh (:func:`table_outputs`);
    ``cache``: every logit pass read from / written to it. Returns the boosted ensemble
    and the group chosen in each round."""
    num_tasks = ensemble.weights.shape[0]
    zero = stack_trees([zeros_like_member(ensemble.members)])

    def ensemble_on(table: Table) -> np.ndarray:
        return cached(cache, "ensemble", ensemble, table,
                      lambda: ensemble_table_logits(graphdef, ensemble, base, table, batch_size, mesh=mesh))

    def stacked_on(adapters: Any, table: Table) -> np.ndarray:
        return cached(cache, "stacked", adapters, table,
                      lambda: stacked_table_logits(graphdef, adapters, base, table, batch_size, mesh=mesh))

    current = ensemble_on(train_table)
    if validation is not None:
        if validation_member_logits is not None and ensemble.step_sizes.shape[0] == 0:
            val_current = np.asarray(combine_logits(jnp.asarray(validation_member_logits), ensemble.weights,
                                                    jnp.asarray(validation["task_index"])))
        else:
            val_current = ensemble_on(validation)
    # z_base only where a round needs it: the chosen groups' rows (η is 0 elsewhere)
    base_logits, val_base = np.zeros_like(current), None if validation is None else np.zeros_like(val_current)
    known = {"train": np.zeros(len(current), bool), "validation": None if validation is None else
             np.zeros(len(val_current), bool)}

    def fill_base(logits: np.ndarray, table: Table, split: str, rows: np.ndarray) -> None:
        todo = rows & ~known[split]
        if todo.any():
            logits[todo] = stacked_on(zero, {k: v[todo] for k, v in table.items()})[0]
            known[split] |= todo

    chosen = []
    for r in range(steps):
        g = int(np.argmax(group_losses(current, train_table["label"], train_table["weight"],
                                       train_table["task_index"], groups)))
        in_group = np.isin(train_table["task_index"], groups[g])
        rows = in_group & (train_table["weight"] > 0)
        fill_base(base_logits, train_table, "train", in_group)
        val_table, val_in_group = None, None
        if validation is not None:
            val_in_group = np.isin(validation["task_index"], groups[g])
            fill_base(val_base, validation, "validation", val_in_group)
            keep = val_in_group & (validation["weight"] > 0)
            val_table = {k: v[keep] for k, v in validation.items()}
            val_table["offset_logits"] = boosting_offsets(val_current[keep], val_base[keep])
        lora = learner(BoostingRound(r, g, rows, current, base_logits, val_table))
        etas = group_step_sizes(groups[g], num_tasks, step_size)
        ensemble = add_booster(ensemble, lora, etas)

        def advance(logits: np.ndarray, table: Table, table_base: np.ndarray, group_rows: np.ndarray) -> np.ndarray:
            """F + η (z_booster − z_base) on the group's rows (η = 0 on the others)."""
            part = {k: v[group_rows] for k, v in table.items()}
            booster = stacked_on(stack_trees([lora]), part)
            logits = logits.copy()
            logits[group_rows] = np.asarray(boosted_logits(
                jnp.asarray(logits[group_rows]), jnp.asarray(booster), jnp.asarray(table_base[group_rows]),
                jnp.asarray(etas)[None], jnp.asarray(part["task_index"])))
            return logits

        if r + 1 < steps:
            current = advance(current, train_table, base_logits, in_group)
            if validation is not None:
                val_current = advance(val_current, validation, val_base, val_in_group)
        chosen.append(g)
    return ensemble, chosen


def _check_fresh(init_lora: nnx.State) -> None:
    if lora_feature_split(init_lora)[2] != "lora_b":
        raise ConfigError("boosting needs a fresh adapter (every lora_b zero) so that it starts at the base model")


def boost_trained(graphdef: nnx.GraphDef, ensemble: Ensemble, init_lora: nnx.State, base: nnx.State,
                  train_table: Table, groups: Sequence[Sequence[int]], config: TrainingConfig, mesh: Mesh, *,
                  steps: int = 1, step_size: float = DEFAULT_STEP_SIZE, seed: int = 0, batch_size: int = 32,
                  validation: Table | None = None, validation_member_logits: np.ndarray | None = None,
                  run_dir: str | Path | None = None, fingerprint: Mapping[str, Any] | None = None,
                  progress: bool = True, cache: LogitCache | None = None) -> tuple[Ensemble, list[int], list[int]]:
    """Trained boosting (:func:`boost`): each round trains ``init_lora`` (a fresh adapter,
    B = 0) on the chosen group's rows under the boosting objective with the training
    engine (``config``; data order and seed ``seed + round``; validation and early
    stopping on the group's validation rows when given). With ``run_dir`` round r
    checkpoints under ``run_dir/boost-<r>/`` with ``fingerprint`` plus the round and
    group, so a rerun restores it instead of training; ``cache`` as in :func:`boost`.
    Returns the ensemble, the chosen groups and the optimizer steps each round trained
    (early stopping may end a round before its budget)."""
    _check_fresh(init_lora)
    steps_trained: list[int] = []

    def learner(round_: BoostingRound) -> Any:
        table = {k: v[round_.rows] for k, v in train_table.items()}
        table["offset_logits"] = boosting_offsets(round_.logits[round_.rows], round_.base_logits[round_.rows])
        result = train(
            boosting_objective(graphdef), stack_trees([init_lora]), base, table, config, mesh,
            seeds=[seed + round_.index], stacked=True, validation=round_.validation,
            run_dir=None if run_dir is None else Path(run_dir) / f"boost-{round_.index}",
            fingerprint={**dict(fingerprint or {}), "boosting_round": round_.index, "group": list(groups[round_.group]),
                         "step_size": step_size},
            progress=progress, desc=f"boost {round_.index + 1}/{steps}",
        )
        steps_trained.append(result.step)
        return unstack_tree(result.lora)[0]

    boosted, chosen = boost(graphdef, ensemble, base, train_table, groups, learner, steps=steps, step_size=step_size,
                            batch_size=batch_size, validation=validation,
                            validation_member_logits=validation_member_logits, mesh=mesh, cache=cache)
    return boosted, chosen, steps_trained


def boost_closed_form(graphdef: nnx.GraphDef, ensemble: Ensemble, init_lora: nnx.State, base: nnx.State,
                      train_table: Table, features: np.ndarray, projector: Projector, groups: Sequence[Sequence[int]],
                      *, steps: int = 1, step_size: float = DEFAULT_STEP_SIZE, l2: float = 1.0,
                      batch_size: int = 32) -> tuple[Ensemble, list[int]]:
    """Closed-form boosting in weight space (:func:`boost`): each round fits w by
    :func:`~jax_ensemble.core.ensemble.ridge_fit` of the residual onehot(y) − softmax(F) on
    ``features`` G (N, K, d) (the train rows' projected label-logit gradients at
    ``init_lora`` = θ0, see :func:`table_features`) over the chosen group's rows, and adds
    the adapter θ0 + P·w (:func:`lifted_adapter`) run through the network."""
    _check_fresh(init_lora)
    if features.shape[:2] != train_table["label_token_ids"].shape:
        raise DataError(f"closed-form boosting: features {features.shape} do not match the training table's "
                        f"{train_table['label_token_ids'].shape} rows and choices (see table_features)")
    g = jnp.asarray(features)

    def learner(round_: BoostingRound) -> Any:
        weights = jnp.asarray(np.where(round_.rows, train_table["weight"], 0.0))
        w = ridge_fit(g, residuals(jnp.asarray(round_.logits), jnp.asarray(train_table["label"])), weights, l2)
        return lifted_adapter(projector, w, init_lora)

    return boost(graphdef, ensemble, base, train_table, groups, learner, steps=steps, step_size=step_size,
                 batch_size=batch_size)


def table_features(splits: Sequence[SplitGradients], width: int) -> np.ndarray:
    """Label-logit features (N, width, d) of a training table from the gradient stage's splits
    (:func:`jax_ensemble.stages.gradients.load_gradients`, one per task in the table's task
    order): each split's :func:`~jax_ensemble.core.ensemble.logit_features`, padded with
    zero rows for the table's padded choices."""
    parts = []
    for split in splits:
        g = logit_features(split.grads, split.labels)
        parts.append(np.pad(g, ((0, 0), (0, width - g.shape[1]), (0, 0))))
    return np.concatenate(parts)


def lifted_adapter(projector: Projector, w: np.ndarray, init_lora: nnx.State) -> nnx.State:
    """The adapter θ0 + P·w: ``init_lora`` (the θ0 the gradients were taken at) with P·w added
    to its feature leaves (:func:`~jax_ensemble.models.lora_gradients.lora_feature_split`:
    the B matrices when B = 0)."""
    features, fixed, _ = lora_feature_split(init_lora)
    moved = jax.tree.map(jnp.add, features, lift(projector, jnp.asarray(w)))
    return nnx.merge_state(moved, fixed)
