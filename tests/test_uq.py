"""The ``uq`` stage: every reported metric recomputed independently, on a tiny
transformers-written Llama and two local tasks (numpy and scikit-learn metrics from the
logits the stage scored, those logits from the trained adapters run through the model
here); the ``uq`` command end to end on the real model and real tasks (slow); bad configs."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score
from test_cli import assert_one_line_error, cli
from test_gradient_stage import write_suite

import jax_ensemble.stages.uq as uq_stage
from jax_ensemble.config import config_from_dict
from jax_ensemble.core.trees import unstack_tree
from jax_ensemble.data import load_task, tokenize_split
from jax_ensemble.data.tables import table_of_splits
from jax_ensemble.models.classification import label_logits
from jax_ensemble.models.loading import load_pretrained
from jax_ensemble.models.lora import init_member_adapters, merge_lora
from jax_ensemble.models.lora_gradients import lora_feature_split
from jax_ensemble.stages.ensemble import lifted_adapter
from jax_ensemble.stages.gradients import stage_projector

METRICS = {"accuracy", "ece", "nll", "brier", "ood_auroc"}
NUM_BINS = 5


def _probabilities(logits: np.ndarray) -> np.ndarray:
    """Mean over samples of the softmax of (S, N, K) logits, in float64."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).mean(0)


def _ece(probs: np.ndarray, labels: np.ndarray, num_bins: int) -> float:
    """Σ_b (n_b/N)|acc_b − conf_b| over right-closed bins ((b−1)/B, b/B] of top-label confidence."""
    confidence, hit = probs.max(1), probs.argmax(1) == labels
    total = 0.0
    for b in range(num_bins):
        lo, hi = b / num_bins, (b + 1) / num_bins
        inside = (confidence > lo) & (confidence <= hi) if b else (confidence <= hi)
        if inside.any():
            total += inside.mean() * abs(hit[inside].mean() - confidence[inside].mean())
    return total


def _entropy(probs: np.ndarray) -> np.ndarray:
    return -np.sum(probs * np.log(probs), axis=1)


def _expected_metrics(id_logits, labels, ood_logits) -> dict[str, float]:
    p_in, p_out = _probabilities(id_logits), _probabilities(ood_logits)
    assert p_in.shape[1] == 2  # the answer space of the binary in-distribution task
    is_ood = np.r_[np.zeros(len(p_in)), np.ones(len(p_out))]
    return {
        "accuracy": float(np.mean(p_in.argmax(1) == labels)),
        "ece": _ece(p_in, labels, NUM_BINS),
        "nll": log_loss(labels, p_in, labels=[0, 1]),
        "brier": 2 * brier_score_loss(labels, p_in[:, 1]),  # Σ_k (p_k − y_k)² = 2 (p_1 − y_1)² for K = 2
        "ood_auroc": roc_auc_score(is_ood, np.r_[-p_in.max(1), -p_out.max(1)]),
        "ood_auroc_entropy": roc_auc_score(is_ood, np.r_[_entropy(p_in), _entropy(p_out)]),
    }


def _tiny_config(tiny_hf_dir, tmp_path, steps: int, kl_penalty: float):
    """Tiny model, seed 4, in-distribution ``polar`` (binary), out-of-distribution ``three``, M = 2."""
    suite_dir = tmp_path / "suite"
    suite_dir.mkdir()
    write_suite(suite_dir)
    return config_from_dict({
        "run_dir": str(tmp_path / "run"), "seed": 4,
        "model": {"source": str(tiny_hf_dir), "base_dtype": "int8"},
        "lora": {"rank": 2, "alpha": 8.0},
        "tasks": {"train_size": 12, "validation_size": 4, "test_size": 8, "max_length": 32, "batch_size": 4},
        "training": {"max_steps": steps, "batch_size": 4, "learning_rate": 0.05, "warmup_steps": 0},
        "uq": {"in_distribution": [str(suite_dir / "polar.yaml")], "out_of_distribution": [str(suite_dir / "three.yaml")],
               "members": 2, "kl_penalty": kl_penalty, "num_bins": NUM_BINS},
    })


