"""The command line as a user runs it: exit codes, one-line errors, JSON output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jax_ensemble.cli", *args],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=timeout,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_generate_json_names_paris():
    result = cli("generate", "--model", "smollm2-135m", "--max-new-tokens", "4", "--json", "The capital of France is")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert "Paris" in out["completion"] and len(out["new_token_ids"]) <= 4


def test_unknown_model_exit_2():
    assert_one_line_error(cli("generate", "--model", "no-such-model", "hello"), "unknown model 'no-such-model'")


def test_unreachable_hub_id_exit_2(tmp_path):
    result = cli("generate", "--model", "someorg/some-model", "hi", env={"JAX_ENSEMBLE_CACHE": str(tmp_path)})
    assert_one_line_error(result, "could not download 'someorg/some-model'")


def test_corrupt_gguf_exit_2(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 40)
    assert_one_line_error(cli("generate", "--model", str(bad), "hi"), "truncated or corrupt")


def test_shape_mismatch_exit_2(tiny_hf_dir, tmp_path):
    for f in tiny_hf_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["hidden_size"] = 32
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(cli("generate", "--model", str(tmp_path), "hi"), "config does not match")


def test_run_bad_config_key_and_value(tmp_path):
    assert_one_line_error(cli("run", "lora.rnak=3"), "unknown config key 'lora.rnak'")
    assert_one_line_error(cli("run", "model.base_dtype=int4"), "model.base_dtype must be one of")
    assert_one_line_error(cli("run", "--config", str(tmp_path / "missing.yaml")), "does not exist")


def test_version_names_the_installed_stack():
    from importlib import metadata

    result = cli("--version")
    assert result.returncode == 0, result.stderr
    line = " ".join(result.stdout.split())  # argparse may wrap the line
    assert line.startswith(f"jax-ensemble {metadata.version('jax-ensemble')} (")
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint"):
        assert f"{name} {metadata.version(name)}" in line
    assert f"Python {sys.version.split()[0]}" in line


def test_log_records_go_to_stderr_above_the_chosen_level(capsys):
    import logging

    from jax_ensemble.cli import configure_logging

    log = logging.getLogger("jax_ensemble.stages.example")
    configure_logging("warning")
    log.info("an info record")
    log.warning("a warning record")
    configure_logging("info")
    log.info("another info record")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == ["a warning record", "another info record"]
    assert cli("--log-level", "loud", "data", "list").returncode == 2  # usage error


def test_unusable_run_dir_and_too_many_groups_fail_before_any_compute(tmp_path):
    """Checked before the model loads: a run_dir under a regular file, and more groups than
    the suite has tasks (each used to fail only after the gradient stage had run)."""
    (tmp_path / "afile").write_text("x")
    for command in ("run", "gradients", "estimate", "cluster", "train"):
        result = cli(command, "--config", "tiny", f"run_dir={tmp_path / 'afile' / 'run'}", timeout=120)
        assert_one_line_error(result, f"run_dir '{tmp_path / 'afile' / 'run'}' cannot be used: Not a directory")
    result = cli("run", "--config", "tiny", f"run_dir={tmp_path / 'run'}", "clustering.num_groups=11", timeout=120)
    assert_one_line_error(result, "clustering.num_groups must be in [1, 10] for the 10 tasks of 'offline10'")
    assert not (tmp_path / "run" / "gradients").exists()
