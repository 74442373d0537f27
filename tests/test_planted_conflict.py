"""The planted-conflict mechanism end to end, on the real model at a tiny size: a task and its
swapped twin (same prompts, opposite answers) are a conflict by construction; the pipeline must
see it (low affinity), act on it (different groups) and show it (one adapter on both scores
exactly one of each pair of identical prompts). The accuracy gain over seeds is a benchmark
(benchmarks/ensemble.py --config planted_conflict; benchmarks/RESULTS.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_cli import cli

PAIRS = [("rt_polarity", "rt_polarity_swapped"), ("rt_subjectivity", "rt_subjectivity_swapped")]
TEST_SIZE = 16


@pytest.mark.slow
def test_twins_get_low_affinity_different_groups_and_split_one_adapter(tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text(json.dumps({"tasks": [t for pair in PAIRS for t in pair]}))
    result = cli("run", "--config", "planted_conflict", f"run_dir={tmp_path / 'run'}", f"tasks.suite={suite}",
                 "tasks.train_size=80", "tasks.validation_size=40", f"tasks.test_size={TEST_SIZE}",
                 "tasks.max_length=64", "affinity.num_subsets=6", "clustering.num_groups=2",
                 "training.max_steps=4", "training.eval_every=2", "ensemble.boosting_steps=0",
                 "ensemble.random_groups=false", timeout=2400)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    tasks, affinity = metrics["tasks"], np.asarray(metrics["affinity"])
    index = {t: i for i, t in enumerate(tasks)}
    twins = {(index[a], index[b]) for a, b in PAIRS} | {(index[b], index[a]) for a, b in PAIRS}
    others = np.mean([affinity[i, j] for i in range(len(tasks)) for j in range(len(tasks))
                      if i != j and (i, j) not in twins])
    group_of = {t: g for g, group in enumerate(metrics["groups"]) for t in group}
    for a, b in PAIRS:
        assert max(affinity[index[a], index[b]], affinity[index[b], index[a]]) < others, (a, b, affinity.tolist())
        assert group_of[a] != group_of[b], metrics["groups"]
        for method in ("zero_shot", "single_adapter"):  # one model, identical prompts, opposite answers
            accuracy = metrics["per_task_accuracy"][method]
            assert abs(accuracy[a] + accuracy[b] - 1.0) <= 1.0 / TEST_SIZE, (method, a, accuracy)