def test_uq_metrics_match_an_independent_recomputation(tiny_hf_dir, tmp_path, monkeypatch):
    """Tiny model, in-distribution ``polar`` (binary), out-of-distribution ``three`` (its
    prompts answered with polar's label words), M = 2, the KL variant on (weight decay off:
    the variant is the same training with another optimizer setting, and costs a run).
    The logits each method was scored on are captured from ``method_metrics``; the trained
    adapters from the engine. Checked: every metric against numpy / scikit-learn on those
    logits; the members' in- and out-of-distribution logits against the trained adapters
    run through the merged model here; ``single`` is member 0 of the ensemble; the KL
    reference is the base model's label logits; MC-dropout samples differ."""
    config = _tiny_config(tiny_hf_dir, tmp_path, steps=3, kl_penalty=0.5)
    polar, three = config.uq.in_distribution[0], config.uq.out_of_distribution[0]
    scored, trained = [], []
    metrics_fn, engine_train = uq_stage.method_metrics, uq_stage.train

    def spy_metrics(id_logits, id_labels, ood_logits, num_bins):
        scored.append((np.array(id_logits), np.array(id_labels), np.array(ood_logits)))
        return metrics_fn(id_logits, id_labels, ood_logits, num_bins)

    def spy_train(objective, lora, base, table, training, mesh, **kwargs):
        result = engine_train(objective, lora, base, table, training, mesh, **kwargs)
        trained.append({"table": table, "training": training, "seeds": kwargs["seeds"], "lora": result.lora})
        return result

    monkeypatch.setattr(uq_stage, "method_metrics", spy_metrics)
    monkeypatch.setattr(uq_stage, "train", spy_train)
    summary = uq_stage.run_uq(config, progress=False)
    results = summary["results"]
    assert list(results) == ["single", "ensemble", "ensemble_kl", "mc_dropout", "laplace"]
    assert json.loads((tmp_path / "run" / "uq" / "seed-4" / "results.json").read_text())["results"] == results
    assert (tmp_path / "run" / "uq" / "seed-4" / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert summary["test_examples"] == {"in_distribution": 8, "out_of_distribution": 8}

    # 1. metrics from the scored logits, independently
    for name, (id_logits, labels, ood_logits) in zip(results, scored):
        samples = 1 if name in ("single", "laplace") else 2
        assert id_logits.shape == (samples, 8, 2) and ood_logits.shape == (samples, 8, 2), name
        expected = _expected_metrics(id_logits, labels, ood_logits)
        assert results[name].keys() >= METRICS
        for key, value in expected.items():
            assert results[name][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, key)

    # 2. the scored logits from the trained adapters, run through the model here
    model, tokenizer = load_pretrained(str(tiny_hf_dir), base_dtype="int8")
    graphdef, initial, base = init_member_adapters(model, config.lora, [4, 5])  # seeds seed .. seed + M − 1
    id_split = tokenize_split(load_task(polar, config.tasks), "test", tokenizer, 32)
    ood_split = dataclasses.replace(tokenize_split(load_task(three, config.tasks), "test", tokenizer, 32),
                                    label_token_ids=id_split.label_token_ids)
    batches = [{k: jnp.asarray(v) for k, v in table_of_splits([s], pad_id=tokenizer.pad_id, max_length=32).items()}
               for s in (id_split, ood_split)]
    np.testing.assert_array_equal(scored[0][1], id_split.labels)

    def logits_of(lora):
        model = merge_lora(graphdef, lora, base)
        return [np.asarray(label_logits(model, batch)) for batch in batches]

    assert [t["seeds"] for t in trained] == [[4, 5], [4, 5], [4]]
    for name, run in zip(("ensemble", "ensemble_kl"), trained[:2]):
        id_logits, _, ood_logits = scored[list(results).index(name)]
        for m, member in enumerate(unstack_tree(run["lora"])):
            expected_id, expected_ood = logits_of(member)
            np.testing.assert_allclose(id_logits[m], expected_id, rtol=1e-4, atol=1e-4, err_msg=name)
            np.testing.assert_allclose(ood_logits[m], expected_ood, rtol=1e-4, atol=1e-4, err_msg=name)
    np.testing.assert_array_equal(scored[0][0][0], scored[1][0][0])  # single = ensemble member 0
    assert not np.allclose(scored[1][0][0], scored[1][0][1])  # members differ
    assert not np.allclose(scored[1][0], scored[2][0])  # the KL penalty changed the adapters
    kl_table = trained[1]["table"]
    base_model = merge_lora(graphdef, unstack_tree(initial)[0], base)  # B = 0: the base model
    np.testing.assert_allclose(kl_table["base_logits"],
                               np.asarray(label_logits(base_model, {k: jnp.asarray(v) for k, v in kl_table.items()})),
                               rtol=1e-4, atol=1e-4)
    mc = scored[list(results).index("mc_dropout")][0]
    assert not np.allclose(mc[0], mc[1])  # two dropout samples of one adapter


def test_laplace_rows_are_the_models_label_logits_and_their_gradients(tiny_hf_dir, tmp_path, monkeypatch):
    """The laplace method's regression rows checked against the model itself: f0 is the base
    model's z1 − z0 (class 0's column 0), G·w the derivative of z1 − z0 along the adapter
    θ0 + P·w (a central difference through the network); with λ → ∞ (ŵ → 0, Σ → 0) the
    predictive is the base model's softmax on the test rows."""
    config = _tiny_config(tiny_hf_dir, tmp_path, steps=1, kl_penalty=0.0)
    model, tokenizer = load_pretrained(str(tiny_hf_dir), base_dtype="int8")
    setup = uq_stage.seed_setup(config, model, tokenizer)
    fitted, fit = [], uq_stage.laplace.fit_laplace
    monkeypatch.setattr(uq_stage.laplace, "fit_laplace", lambda g, f0, y, l2: fitted.append((g, f0, y)) or fit(g, f0, y, l2))
    uq_stage.laplace_logits(config, setup, progress=False)
    g, f0, y = (np.asarray(a) for a in fitted[0])
    lora0 = unstack_tree(setup.initial)[0]

    def log_odds(lora, table):
        z = np.asarray(label_logits(merge_lora(setup.graphdef, lora, setup.base),
                                    {k: jnp.asarray(v) for k, v in table.items()}), np.float64)
        return z[:, 1] - z[:, 0], z

    base_odds, _ = log_odds(lora0, setup.train_table)
    np.testing.assert_array_equal(y, setup.train_table["label"])
    np.testing.assert_allclose(f0[:, 0], 0)
    np.testing.assert_allclose(g[:, 0], 0)
    np.testing.assert_allclose(f0[:, 1], base_odds, rtol=1e-4, atol=1e-4)
    projector = stage_projector(config, lora_feature_split(lora0)[0])
    w = np.random.default_rng(0).normal(size=g.shape[-1]).astype(np.float32)
    eps = 1e-2
    plus, _ = log_odds(lifted_adapter(projector, eps * w, lora0), setup.train_table)
    minus, _ = log_odds(lifted_adapter(projector, -eps * w, lora0), setup.train_table)
    np.testing.assert_allclose(g[:, 1] @ w, (plus - minus) / (2 * eps), rtol=2e-2, atol=2e-2 * np.abs(plus - minus).max() / eps)

    prior_only = uq_stage.laplace_logits(config, setup, l2=1e12, progress=False)
    _, z = log_odds(lora0, setup.tables[0])
    np.testing.assert_allclose(prior_only.id_logits[0], z - np.log(np.exp(z).sum(1, keepdims=True)), atol=1e-4)
    chosen = uq_stage.laplace_logits(config, setup, progress=False)  # λ by the evidence: the grid's argmax
    assert chosen.l2 == uq_stage.laplace.PRIOR_GRID[int(np.argmax(chosen.log_evidence))]


@pytest.mark.slow
def test_uq_json_reports_every_method(tmp_path):
    result = cli("uq", "--config", "default", "--json", f"run_dir={tmp_path}",
                 "tasks.train_size=16", "tasks.test_size=8", "uq.members=2", "training.max_steps=2",
                 "training.batch_size=4", timeout=2400)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert set(summary["results"]) == {"single", "ensemble", "mc_dropout", "laplace"}
    for name, row in summary["results"].items():
        assert METRICS <= set(row), name
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["ece"] <= 1.0 and row["nll"] > 0
    assert summary["test_examples"] == {"in_distribution": 8, "out_of_distribution": 8}
    assert (tmp_path / "uq" / "seed-0" / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "uq" / "seed-0" / "results.json").read_text())["results"] == summary["results"]


