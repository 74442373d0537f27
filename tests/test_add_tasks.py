"""Placing a task into a finished run: its gradients, affinity row and group against a
from-scratch gradient stage and affinity over the same subsets (tiny Llama, local tasks)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from test_affinity_stage import L2, write_four_task_suite
from test_cli import assert_one_line_error, cli

from jax_ensemble.config import config_from_dict
from jax_ensemble.core import affinity
from jax_ensemble.data import load_task
from jax_ensemble.errors import DataError
from jax_ensemble.models.classification import label_logits
from jax_ensemble.models.lora import merge_lora
from jax_ensemble.stages.adapters import adapters_for_plan, suite_tables
from jax_ensemble.stages.add_tasks import new_task_gradients, place_tasks
from jax_ensemble.stages.gradients import gradient_stage, load_gradients
from jax_ensemble.stages.grouping import load_estimates, stack_tasks
from jax_ensemble.stages.model import load_run_model


def _config(tiny_hf_dir, run_dir, suite):
    return config_from_dict({
        "run_dir": str(run_dir),
        "model": {"source": str(tiny_hf_dir), "base_dtype": "int8"},
        "lora": {"rank": 2, "alpha": 8.0},
        "tasks": {"suite": str(suite), "train_size": 12, "validation_size": 6, "test_size": 4, "max_length": 32},
        "gradients": {"dim": 16, "batch_size": 4, "shard_examples": 8, "block_rows": 64},
        "affinity": {"num_subsets": 3, "subset_fraction": 0.3, "l2": L2},  # 3 tasks, pairs: all C(3, 2) = 3
        "clustering": {"num_groups": 2},
    })


def test_placed_task_equals_a_from_scratch_stage_over_the_same_subsets(tiny_hf_dir, tmp_path):
    four = write_four_task_suite(tmp_path)  # polar, three, tone, shape
    three = tmp_path / "three_tasks.yaml"
    three.write_text(yaml.safe_dump({"tasks": ["polar.yaml", "three.yaml", "tone.yaml"]}))
    run = _config(tiny_hf_dir, tmp_path / "run", three)
    new = str(tmp_path / "shape.yaml")
    placed = place_tasks(run, [new], progress=False)
    assert placed["tasks"] == ["shape"] and placed["affinity_tasks"] == ["polar", "three", "tone", "shape"]
    assert placed["all_converged"] and (tmp_path / "run" / "added").is_dir()

    # from scratch: the four-task gradient stage (θ0 = LoRA's init for the same seed, the same P)
    scratch = dataclasses.replace(run, run_dir=str(tmp_path / "scratch"),
                                  tasks=dataclasses.replace(run.tasks, suite=str(four)))
    gradients = load_gradients(gradient_stage(scratch, progress=False))
    added = new_task_gradients(run, [load_task(new, run.tasks)], load_run_model(run, sanity_check=False),
                               progress=False)
    for split, part in added["shape"].items():
        np.testing.assert_allclose(part.grads, gradients["shape"][split].grads, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(part.f0, gradients["shape"][split].f0, rtol=1e-5, atol=1e-6)

    names = placed["affinity_tasks"]
    old = load_estimates(next((tmp_path / "run" / "affinity").iterdir()))
    subsets = np.concatenate([np.pad(old["subsets"], ((0, 0), (0, 1))),
                              [[n in members for n in names] for members in placed["new_subsets"]]])
    assert len(placed["new_subsets"]) == 2 and all("shape" in s for s in placed["new_subsets"])  # ⌈3·2/3⌉ subsets
    data = stack_tasks(gradients)
    est = affinity.estimate_subsets(data.features, data.offsets, data.labels, data.task_ids, data.train_mask,
                                    data.val_mask, subsets, l2=L2)
    expected = affinity.affinity_matrix(-np.asarray(est.loss), subsets)
    np.testing.assert_allclose(placed["affinity"], expected, rtol=1e-4, atol=1e-5)

    row = dict(zip(names, expected[3]))
    means = [np.mean([row[t] for t in group]) for group in placed["groups"]]
    assert placed["placement"]["shape"]["group_affinity"] == pytest.approx(means, abs=1e-5)

    # the placement: each group's fit with and without shape, and shape alone, solved here
    groups = [[names.index(t) for t in group] for group in placed["groups"]]
    candidates = [set(g) for g in groups] + [set(g) | {3} for g in groups] + [{3}]
    member = np.array([[t in c for t in range(4)] for c in candidates])
    fits = -np.asarray(affinity.estimate_subsets(data.features, data.offsets, data.labels, data.task_ids,
                                                 data.train_mask, data.val_mask, member, l2=L2).loss)
    m = len(groups)
    gains = [fits[m + g, 3] + sum(fits[m + g, j] - fits[g, j] for j in groups[g]) for g in range(m)]
    got = placed["placement"]["shape"]
    assert got["estimated_gain"]["groups"] == pytest.approx(gains, rel=1e-4, abs=1e-5)
    assert got["estimated_gain"]["alone"] == pytest.approx(fits[2 * m, 3], rel=1e-4)
    assert got["group"] == (int(np.argmax(gains)) if max(gains) >= fits[2 * m, 3] else None)

    with pytest.raises(DataError, match="task 'tone' is already in the run"):
        place_tasks(run, [str(tmp_path / "tone.yaml")], progress=False)


@pytest.mark.slow
def test_add_tasks_retrains_one_group_and_refits_its_tasks(tiny_hf_dir, tmp_path):
    """A finished three-task run, then ``add-tasks`` with the fourth: the group the placement
    chose is retrained from its own adapter (the others restored untouched), the weights of
    the tasks it serves and of the new task refit, and those tasks' test accuracy is what
    their members' logits, run through the model here and mixed with the reported weights,
    give; the other tasks keep the run's weights and accuracy. A second call restores."""
    write_four_task_suite(tmp_path)
    three = tmp_path / "three_tasks.yaml"
    three.write_text(yaml.safe_dump({"tasks": ["polar.yaml", "three.yaml", "tone.yaml"]}))
    run_dir = tmp_path / "run"
    common = [f"model.source={tiny_hf_dir}", f"tasks.suite={three}", "lora.rank=2", "tasks.train_size=12",
              "tasks.validation_size=8", "tasks.test_size=8", "tasks.max_length=32", "tasks.batch_size=8",
              "gradients.dim=16", "gradients.batch_size=4", "affinity.num_subsets=3", "clustering.num_groups=2",
              "training.max_steps=3", "training.batch_size=4", "training.warmup_steps=0",
              "training.learning_rate=0.05", "training.eval_every=3", "ensemble.boosting_steps=1",
              "sanity_prompt=good", f"run_dir={run_dir}"]
    assert cli("run", *common, timeout=1800).returncode == 0
    run = json.loads((run_dir / "metrics.json").read_text())
    out = cli("add-tasks", "--run", str(run_dir), str(tmp_path / "shape.yaml"), "--json", timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    added = json.loads(out.stdout)
    where = added["placement"]["shape"]["group"]
    expected_groups = [list(g) for g in run["groups"]] + ([] if where is not None else [[]])
    expected_groups[len(run["groups"]) if where is None else where].append("shape")
    assert added["groups"] == expected_groups and added["tasks"] == [*run["tasks"], "shape"]
    g = len(run["groups"]) if where is None else where
    assert added["retrained"] == [f"group-{g}"]
    alpha = np.array(added["ensemble_weights"])
    np.testing.assert_allclose(alpha.sum(axis=1), 1.0, rtol=1e-6)
    for t, name in enumerate(run["tasks"]):
        if name not in added["affected_tasks"]:
            np.testing.assert_allclose(alpha[t, : len(run["groups"])], run["ensemble_weights"][t])
            assert added["per_task_accuracy"]["ensemble"][name] == run["per_task_accuracy"]["ensemble"][name]
    assert "shape" in added["affected_tasks"]

    # the affected tasks' accuracy from the members (restored from their checkpoints) run through the model here
    config = config_from_dict(json.loads((run_dir / "config.json").read_text())["config"])
    extended = dataclasses.replace(config, tasks=dataclasses.replace(
        config.tasks, suite=str(Path(added["directory"]) / "suite.yaml")))
    model = load_run_model(config, sanity_check=False)
    old_names, names = run["tasks"], added["tasks"]
    restore = lambda cfg, k, group, tasks, **kw: adapters_for_plan(  # noqa: E731  (finished: restored, not trained)
        cfg, {f"group-{k}": [tasks.index(t) for t in group]}, model.graphdef, model.lora0, model.base,
        suite_tables(cfg, model.tokenizer, tasks), tasks, **kw)[f"group-{k}"]["lora"]
    members = [restore(config, k, group, old_names) for k, group in enumerate(run["groups"])]
    start = {f"group-{g}": (f"group-{g}", members[g])} if g < len(members) else {}
    trained = restore(extended, g, added["groups"][g], names, starts=start,
                      adapters_dir=Path(added["directory"]) / "adapters")
    members = members[:g] + [trained] + members[g + 1:]
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(members[0])))
    test = suite_tables(extended, model.tokenizer, names)["test"]
    batch = {k: jnp.asarray(v) for k, v in test.items()}
    logits = np.stack([np.asarray(label_logits(merge_lora(model.graphdef, m, model.base), batch)) for m in members])
    mixed = np.einsum("tm,mtk->tk", alpha[test["task_index"]], logits[:, np.arange(len(test["label"]))])
    for name in added["affected_tasks"]:
        rows = test["task_index"] == names.index(name)
        expected = np.mean(np.argmax(mixed[rows], axis=1) == test["label"][rows])
        assert added["per_task_accuracy"]["ensemble"][name] == pytest.approx(expected), name

    again = json.loads(cli("add-tasks", "--run", str(run_dir), str(tmp_path / "shape.yaml"), "--json",
                           timeout=1800).stdout)
    assert again["per_task_accuracy"] == added["per_task_accuracy"] and again["adapters"] == added["adapters"]
    assert_one_line_error(cli("add-tasks", "--run", str(tmp_path / "nothing"), "rt_polarity"), "holds no finished run")
