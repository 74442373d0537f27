"""The main job end to end on the real model and real tasks (the shipped ``tiny`` config)."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_cli import ROOT, assert_one_line_error, cli

from jax_ensemble.stages.gradients import load_gradients
from jax_ensemble.storage.atomic import read_verified
from jax_ensemble.training.checkpoints import step_digest

METHODS = {"zero_shot", "single_adapter", "random_groups", "ensemble_no_boosting", "ensemble"}


@pytest.mark.slow
def test_run_tiny_writes_a_complete_report_and_resumes(tmp_path):
    result = cli("run", "--config", "tiny", f"run_dir={tmp_path}", timeout=2400)
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
    check_routed_flops(metrics)
    assert set(metrics["stage_seconds"]) == {"model", "grouping", "training", "ensemble", "evaluation", "report"}
    assert 0 < sum(metrics["stage_seconds"].values()) <= metrics["wall_seconds"] + 0.5
    assert "wall time per stage: model " in result.stdout and "## Wall time per stage" in (tmp_path / "report.md").read_text()
    for name in ("affinity.png", "accuracy.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    peft = json.loads((tmp_path / "peft" / "group-0" / "adapter_config.json").read_text())
    assert peft["r"] == 4 and peft["lora_alpha"] == 32.0
    assert metrics["boosting_steps"] == 1 and (tmp_path / "adapters" / "boost-0" / "checkpoints").is_dir()
    trained = {p: p.read_text() for p in (tmp_path / "adapters").glob("*/metrics.jsonl")}
    assert {p.parent.name for p in trained} >= {"single", "group-0", "random-0", "boost-0"}
    check_estimates(tmp_path)
    logits = sorted(p.name for p in (tmp_path / "logits").glob("*.npy"))
    assert len(logits) >= 6  # validation members (2 sets), boosting, test: single, zero-shot, 2 ensembles
    # a rerun reuses every finished stage and adapter (boosting included: nothing is trained
    # again), reads every logit pass back (no network pass: no progress lines), reproduces the
    # numbers, and now reports the estimates-vs-fine-tuning check
    again = cli("run", "--config", "tiny", f"run_dir={tmp_path}", timeout=2400)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads((tmp_path / "metrics.json").read_text())
    assert rerun["per_task_accuracy"] == metrics["per_task_accuracy"]
    assert {p: p.read_text() for p in trained} == trained
    assert sorted(p.name for p in (tmp_path / "logits").glob("*.npy")) == logits
    assert "validation logits" not in again.stderr and "test: ensemble" not in again.stderr, again.stderr[-2000:]
    assert rerun["estimate_validation"]["subsets"] == 2 and (tmp_path / "estimates.png").is_file()
    assert "![estimates](estimates.png)" in (tmp_path / "report.md").read_text()
    killed_in_every_stage_then_resumed(tmp_path / "faults", metrics)


# (stage whose log line arms the kill, seconds after it): SIGKILL inside the gradients, the
# affinity solve's neighbourhood, two adapters' training, boosting, evaluation and the report
KILLS = [("grouping", 2.0), ("grouping", 12.0), ("training", 4.0), ("training", 25.0), ("ensemble", 3.0),
         ("evaluation", 2.0), ("report", 0.0)]


def killed_in_every_stage_then_resumed(run_dir: Path, reference: dict) -> None:
    """Fault injection: ``run`` is killed with SIGKILL at a point inside each stage and started
    again each time; after every kill no verified file disagrees with its marker and
    ``metrics.json`` (written last) does not exist before the report stage, and the final
    numbers equal the uninterrupted run's."""
    command = [sys.executable, "-m", "jax_ensemble.cli", "run", "--config", "tiny", f"run_dir={run_dir}"]
    for stage, delay in KILLS:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
        deadline = time.monotonic() + 900
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if f"] {stage}: " in line:
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
        assert proc.returncode in (-signal.SIGKILL, 0), (stage, proc.returncode)
        if proc.returncode == 0:  # finished before the kill: nothing left to interrupt
            break
        if (run_dir / "metrics.json").exists():  # written last and atomically: whole, or absent
            assert stage == "report" and json.loads((run_dir / "metrics.json").read_text())["tasks"], stage
        for marker in run_dir.rglob("*.sha256"):
            target = marker.with_name(marker.name.removesuffix(".sha256"))
            if marker.parent.name == "checkpoint_digests":  # a sealed adapter checkpoint step
                target = marker.parent.parent / "checkpoints" / target.name
                assert step_digest(target) == marker.read_text().strip(), (stage, target)
            else:
                assert read_verified(target) is not None, (stage, target)
    final = cli("run", "--config", "tiny", f"run_dir={run_dir}", timeout=2400)
    assert final.returncode == 0, final.stderr[-3000:]
    resumed = json.loads((run_dir / "metrics.json").read_text())
    for key in ("groups", "per_task_accuracy", "ensemble_weights", "boosted_groups"):
        assert resumed[key] == reference[key], key


