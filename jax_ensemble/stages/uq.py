"""The ``uq`` stage: single adapter vs LoRA ensemble vs MC dropout, on calibration and OOD detection.

Fine-tune on ``uq.in_distribution`` tasks (train splits), then score their test splits and
the test splits of ``uq.out_of_distribution`` tasks (never trained on; their prompts are
answered over the first in-distribution task's label words, the fine-tuned model's answer
space, so an OOD score compares like with like):

- ``single``: one adapter (seed ``seed``; it is member 0 of the ensemble, a standard fine-tune);
- ``ensemble``: M adapters differing in LoRA initialisation and data order (seeds
  ``seed .. seed+M-1``), trained as one stacked program, predicting with the mean of the
  members' probabilities;
- ``ensemble_wd`` / ``ensemble_kl`` (when configured): the same ensemble with weight
  decay on A, B / with a KL penalty toward the base model's label-word distribution;
- ``mc_dropout``: one adapter trained with LoRA dropout, predicting with the mean of M
  dropout samples;
- ``laplace``: no fine-tune at all: the linearized Laplace posterior of the projected-
  gradient regression at the single adapter's initialisation, its prior precision chosen
  by the Laplace evidence (:func:`laplace_logits`).

Over several seeds (``run_uq(config, seeds)``; each seed is the whole experiment again:
LoRA initialisations, data order and dropout keys, on the same splits) every seed writes
``uq/seed-<s>/results.json``, ``table.md`` and ``reliability.png`` under the run directory,
and is skipped when that ``results.json`` holds the same config hash (a killed run resumes
with the missing seeds). ``uq/summary.json`` and ``uq/table.md`` then give each metric's
mean ± std over the seeds and every method's paired difference from ``single`` with a 95%
t-interval (:mod:`jax_ensemble.core.statistics`). Every file is written atomically.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_ensemble.config import Config, config_hash, config_to_dict
from jax_ensemble.core import laplace
from jax_ensemble.core.batch import MODEL_KEYS
from jax_ensemble.core.statistics import mean_std, paired_difference
from jax_ensemble.core.trees import unstack_tree
from jax_ensemble.core.uncertainty import calibration_report, ood_auroc, predictive, reliability_bins
from jax_ensemble.data import load_task, tokenize_split
from jax_ensemble.data.tables import eval_batch_count, table_of_splits
from jax_ensemble.errors import ConfigError
from jax_ensemble.figures import png_bytes, pyplot
from jax_ensemble.models.classification import label_logits
from jax_ensemble.models.loading import load_pretrained
from jax_ensemble.models.lora import init_member_adapters, merge_lora
from jax_ensemble.stages.ensemble import on_mesh, stacked_table_logits, table_outputs
from jax_ensemble.stages.gradients import gradients_at
from jax_ensemble.storage.atomic import atomic_write_bytes, atomic_write_json
from jax_ensemble.training.engine import train
from jax_ensemble.training.losses import classification_objective, kl_regularized_objective, with_base_logits
from jax_ensemble.training.mesh import check_rows_fit, make_mesh, put_tree
from jax_ensemble.training.progress import Progress

log = logging.getLogger(__name__)

METRICS = ("accuracy", "ece", "nll", "brier", "ood_auroc", "ood_auroc_entropy")


@functools.partial(jax.jit, static_argnames="graphdef")
def _member_logits(graphdef: nnx.GraphDef, lora: Any, base: nnx.State, batch: Any,
                   dropout_key: jax.Array | None) -> jax.Array:
    return label_logits(merge_lora(graphdef, lora, base), batch, dropout_key=dropout_key)


def member_logits_fn(graphdef: nnx.GraphDef) -> Callable[[Any, nnx.State, Any, jax.Array | None], jax.Array]:
    """Jitted ``f(lora, base, batch, dropout_key) -> (B, K)`` for one member (or one
    dropout sample when ``dropout_key`` is given); one compiled program per graphdef and
    batch shape serves every member and every call."""
    return functools.partial(_member_logits, graphdef)


@functools.partial(jax.jit, static_argnames="graphdef")
def dropout_samples_logits(graphdef: nnx.GraphDef, lora: Any, base: nnx.State, batch: Any,
                           keys: jax.Array) -> jax.Array:
    """(S, B, K) label logits of one adapter under S dropout masks (``keys``: S keys), one
    vmapped program."""
    batch = {k: batch[k] for k in MODEL_KEYS}
    return jax.vmap(lambda key: label_logits(merge_lora(graphdef, lora, base), batch, dropout_key=key))(keys)


def method_metrics(id_logits: np.ndarray, id_labels: np.ndarray, ood_logits: np.ndarray, num_bins: int) -> dict[str, float]:
    """accuracy, ece, nll, brier on in-distribution; OOD AUROC (max-prob and entropy scores)."""
    report = calibration_report(jnp.asarray(id_logits), jnp.asarray(id_labels), num_bins=num_bins)
    probs_in, probs_out = predictive(jnp.asarray(id_logits)), predictive(jnp.asarray(ood_logits))
    report["ood_auroc"] = float(ood_auroc(probs_in, probs_out, "max_prob"))
    report["ood_auroc_entropy"] = float(ood_auroc(probs_in, probs_out, "entropy"))
    return report


def reliability_png(curves: dict[str, tuple[np.ndarray, np.ndarray]], num_bins: int) -> bytes:
    """One reliability diagram per method: accuracy vs confidence per bin, and the diagonal."""
    plt = pyplot()

    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 3.3), sharey=True, squeeze=False)
    centers = (np.arange(num_bins) + 0.5) / num_bins
    for ax, (name, (logits, labels)) in zip(axes[0], curves.items()):
        bins = reliability_bins(predictive(jnp.asarray(logits)), jnp.asarray(labels), num_bins)
        filled = np.asarray(bins.counts) > 0
        ax.bar(centers[filled], np.asarray(bins.accuracy)[filled], width=1.0 / num_bins, edgecolor="black",
               alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set_title(name)
        ax.set_xlabel("confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("accuracy")
    fig.tight_layout()
    return png_bytes(fig)


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    """One seed: a row of metrics per method."""
    lines = ["| method | " + " | ".join(METRICS) + " |", "| --- |" + " ---: |" * len(METRICS)]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.4f}" for k in METRICS) + " |")
    return "\n".join(lines) + "\n"


def seed_statistics(per_seed: dict[int, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Per method and metric over the seeds' ``results``: ``mean``, ``std`` and, for every
    method but ``single``, ``minus_single``: the paired difference method − single."""
    seeds = list(per_seed)
    methods = list(per_seed[seeds[0]])
    values = {m: {k: [per_seed[s][m][k] for s in seeds] for k in METRICS} for m in methods}
    return {
        "mean": {m: {k: mean_std(v)[0] for k, v in row.items()} for m, row in values.items()},
        "std": {m: {k: mean_std(v)[1] for k, v in row.items()} for m, row in values.items()},
        "minus_single": {m: {k: paired_difference(values[m][k], values["single"][k]) for k in METRICS}
                         for m in methods if m != "single"},
    }


