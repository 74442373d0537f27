"""Affinity and grouping stages on the gradient stage's output (tiny Llama, mixed binary and
3-class tasks): stacking keeps each task's loss, CLI estimate/cluster, caching, heatmap."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from test_gradient_stage import write_suite

from jax_ensemble import solvers
from jax_ensemble.affinity_stage import affinity_stage, stack_tasks
from jax_ensemble.cli import main
from jax_ensemble.config import config_from_dict, config_to_dict
from jax_ensemble.gradient_stage import SplitGradients


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


@pytest.fixture(scope="module")
def stage_config(tiny_hf_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("affinity_stage")
    return config_from_dict({
        "run_dir": str(root / "run"),
        "model": {"source": str(tiny_hf_dir), "base_dtype": "int8"},
        "lora": {"rank": 2, "alpha": 8.0},
        "tasks": {"suite": str(write_suite(root)), "train_size": 12, "validation_size": 6, "test_size": 4,
                  "max_length": 32},
        "gradients": {"dim": 16, "batch_size": 4, "shard_examples": 8, "block_rows": 64},
        "affinity": {"num_subsets": 1, "l2": 1e-2},
        "clustering": {"num_groups": 1},
    })


def test_estimate_and_cluster_cli(stage_config, tmp_path, capsys):
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump(config_to_dict(stage_config)))
    assert main(["estimate", "--config", str(config_file), "--json"]) == 0
    stage = json.loads(capsys.readouterr().out)
    assert stage["tasks"] == ["polar", "three"] and stage["subsets"] == [["polar", "three"]]
    assert stage["converged"] == 1 and np.isfinite(stage["affinity"]).all()
    estimates = np.load(f"{stage['directory']}/estimates.npz")
    assert estimates["loss"].shape == (1, 2) and estimates["params"].shape == (1, 16)
    assert (estimates["accuracy"] >= 0).all() and (estimates["accuracy"] <= 1).all()
    before = (affinity_stage(stage_config) / "affinity.json").stat().st_mtime_ns  # cached: not rewritten
    assert main(["cluster", "--config", str(config_file), "--json", "clustering.method=each"]) == 0
    grouping = json.loads(capsys.readouterr().out)
    assert grouping["groups"] == [["polar"], ["three"]]
    assert open(grouping["heatmap"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert (affinity_stage(stage_config) / "affinity.json").stat().st_mtime_ns == before
    (affinity_stage(stage_config) / "affinity.json").unlink()  # recomputed from the cached gradients: same result
    assert json.loads((affinity_stage(stage_config) / "affinity.json").read_text())["affinity"] == stage["affinity"]
    np.testing.assert_array_equal(np.load(f"{stage['directory']}/estimates.npz")["params"], estimates["params"])
    assert main(["cluster", "--config", str(config_file), "clustering.num_groups=5"]) == 2
    assert "num_groups must be in [1, 2]" in capsys.readouterr().err