def check_routed_flops(metrics: dict) -> None:
    """Routed inference FLOPs = per-row forward FLOPs × Σ over test rows of the calls their task
    needs (members with α > 0, boosters serving it, the base model when one does); dense =
    every member, booster and the base on every row. The overhead by stage adds up."""
    flops, tests = metrics["flops"], metrics["test_examples"]
    per_row = flops["inference_single_adapter"] / tests
    alpha = np.asarray(metrics["ensemble_weights"])
    rows, uneven = divmod(tests, len(metrics["tasks"]))  # the tiny config's tasks have equal test splits
    assert uneven == 0
    calls = []
    for t, task in enumerate(metrics["tasks"]):
        boosters = sum(task in group for group in metrics["boosted_groups"])
        calls.append((alpha[t] > 0).sum() + boosters + (boosters > 0))
    assert flops["inference_ensemble"] == pytest.approx(per_row * rows * sum(calls), rel=1e-9)
    m, b = alpha.shape[1], metrics["boosting_steps"]
    assert flops["inference_ensemble_dense"] == pytest.approx(per_row * tests * (m + b + (b > 0)), rel=1e-9)
    assert sum(flops["ensemble_overhead_percent_by_stage"].values()) == pytest.approx(flops["ensemble_overhead_percent"])


def check_estimates(run_dir: Path) -> None:
    """validate-estimates on the run's affinity stage: complete output, and the base model's
    scores through the network equal those of the gradient stage's f0 (two code paths)."""
    result = cli("validate-estimates", "--config", "tiny", "--subsets", "2", "--json",
                 f"run_dir={run_dir}", timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert len(summary["subsets"]) == 2 and len(summary["pairs"]) == 2 * 3  # ceil(0.3 * 10) tasks per subset
    for key in ("mean_relative_error_loss", "mean_abs_error_accuracy", "speedup"):
        assert np.isfinite(summary[key]) and summary[key] >= 0, key
    assert summary["speedup"] > 0 and Path(summary["scatter_png"]).read_bytes()[:4] == b"\x89PNG"
    same = next(r for r in summary["l2_sweep"] if r["l2"] == summary["l2"])  # re-solved: the stage's numbers
    assert same["mean_relative_error_loss"] == pytest.approx(summary["mean_relative_error_loss"], rel=1e-4)
    assert same["loss_spearman"] == pytest.approx(summary["errors"]["linear"]["loss_spearman"], rel=1e-4, nan_ok=True)
    gradients = load_gradients(json.loads((Path(summary["affinity_dir"]) / "affinity.json").read_text())["gradients"])
    for pair in summary["pairs"]:
        part = gradients[pair["task"]]["validation"]
        if part.f0.ndim == 1:  # gold-relative log-odds
            losses, hits = np.logaddexp(0.0, -part.f0), part.f0 > 0
        else:
            z = part.f0.astype(np.float64)
            losses = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1) - z[np.arange(len(z)), part.labels]
            hits = z.argmax(1) == part.labels
        assert pair["base"]["loss"] == pytest.approx(losses.mean(), rel=1e-3, abs=1e-4)
        assert pair["base"]["accuracy"] == pytest.approx(hits.mean())


def test_run_bad_ensemble_config_is_one_line():
    assert_one_line_error(cli("run", "ensemble.step_size=0"), "ensemble.step_size must be in (0, 1]")
    assert_one_line_error(cli("run", "ensemble.boosting_steps=-1"), "ensemble.boosting_steps must be >= 0")
