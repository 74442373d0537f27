"""The ``uq`` command end to end on the real model and real tasks (tiny sizes)."""

from __future__ import annotations

import json

import pytest

from test_cli import assert_one_line_error, cli

METRICS = {"accuracy", "ece", "nll", "brier", "ood_auroc"}


@pytest.mark.slow
def test_uq_json_reports_every_method(tmp_path):
    result = cli("uq", "--config", "configs/default.yaml", "--json", f"run_dir={tmp_path}",
                 "tasks.train_size=16", "tasks.test_size=8", "uq.members=2", "training.max_steps=2",
                 "training.batch_size=4", timeout=2400)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert set(summary["results"]) == {"single", "ensemble", "mc_dropout"}
    for name, row in summary["results"].items():
        assert METRICS <= set(row), name
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["ece"] <= 1.0 and row["nll"] > 0
    assert summary["test_examples"] == {"in_distribution": 8, "out_of_distribution": 8}
    assert (tmp_path / "uq" / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "uq" / "results.json").read_text())["results"] == summary["results"]


def test_uq_bad_config_is_one_line():
    assert_one_line_error(cli("uq", "uq.members=1"), "uq.members must be >= 2")
    assert_one_line_error(cli("uq", "uq.out_of_distribution=[rt_polarity]"), "both in- and out-of-distribution")
    assert_one_line_error(cli("uq", "uq.in_distribution=[no_such_task]"), "no_such_task")
