"""Placing a task into a finished run: its gradients, affinity row and group against a
from-scratch gradient stage and affinity over the same subsets (tiny Llama, local tasks)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import yaml
from test_affinity_stage import L2, write_four_task_suite

from jax_ensemble.config import config_from_dict
from jax_ensemble.core import affinity
from jax_ensemble.data import load_task
from jax_ensemble.errors import DataError
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
    assert placed["placement"]["shape"]["group"] == int(np.argmax(means))
    alone = place_tasks(run, [new], open_below=np.inf, progress=False)
    assert alone["placement"]["shape"]["group"] is None  # every group below the bar: a group of its own

    with pytest.raises(DataError, match="task 'tone' is already in the run"):
        place_tasks(run, [str(tmp_path / "tone.yaml")], progress=False)
