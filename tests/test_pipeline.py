"""The main job end to end on the real model and real tasks (configs/tiny.yaml)."""

from __future__ import annotations

import json

import pytest

from test_cli import assert_one_line_error, cli

METHODS = {"zero_shot", "single_adapter", "random_groups", "ensemble"}


@pytest.mark.slow
def test_run_tiny_writes_a_complete_report_and_resumes(tmp_path):
    result = cli("run", "--config", "configs/tiny.yaml", f"run_dir={tmp_path}", timeout=2400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == f"run directory: {tmp_path}"
    model = json.loads((tmp_path / "model.json").read_text())
    assert model["lora_b0_max_abs_logit_change"] == 0.0 and "Paris" in model["sanity_completion"]
    assert model["parameters"]["lora_params"] == 30 * (576 * 4 + 4 * 576 + 2 * (576 * 4 + 4 * 192))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(metrics["tasks"]) == 10 and sorted(sum(metrics["groups"], [])) == sorted(metrics["tasks"])
    assert METHODS <= set(metrics["per_task_accuracy"]) and METHODS <= set(metrics["average_accuracy"])
    for method in METHODS:
        accuracies = metrics["per_task_accuracy"][method]
        assert set(accuracies) == set(metrics["tasks"]) and all(0 <= a <= 1 for a in accuracies.values())
    assert metrics["flops"]["ensemble_total"] > 0 and metrics["peak_memory_bytes"]["host_peak_rss"] > 0
    for name in ("affinity.png", "accuracy.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    peft = json.loads((tmp_path / "peft" / "group-0" / "adapter_config.json").read_text())
    assert peft["r"] == 4 and peft["lora_alpha"] == 32.0
    # a rerun reuses every finished stage and adapter and reproduces the numbers
    again = cli("run", "--config", "configs/tiny.yaml", f"run_dir={tmp_path}", timeout=2400)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "metrics.json").read_text())["per_task_accuracy"] == metrics["per_task_accuracy"]


def test_run_bad_ensemble_config_is_one_line():
    assert_one_line_error(cli("run", "ensemble.step_size=0"), "ensemble.step_size must be in (0, 1]")
    assert_one_line_error(cli("run", "ensemble.boosting_steps=-1"), "ensemble.boosting_steps must be >= 0")