def test_uq_over_seeds_resumes_each_seed_and_pairs_the_methods(tiny_hf_dir, tmp_path, monkeypatch):
    """Seed 4 alone, then seeds 4 and 5: the second call runs seed 5 only (seed 4 restored
    from its results.json) and the summary is the numpy mean / std / paired t-interval of
    the two seeds' recorded results; the seeds' results differ (another initialisation)."""
    config = _tiny_config(tiny_hf_dir, tmp_path, steps=2, kl_penalty=0.0)
    ran, run_seed = [], uq_stage.run_uq_seed
    monkeypatch.setattr(uq_stage, "run_uq_seed", lambda c, *a, **k: ran.append(c.seed) or run_seed(c, *a, **k))
    first = uq_stage.run_uq(config, progress=False)
    summary = uq_stage.run_uq(config, [4, 5], progress=False)
    assert ran == [4, 5] and summary["seeds"] == [4, 5]
    uq_dir = tmp_path / "run" / "uq"
    recorded = {s: json.loads((uq_dir / f"seed-{s}" / "results.json").read_text())["results"] for s in (4, 5)}
    assert recorded[4] == first["results"] and recorded[4] != recorded[5]
    assert json.loads((uq_dir / "summary.json").read_text())["results"] == summary["results"]
    for method in ("single", "ensemble", "mc_dropout"):
        for key in ("accuracy", "ece", "nll", "brier", "ood_auroc"):
            pair = np.array([recorded[4][method][key], recorded[5][method][key]])
            assert summary["results"][method][key] == pytest.approx(pair.mean(), abs=1e-12)
            assert summary["std"][method][key] == pytest.approx(np.std(pair, ddof=1), abs=1e-12)
            if method == "single":
                continue
            d = pair - np.array([recorded[4]["single"][key], recorded[5]["single"][key]])
            half = 12.706204736174707 * np.std(d, ddof=1) / np.sqrt(2)  # t_{0.975, 1}
            got = summary["minus_single"][method][key]
            assert got["mean"] == pytest.approx(d.mean(), abs=1e-12)
            assert got["ci95"] == pytest.approx([d.mean() - half, d.mean() + half], abs=1e-9)
    assert "± " in (uq_dir / "table.md").read_text()
    # a seed recorded before the laplace method gains it without retraining, the same numbers
    path = uq_dir / "seed-4" / "results.json"
    older = json.loads(path.read_text())
    del older["results"]["laplace"], older["laplace_prior"]
    path.write_text(json.dumps(older))
    again = uq_stage.run_uq(config, [4, 5], progress=False)
    assert ran == [4, 5] and again["results"] == summary["results"]
    assert json.loads(path.read_text())["results"] == recorded[4]
    assert json.loads(path.read_text())["laplace_l2"] in uq_stage.laplace.PRIOR_GRID


