"""``jax-ensemble train``: end to end on a tiny transformers-written model and a local task
file the test writes; bad input gives one line and exit status 2."""

from __future__ import annotations

import json

import pytest
from test_tasks import write_spec

from jax_ensemble.cli import main


def _spec(tmp_path):
    return write_spec(tmp_path / "task", label_words={"negative": "n", "positive": "p"})


def test_train_reports_per_task_and_zero_shot_accuracy_and_a_checkpoint(tiny_hf_dir, tmp_path, capsys):
    spec = _spec(tmp_path)
    args = ["train", "--tasks", str(spec), "--out", str(tmp_path / "run"), "--json", f"model.source={tiny_hf_dir}",
            "tasks.train_size=30", "tasks.validation_size=10", "tasks.test_size=10", "tasks.max_length=32",
            "training.max_steps=12", "training.learning_rate=1e-2", "training.warmup_steps=2",
            "training.eval_every=6", "training.checkpoint_every=6"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["per_task_accuracy"]) == set(out["zero_shot_accuracy"]) == {"stars"}
    assert 0.0 <= out["per_task_accuracy"]["stars"] <= 1.0
    assert (tmp_path / "run" / "checkpoints" / "12").is_dir() and out["checkpoint"].endswith("checkpoints/12")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13)) and "val_loss" in records[5]
    assert json.loads((tmp_path / "run" / "train.json").read_text())["steps"] == 12
    # the same command again finds the finished run and reports the same adapter's accuracy
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["per_task_accuracy"] == out["per_task_accuracy"]
    # so does a renamed config with other settings of later stages: the adapter's fingerprint is
    # what determines it (model, LoRA, tasks, training, seed), shared with `jax-ensemble run`
    assert main(args + ["name=renamed", "uq.members=3", "clustering.num_groups=2"]) == 0
    assert json.loads(capsys.readouterr().out)["per_task_accuracy"] == out["per_task_accuracy"]
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics  # nothing retrained
    # a setting that determines the adapter refuses the old checkpoints with one line
    assert main(args + ["training.learning_rate=2e-2"]) == 2
    assert "different run" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks", "no_such_task"], "no_such_task"),
        (["training.learning_rate=0"], "training.learning_rate must be > 0"),
        (["training.no_such_key=3"], "unknown config key 'training.no_such_key'"),
        (["mesh.data=3", "training.batch_size=8"], "not divisible by the mesh's data axes"),
        (["mesh.data=64", "training.batch_size=64"], "devices"),
    ],
)
def test_bad_train_input_is_one_line_and_status_2(tmp_path, capsys, extra, message):
    assert main(["train", "--out", str(tmp_path / "run"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()
