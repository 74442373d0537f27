"""Checks a command makes before any compute, so bad input fails in a second, not after a
stage has run: the run directory can be created and written (a probe file), and the
settings that depend on the suite's size fit it (``clustering.num_groups`` ≤ tasks)."""

from __future__ import annotations

import tempfile

from jax_ensemble.config import Config
from jax_ensemble.data.suites import suite_task_refs
from jax_ensemble.errors import ConfigError


def check_run_dir(config: Config) -> None:
    """ConfigError unless the run directory exists or can be created, and takes a file."""
    run_dir = config.resolved_run_dir()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".probe-"):
            pass
    except OSError as e:
        raise ConfigError(f"run_dir {str(run_dir)!r} cannot be used: {e.strerror or e} "
                          f"({e.filename or run_dir}); choose another with run_dir=PATH") from None


def check_before_compute(config: Config) -> None:
    """:func:`check_run_dir`, then the group count against the suite's task count."""
    check_run_dir(config)
    tasks = len(suite_task_refs(config.tasks.suite))
    if config.clustering.num_groups > tasks:
        raise ConfigError(f"clustering.num_groups must be in [1, {tasks}] for the {tasks} tasks of "
                          f"{config.tasks.suite!r} (0: eigengap), got {config.clustering.num_groups}")