def seeds_markdown(statistics: dict[str, Any], seeds: Sequence[int]) -> str:
    """Mean ± std per method and metric, then each method − single with its 95% interval."""
    lines = [f"Over seeds {', '.join(map(str, seeds))}: mean ± std", "",
             "| method | " + " | ".join(METRICS) + " |", "| --- |" + " ---: |" * len(METRICS)]
    for m, row in statistics["mean"].items():
        lines.append(f"| {m} | " + " | ".join(f"{row[k]:.4f} ± {statistics['std'][m][k]:.4f}" for k in METRICS) + " |")
    lines += ["", "Paired difference from `single` (mean, 95% t-interval)", "",
              "| method − single | " + " | ".join(METRICS) + " |", "| --- |" + " ---: |" * len(METRICS)]
    for m, row in statistics["minus_single"].items():
        cells = [f"{d['mean']:+.4f}" + ("" if d["ci95"] is None else f" [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]")
                 for d in (row[k] for k in METRICS)]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_uq(config: Config, seeds: Sequence[int] | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Every method of the module doc for each seed (default: ``config.seed`` alone), each
    seed resumed from its ``uq/seed-<s>/results.json`` when recorded with the same config;
    returns ``{"seeds", "per_seed": {s: seed summary}, "results": mean per method and metric,
    "std", "minus_single", ...}`` and writes it to ``uq/summary.json``."""
    seeds = [config.seed] if seeds is None else list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"uq: seeds must be distinct and at least one, got {seeds}")
    out_dir = config.resolved_run_dir() / "uq"
    loaded: tuple[Any, Any] | None = None
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in seeds:
        seed_config = dataclasses.replace(config, seed=seed)
        recorded = out_dir / f"seed-{seed}" / "results.json"
        restored = recorded.is_file() and (done := json.loads(recorded.read_text()))["config_hash"] == config_hash(
            seed_config)
        if restored and done.get("laplace_prior") == LAPLACE_PRIOR:
            log.info("uq: seed %d restored from %s", seed, recorded)
            per_seed[seed] = done
            continue
        if loaded is None:
            loaded = load_pretrained(config.model.source, base_dtype=config.model.base_dtype,
                                     compute_dtype=config.model.compute_dtype, kernels=config.model.kernels)
        if restored:  # recorded before this laplace method: (re)compute it, without retraining the others
            log.info("uq: seed %d restored from %s; computing laplace", seed, recorded)
            per_seed[seed] = add_laplace(seed_config, done, *loaded, progress=progress)
        else:
            per_seed[seed] = run_uq_seed(seed_config, *loaded, progress=progress)
    statistics = seed_statistics({s: per_seed[s]["results"] for s in seeds})
    first = per_seed[seeds[0]]
    summary = {
        "seeds": seeds,
        "results": statistics["mean"],
        "std": statistics["std"],
        "minus_single": statistics["minus_single"],
        **{key: first[key] for key in ("members", "in_distribution", "out_of_distribution", "test_examples",
                                       "num_bins", "training_rows")},
        "per_seed": {str(s): {k: v for k, v in per_seed[s].items() if k != "config"} for s in seeds},
        "table_md": str(out_dir / "table.md"),
    }
    atomic_write_bytes(out_dir / "table.md", seeds_markdown(statistics, seeds).encode())
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


@dataclasses.dataclass(frozen=True)
class SeedSetup:
    """What every method of one seed shares: the M members' initial adapters (stacked) on
    ``graphdef``, the base on ``mesh``, the training table, and the in- and out-of-
    distribution test tables (``tables``, K = the in-distribution label words) with the
    in-distribution labels."""

    graphdef: nnx.GraphDef
    initial: Any
    base: nnx.State
    mesh: Any
    train_table: Any
    tables: tuple[Any, Any]
    id_labels: np.ndarray
    ood_examples: int
    seeds: list[int]


def seed_setup(config: Config, model: nnx.Module, tokenizer: Any) -> SeedSetup:
    """Tokenized tables, initial members and the mesh of ``config.seed`` (the module doc's setup)."""
    uq = config.uq
    tokenize = lambda ref, split: tokenize_split(load_task(ref, config.tasks), split, tokenizer, config.tasks.max_length)
    train_table = table_of_splits([tokenize(t, "train") for t in uq.in_distribution], pad_id=tokenizer.pad_id,
                                  max_length=config.tasks.max_length)
    id_test = [tokenize(t, "test") for t in uq.in_distribution]
    # OOD inputs keep their own prompts but are answered in the fine-tuned model's answer
    # space: the first in-distribution task's label words.
    ood_test = [dataclasses.replace(tokenize(t, "test"), label_token_ids=id_test[0].label_token_ids)
                for t in uq.out_of_distribution]
    seeds = [config.seed + m for m in range(uq.members)]
    graphdef, initial, base = init_member_adapters(model, config.lora, seeds)
    mesh = make_mesh(config.mesh)  # training and inference: base by the partition rules, rows over (data, fsdp)
    check_rows_fit(config.tasks.batch_size, mesh, "tasks.batch_size")
    base, _ = on_mesh(mesh, base)
    width = max(len(s.label_token_ids) for s in id_test)
    tables = tuple(table_of_splits(splits, pad_id=tokenizer.pad_id, max_length=config.tasks.max_length,
                                   num_choices=width) for splits in (id_test, ood_test))
    return SeedSetup(graphdef, initial, base, mesh, train_table, tables, np.concatenate([s.labels for s in id_test]),
                     int(sum(len(s.labels) for s in ood_test)), seeds)


LAPLACE_PRIOR = "evidence"
"""How the laplace method's λ is chosen, recorded with each seed: a seed recorded with
another choice (or before the method) has its laplace row recomputed."""


class LaplaceOutputs(NamedTuple):
    """(1, N, K) log predictive probabilities on the in- and out-of-distribution tables (as
    logits: their softmax is the predictive), and the prior's λ with its log evidence."""

    id_logits: np.ndarray
    ood_logits: np.ndarray
    l2: float
    log_evidence: list[float]


def laplace_logits(config: Config, setup: SeedSetup, *, l2: float | None = None,
                   progress: bool = True) -> LaplaceOutputs | None:
    """The linearized Laplace (:mod:`jax_ensemble.core.laplace`) at the single adapter's
    initialisation θ0 (member 0, B = 0): the training rows' projected label-logit gradients
    (the gradient stage's projector and features) fit ŵ and H with the λ of the largest
    Laplace evidence on :data:`laplace.PRIOR_GRID` (or ``l2`` when given); each test table
    gets log predictive probabilities by the probit approximation. None when the
    in-distribution tasks differ in K."""
    k = setup.tables[0]["label_token_ids"].shape[1]
    if (setup.train_table["label_token_ids"] < 0).any() or (setup.tables[0]["label_token_ids"] < 0).any():
        log.info("uq: laplace skipped: the in-distribution tasks have different numbers of label words")
        return None
    tables = (setup.train_table, *setup.tables)
    bar = Progress(sum(eval_batch_count(t, config.gradients.batch_size) for t in tables), "laplace gradients",
                   "batch", enabled=progress)
    gradients = gradients_at(config, setup.graphdef, unstack_tree(setup.initial)[0], setup.base, setup.mesh,
                             on_batch=lambda: bar.update(1))

    def relative_logits(table: Any) -> tuple[jax.Array, jax.Array]:
        """(f0 (N, K), G (N, K, d)): label-word logits minus class 0's and their gradients."""
        if k == 2:  # the output is the log-odds of the row's label: ask for class 1's, z1 - z0
            table = {**table, "label": np.ones_like(table["label"])}
        f0, g = gradients(table, k)
        if k == 2:
            f0, g = np.stack([np.zeros_like(f0), f0], axis=1), np.stack([np.zeros_like(g), g], axis=1)
        return jnp.asarray(f0), jnp.asarray(g)

    f0, g = relative_logits(setup.train_table)
    labels = jnp.asarray(setup.train_table["label"])
    chosen, evidence = laplace.evidence_l2(g, f0, labels)
    posterior = laplace.fit_laplace(g, f0, labels, chosen if l2 is None else l2)
    out = []
    for table in setup.tables:
        f0, g = relative_logits(table)
        out.append(np.asarray(laplace.probit_log_probs(*laplace.logit_moments(posterior, g, f0)))[None])
    bar.close()
    log.info("uq: laplace prior λ = %g (log evidence %s over λ = %s)", chosen if l2 is None else l2,
             ", ".join(f"{v:.1f}" for v in evidence), ", ".join(f"{v:g}" for v in laplace.PRIOR_GRID))
    return LaplaceOutputs(out[0], out[1], chosen if l2 is None else l2, evidence.tolist())


def laplace_record(outputs: LaplaceOutputs) -> dict[str, Any]:
    """What a seed's results.json records of the laplace method beside its metrics."""
    return {"laplace_prior": LAPLACE_PRIOR, "laplace_l2": outputs.l2, "laplace_log_evidence": outputs.log_evidence}


def add_laplace(config: Config, done: dict[str, Any], model: nnx.Module, tokenizer: Any, *,
                progress: bool = True) -> dict[str, Any]:
    """``done`` (a seed's recorded summary) with the ``laplace`` method's metrics added and
    its results.json and table.md rewritten (its reliability.png keeps the other methods)."""
    setup = seed_setup(config, model, tokenizer)
    outputs = laplace_logits(config, setup, progress=progress)
    if outputs is None:
        return done
    metrics = method_metrics(outputs.id_logits, setup.id_labels, outputs.ood_logits, config.uq.num_bins)
    done = {**done, "results": {**done["results"], "laplace": metrics}, **laplace_record(outputs)}
    out_dir = config.resolved_run_dir() / "uq" / f"seed-{config.seed}"
    atomic_write_bytes(out_dir / "table.md", markdown_table(done["results"]).encode())
    atomic_write_json(out_dir / "results.json", done)
    return done


def run_uq_seed(config: Config, model: nnx.Module, tokenizer: Any, *, progress: bool = True) -> dict[str, Any]:
    """Train and evaluate every method of the module doc for ``config.seed``; write
    ``uq/seed-<seed>/`` and return that seed's JSON-able summary."""
    uq, training = config.uq, config.training
    setup = seed_setup(config, model, tokenizer)
    graphdef, initial, base, mesh, seeds = setup.graphdef, setup.initial, setup.base, setup.mesh, setup.seeds
    train_table, tables, id_labels = setup.train_table, setup.tables, setup.id_labels
    bs = config.tasks.batch_size

    def evaluate(graphdef, loras: Any, keys: jax.Array | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(S, N, K) in- and out-of-distribution logits: the M stacked members (S = M), or with
        ``keys`` the single adapter ``loras`` (leaves (1, …)) under S dropout masks."""
        if keys is None:
            return tuple(stacked_table_logits(graphdef, loras, base, t, bs, mesh=mesh) for t in tables)
        lora = put_tree(unstack_tree(loras)[0], mesh)
        return tuple(table_outputs(lambda b: dropout_samples_logits(graphdef, lora, base, b, keys), t, bs, axis=1,
                                   mesh=mesh) for t in tables)

    outputs: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def members(objective, initial_loras, training_config, table, member_seeds, desc, dropout=False) -> Any:
        """The stacked members trained by the engine (no validation: a fixed length, as the paper)."""
        return train(objective, initial_loras, base, table, training_config, mesh, seeds=member_seeds, stacked=True,
                     dropout=dropout, progress=progress, desc=desc).lora

    log.info("uq: training %d stacked LoRA members on %s (%d rows)", uq.members, ", ".join(uq.in_distribution),
             len(train_table["label"]))
    plain = classification_objective(graphdef)
    trained = members(plain, initial, training, train_table, seeds, "ensemble")
    id_logits, ood_logits = evaluate(graphdef, trained)
    outputs["single"] = (id_logits[:1], ood_logits[:1])
    outputs["ensemble"] = (id_logits, ood_logits)
    if uq.weight_decay > 0:
        decayed = dataclasses.replace(training, weight_decay=uq.weight_decay)
        wd = members(plain, initial, decayed, train_table, seeds, "ensemble_wd")
        outputs["ensemble_wd"] = evaluate(graphdef, wd)
    if uq.kl_penalty > 0:
        at_base = jax.tree.map(lambda x: x[:1], initial)  # B = 0: the base model's logits
        base_logits = stacked_table_logits(graphdef, at_base, base, train_table, bs, mesh=mesh)[0]
        kl = members(kl_regularized_objective(graphdef, uq.kl_penalty), initial, training,
                     with_base_logits(train_table, base_logits), seeds, "ensemble_kl")
        outputs["ensemble_kl"] = evaluate(graphdef, kl)
    graphdef_mc, initial_mc, _ = init_member_adapters(
        model, dataclasses.replace(config.lora, dropout=uq.mc_dropout), seeds[:1]
    )
    mc = members(classification_objective(graphdef_mc), initial_mc, training, train_table, seeds[:1], "mc_dropout",
                 dropout=True)
    outputs["mc_dropout"] = evaluate(graphdef_mc, mc, jax.random.split(jax.random.key(config.seed + 10_000), uq.members))
    linearized = laplace_logits(config, setup, progress=progress)
    if linearized is not None:
        outputs["laplace"] = (linearized.id_logits, linearized.ood_logits)

    results = {name: method_metrics(i, id_labels, o, uq.num_bins) for name, (i, o) in outputs.items()}
    out_dir = config.resolved_run_dir() / "uq" / f"seed-{config.seed}"
    png = reliability_png({name: (i, id_labels) for name, (i, _) in outputs.items()}, uq.num_bins)
    atomic_write_bytes(out_dir / "reliability.png", png)
    atomic_write_bytes(out_dir / "table.md", markdown_table(results).encode())
    summary = {
        "results": results,
        "members": uq.members,
        "in_distribution": list(uq.in_distribution),
        "out_of_distribution": list(uq.out_of_distribution),
        "test_examples": {"in_distribution": int(len(id_labels)), "out_of_distribution": setup.ood_examples},
        "num_bins": uq.num_bins,
        "training_rows": int(len(train_table["label"])),
        "seed": config.seed,
        "config_hash": config_hash(config),
        "config": config_to_dict(config),
        "reliability_png": str(out_dir / "reliability.png"),
        **({} if linearized is None else laplace_record(linearized)),
    }
    atomic_write_json(out_dir / "results.json", summary)
    return summary
