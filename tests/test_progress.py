"""Progress: a bar on a terminal, one log line per tenth of the work elsewhere (a log file
never gets carriage-return updates)."""

from __future__ import annotations

import io
import logging
import sys

from jax_ensemble.training.progress import Progress


def test_a_log_gets_one_line_per_tenth_and_the_last(caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("jax_ensemble"), "propagate", True)  # the CLI's handler may be set
    with caplog.at_level(logging.INFO, logger="jax_ensemble"), Progress(25, "work", "step", initial=4) as bar:
        for i in range(21):
            bar.update(1, f"loss={i}")
    lines = sorted({r.getMessage() for r in caplog.records})
    assert lines == sorted(f"work: {n}/25 step (loss={n - 5})" for n in (6, 9, 12, 15, 18, 21, 24, 25))


def test_a_terminal_gets_the_bar_and_no_log_lines(caplog, monkeypatch):
    terminal = io.StringIO()
    terminal.isatty = lambda: True
    monkeypatch.setattr(sys, "stderr", terminal)
    with caplog.at_level(logging.INFO, logger="jax_ensemble"), Progress(5, "work", "step") as bar:
        for _ in range(5):
            bar.update(1, "x")
    assert not caplog.records and "work: 100%" in terminal.getvalue() and "\r" in terminal.getvalue()
    with Progress(5, "quiet", "step", enabled=False) as bar:
        bar.update(5)
    assert "quiet" not in terminal.getvalue()