def test_uq_on_a_2x2x2_mesh_equals_one_device(tiny_hf_dir, tmp_path):
    """The uq command on 8 fake CPU devices (members trained and every method's logits
    computed on the mesh: base by the partition rules, rows over data x fsdp) reports the
    one-device metrics (rtol 1e-5; accuracies exactly). Two rows per device: with one, the
    MC-dropout adapter trains differently on 2 x 2 x 2 (an XLA issue the engine warns about)."""
    config = _tiny_config(tiny_hf_dir, tmp_path, steps=2, kl_penalty=0.5)
    common = [f"model.source={tiny_hf_dir}", "lora.rank=2", "lora.alpha=8.0", "seed=4", "tasks.train_size=12",
              "tasks.validation_size=4", "tasks.test_size=8", "tasks.max_length=32", "tasks.batch_size=8",
              "training.max_steps=2", "training.batch_size=8", "training.learning_rate=0.05",
              "training.warmup_steps=0", "training.eval_batch_size=8", "uq.members=2", "uq.kl_penalty=0.5",
              "uq.weight_decay=0.1", f"uq.num_bins={NUM_BINS}",
              f"uq.in_distribution=[{config.uq.in_distribution[0]}]",
              f"uq.out_of_distribution=[{config.uq.out_of_distribution[0]}]"]
    results = {}
    for devices, mesh in ((1, []), (8, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])):
        out = cli("uq", "--json", f"run_dir={tmp_path / str(devices)}", *common, *mesh, timeout=900,
                  env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"})
        assert out.returncode == 0, out.stderr[-3000:]
        results[devices] = json.loads(out.stdout)["results"]
    assert set(results[8]) == {"single", "ensemble", "ensemble_wd", "ensemble_kl", "mc_dropout", "laplace"}
    for method, row in results[1].items():
        assert results[8][method]["accuracy"] == row["accuracy"], method
        for key in ("ece", "nll", "brier", "ood_auroc", "ood_auroc_entropy"):
            assert results[8][method][key] == pytest.approx(row[key], rel=1e-5, abs=1e-6), (method, key)


def test_uq_seeds_flag_rejects_non_integers():
    assert_one_line_error(cli("uq", "--seeds", "0", "one"), "uq --seeds takes integers")


def test_uq_bad_config_is_one_line():
    assert_one_line_error(cli("uq", "uq.members=1"), "uq.members must be >= 2")
    assert_one_line_error(cli("uq", "uq.out_of_distribution=[rt_polarity]"), "both in- and out-of-distribution")
    assert_one_line_error(cli("uq", "uq.in_distribution=[no_such_task]"), "no_such_task")
