"""Affinity and grouping stages on the gradient stage's output (tiny Llama, four mixed binary
and 3-class tasks): stacking keeps each task's loss; the stage's per-subset regressions
against float64 scipy fits, its validation scores recomputed in numpy, its affinity matrix
against a loop over the definition; CLI estimate/cluster, caching, heatmap."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.optimize import minimize
from scipy.special import logsumexp
from test_affinity import _affinity_by_definition
from test_gradient_stage import write_suite

from jax_ensemble.cli import main
from jax_ensemble.config import config_from_dict, config_to_dict
from jax_ensemble.core import solvers
from jax_ensemble.errors import CheckpointError
from jax_ensemble.stages.gradients import SplitGradients, load_gradients
from jax_ensemble.stages.grouping import affinity_stage, load_affinity, stack_tasks


def test_stacking_mixed_tasks_keeps_losses_and_predictions():
    rng = np.random.default_rng(0)
    d = 5
    binary = {s: SplitGradients(rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=n).astype(np.float32),
                                rng.integers(0, 2, n)) for s, n in (("train", 6), ("validation", 3))}
    three = {s: SplitGradients(rng.normal(size=(n, 3, d)).astype(np.float32),
                               rng.normal(size=(n, 3)).astype(np.float32), rng.integers(0, 3, n))
             for s, n in (("train", 4), ("validation", 2))}
    stacked = stack_tasks({"b": binary, "t": three})
    assert stacked.features.shape == (15, 3, d) and stacked.names == ("b", "t")
    np.testing.assert_array_equal(stacked.task_ids, [0] * 9 + [1] * 6)
    np.testing.assert_array_equal(stacked.train_mask, [1] * 6 + [0] * 3 + [1] * 4 + [0] * 2)
    w = rng.normal(size=d).astype(np.float32)
    z = np.asarray(solvers.predictions(w, stacked.features, stacked.offsets))
    losses = np.asarray(solvers.example_losses(z, stacked.labels))
    f_binary = np.concatenate([binary[s].f0 + binary[s].grads @ w for s in ("train", "validation")])
    np.testing.assert_allclose(losses[:9], np.logaddexp(0, -f_binary), rtol=1e-5)  # softplus(-f): gold-relative
    np.testing.assert_array_equal(np.asarray(solvers.correct(z, stacked.labels))[:9], f_binary > 0)
    z3 = np.concatenate([three[s].f0 + three[s].grads @ w for s in ("train", "validation")])
    y3 = np.concatenate([three[s].labels for s in ("train", "validation")])
    expected = np.log(np.exp(z3).sum(1)) - z3[np.arange(6), y3]
    np.testing.assert_allclose(losses[9:], expected, rtol=1e-5)
    only_binary = stack_tasks({"b": binary})
    assert only_binary.features.shape == (9, d) and (only_binary.labels == 1).all()


def write_four_task_suite(directory: Path) -> Path:
    """The gradient stage's two tasks (binary ``polar``, 3-class ``three``) plus a binary
    ``tone`` and a 3-class ``shape`` task, so that the pairs give 6 distinct subsets."""
    write_suite(directory)
    rng = np.random.default_rng(1)
    words = ["red", "blue", "round", "flat", "tall", "short", "soft", "hard"]
    for name, labels in (("tone", {"low": "l", "high": "h"}), ("shape", {"x": "x", "o": "o", "v": "v"})):
        rows = [{"text": " ".join(rng.choice(words, rng.integers(2, 9))), "label": list(labels)[i % len(labels)]}
                for i in range(30)]
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        spec = {"name": name, "template": "Says: {text}\nLabel:", "label_words": labels, "data": f"{name}.jsonl"}
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    suite = directory / "suite.yaml"
    suite.write_text(yaml.safe_dump({"tasks": ["polar.yaml", "three.yaml", "tone.yaml", "shape.yaml"]}))
    return suite


L2 = 0.5


@pytest.fixture(scope="module")
def stage_config(tiny_hf_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("affinity_stage")
    return config_from_dict({
        "run_dir": str(root / "run"),
        "model": {"source": str(tiny_hf_dir), "base_dtype": "int8"},
        "lora": {"rank": 2, "alpha": 8.0},
        "tasks": {"suite": str(write_four_task_suite(root)), "train_size": 12, "validation_size": 6, "test_size": 4,
                  "max_length": 32},
        "gradients": {"dim": 16, "batch_size": 4, "shard_examples": 8, "block_rows": 64},
        "affinity": {"num_subsets": 6, "subset_fraction": 0.3, "l2": L2},  # 4 tasks, pairs: all C(4, 2) = 6
        "clustering": {"num_groups": 2},
    })


def _reference_fit(parts: list[SplitGradients], l2: float) -> np.ndarray:
    """argmin_θ Σ_i ℓ_i(θ) + λ‖θ‖² over the training rows ``parts`` in float64 with scipy's
    L-BFGS-B (analytic gradient), written from the definitions: a binary row's output is
    the gold-relative log-odds z = f0 + ⟨g, θ⟩ with ℓ = log(1 + e^{−z}); a K-way row's is
    z = f0 + Gθ with ℓ = logsumexp(z) − z_y."""
    d = parts[0].grads.shape[-1]

    def value_and_grad(theta):
        total, grad = l2 * theta @ theta, 2 * l2 * theta
        for part in parts:
            g, f0 = part.grads.astype(np.float64), part.f0.astype(np.float64)
            if f0.ndim == 1:
                z = f0 + g @ theta
                total += np.sum(np.logaddexp(0, -z))
                grad = grad - g.T @ (1 / (1 + np.exp(z)))
            else:
                z = f0 + np.einsum("nkd,d->nk", g, theta)
                p = np.exp(z - logsumexp(z, axis=1, keepdims=True))
                onehot = np.eye(z.shape[1])[part.labels]
                total += np.sum(logsumexp(z, axis=1) - z[np.arange(len(z)), part.labels])
                grad = grad + np.einsum("nk,nkd->d", p - onehot, g)
        return total, grad

    result = minimize(value_and_grad, np.zeros(d), jac=True, method="L-BFGS-B",
                      options={"maxiter": 10_000, "ftol": 1e-15, "gtol": 1e-10})
    assert result.success, result.message
    return result.x


def _validation_scores(part: SplitGradients, theta: np.ndarray) -> tuple[float, float]:
    """(mean loss, accuracy) of one task's validation rows under f0 + Gθ, in numpy."""
    g, f0 = part.grads.astype(np.float64), part.f0.astype(np.float64)
    if f0.ndim == 1:
        z = f0 + g @ theta
        return float(np.mean(np.logaddexp(0, -z))), float(np.mean(z > 0))
    z = f0 + np.einsum("nkd,d->nk", g, theta)
    loss = logsumexp(z, axis=1) - z[np.arange(len(z)), part.labels]
    return float(np.mean(loss)), float(np.mean(np.argmax(z, axis=1) == part.labels))


