"""SIGKILL during training, then resume: the final adapter equals the uninterrupted run's,
exactly (same program, same device; data order and dropout keys are functions of the
step, and the checkpoint holds the LoRA parameters, optimizer state, step and
early-stopping state)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
from tiny_training import assert_tensorboard_matches_jsonl
from training_worker import LONG, run, spawn

from jax_ensemble.config import MeshConfig
from jax_ensemble.training.checkpoints import flatten
from jax_ensemble.training.mesh import make_mesh


def _steps_logged(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def test_sigkill_then_resume_gives_the_uninterrupted_adapter(tmp_path):
    run_dir = tmp_path / "killed"
    process = spawn("train", str(run_dir), devices=1)
    deadline = time.monotonic() + 240
    while _steps_logged(run_dir) < 25 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed: " + process.stdout.read()[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (run_dir / "final.npz").exists()
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] < LONG.max_steps

    resumed = spawn("train", str(run_dir), devices=1)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output[-3000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, LONG.max_steps + 1))
    assert_tensorboard_matches_jsonl(run_dir)  # the killed run's events past its checkpoint are purged

    reference = run(LONG, make_mesh(MeshConfig(data=1)), run_dir=tmp_path / "uninterrupted", dropout=0.1)
    with np.load(run_dir / "final.npz") as final:
        killed = dict(final)
    expected = {k: np.asarray(v) for k, v in flatten(reference.lora).items()}
    assert killed.keys() == expected.keys()
    for key in expected:
        assert np.array_equal(killed[key], expected[key]), key

    # a finished step whose files were altered afterwards: it fails its digest, is deleted with
    # one warning, and training resumes from the step before it to the same adapter
    checkpoints = tmp_path / "uninterrupted" / "checkpoints"
    assert sorted(p.name for p in (tmp_path / "uninterrupted" / "checkpoint_digests").iterdir()) == ["50.sha256",
                                                                                                  "60.sha256"]
    biggest = max((p for p in (checkpoints / "60").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    biggest.write_bytes(bytes(data))
    again = run(LONG, make_mesh(MeshConfig(data=1)), run_dir=tmp_path / "uninterrupted", dropout=0.1)
    assert again.step == LONG.max_steps and [r["step"] for r in again.history][-10:] == list(range(51, 61))
    for key, value in flatten(again.lora).items():
        assert np.array_equal(np.asarray(value), expected[key]), key