def test_estimates_and_affinity_match_independent_computations(stage_config):
    """Each subset's regression equals a float64 scipy fit on the gradient stage's rows of
    its tasks (built here from ``load_gradients``, not from ``stack_tasks``); every
    (subset, task) validation loss and accuracy in ``estimates.npz`` is recomputed in numpy
    from the saved parameters; the affinity matrix in ``affinity.json`` equals a loop over
    its definition applied to the saved scores (minus the losses), and is not trivially 0."""
    directory = affinity_stage(stage_config, progress=False)
    stage = json.loads((directory / "affinity.json").read_text())
    names = stage["tasks"]
    assert names == ["polar", "three", "tone", "shape"] and stage["metric"] == "loss"
    estimates = np.load(directory / "estimates.npz")
    subsets = estimates["subsets"]
    assert subsets.shape == (6, 4) and (subsets.sum(1) == 2).all() and len({tuple(r) for r in subsets}) == 6
    assert [[names[t] for t in np.flatnonzero(row)] for row in subsets] == stage["subsets"]
    assert estimates["converged"].all() and stage["converged"] == 6
    gradients = load_gradients(stage["gradients"])
    assert [len(gradients[t]["train"].labels) for t in names] == [12] * 4
    for s, members in enumerate(subsets):
        params = estimates["params"][s].astype(np.float64)
        expected = _reference_fit([gradients[names[t]]["train"] for t in np.flatnonzero(members)], L2)
        np.testing.assert_allclose(params, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
        for t, name in enumerate(names):
            loss, accuracy = _validation_scores(gradients[name]["validation"], params)
            assert estimates["loss"][s, t] == pytest.approx(loss, rel=1e-4), (s, name)
            assert estimates["accuracy"][s, t] == pytest.approx(accuracy, abs=1e-6), (s, name)
    matrix = np.array(stage["affinity"])
    expected = _affinity_by_definition(-estimates["loss"].astype(np.float64), subsets.astype(bool))
    np.testing.assert_allclose(matrix, expected, atol=1e-6)
    assert np.abs(matrix).max() > 0.1


def test_estimate_and_cluster_cli(stage_config, tmp_path, capsys):
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump(config_to_dict(stage_config)))
    assert main(["estimate", "--config", str(config_file), "--json"]) == 0
    stage = json.loads(capsys.readouterr().out)
    assert stage["tasks"] == ["polar", "three", "tone", "shape"] and len(stage["subsets"]) == 6
    directory = affinity_stage(stage_config)
    assert stage["affinity"] == json.loads((directory / "affinity.json").read_text())["affinity"]
    estimates = np.load(directory / "estimates.npz")
    assert estimates["loss"].shape == (6, 4) and estimates["params"].shape == (6, 16)
    before = (directory / "affinity.json").stat().st_mtime_ns  # cached: not rewritten
    assert main(["cluster", "--config", str(config_file), "--json", "clustering.method=each"]) == 0
    grouping = json.loads(capsys.readouterr().out)
    assert grouping["groups"] == [["polar"], ["three"], ["tone"], ["shape"]]
    assert open(grouping["heatmap"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert (affinity_stage(stage_config) / "affinity.json").stat().st_mtime_ns == before
    (directory / "affinity.json").unlink()  # recomputed from the cached gradients: same result
    assert json.loads((affinity_stage(stage_config) / "affinity.json").read_text())["affinity"] == stage["affinity"]
    np.testing.assert_array_equal(np.load(directory / "estimates.npz")["params"], estimates["params"])
    capsys.readouterr()
    text = (directory / "affinity.json").read_text()  # truncated, then altered estimates: recomputed with a warning
    for name, damage in (("affinity.json", lambda p: p.write_text(text[: len(text) // 2])),
                         ("estimates.npz", lambda p: p.write_bytes(p.read_bytes()[:-9] + b"corrupted"))):
        damage(directory / name)
        assert main(["cluster", "--config", str(config_file), "--json", "clustering.method=each"]) == 0
        captured = capsys.readouterr()
        assert json.loads(captured.out)["groups"] == grouping["groups"]
        assert f"{directory / name} is corrupt" in captured.err and "Traceback" not in captured.err
        assert json.loads((directory / "affinity.json").read_text())["affinity"] == stage["affinity"]
    with pytest.raises(CheckpointError, match="no verified affinity.json"):
        load_affinity(directory.parent / "missing")
    assert main(["estimate", "--config", str(config_file), "--json", "affinity.num_subsets=50"]) == 0
    captured = capsys.readouterr()  # more subsets than exist: all of them, said in one line
    assert sorted(map(sorted, json.loads(captured.out)["subsets"])) == sorted(map(sorted, stage["subsets"]))
    assert "affinity.num_subsets = 50 is more than the 6 distinct subsets of 2 of 4 tasks: using all 6" in captured.err
    assert main(["cluster", "--config", str(config_file), "clustering.num_groups=5"]) == 2
    assert "num_groups must be in [1, 4]" in capsys.readouterr().err
