"""Per-step training metrics where people look for them: ``metrics.jsonl`` and TensorBoard.

:class:`MetricsWriter` appends one JSON record per step to ``<run_dir>/metrics.jsonl`` and
writes the same scalars as TensorBoard event files under ``<run_dir>/tensorboard/``
(``tensorboard --logdir <run root>`` shows every adapter of a run side by side). Stacked
members log a list per metric; TensorBoard gets one tag per member (``loss/member_3``).
Only process 0 writes. On resume after step ``T``, JSON records past ``T`` are dropped and
TensorBoard hides the events at steps > ``T`` (a purge marker), so both show one curve.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import jax
from tensorboardX import SummaryWriter

from jax_ensemble.storage.atomic import atomic_write_bytes

TENSORBOARD_DIR = "tensorboard"
"""Subdirectory of a training run directory that holds its event files."""


class MetricsWriter:
    """``metrics.jsonl`` + TensorBoard events of one training run (``run_dir`` None: memory only)."""

    def __init__(self, run_dir: str | Path | None):
        keep = run_dir is not None and jax.process_index() == 0
        self.run_dir = Path(run_dir) if keep else None
        self.records: list[dict[str, Any]] = []
        self._events: SummaryWriter | None = None

    @property
    def path(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / "metrics.jsonl"

    def start(self, after_step: int) -> None:
        """Keep the records of steps ≤ ``after_step`` (the restored checkpoint) and open the event file."""
        if self.run_dir is None:
            return
        kept = []
        if after_step and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("step", math.inf) <= after_step:
                    kept.append(record)
        self.records = kept
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        # purge from the step after the restored one, also when nothing was restored: events of
        # a run killed before its first checkpoint must not stay beside the new ones
        self._events = self._event_file(purge_step=after_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        """Append one step's record: ``{"step": int, name: float | list[float], ...}``."""
        self.records.append(record)
        if self.run_dir is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = int(record["step"])
        for name, value in record.items():
            if name == "step":
                continue
            if isinstance(value, list):
                for member, v in enumerate(value):
                    self._events.add_scalar(f"{name}/member_{member}", float(v), step)
            else:
                self._events.add_scalar(name, float(value), step)

    def _event_file(self, purge_step: int | None = None) -> SummaryWriter:
        """A new event file, named after the nanosecond it was opened: files of one second never
        collide, and TensorBoard reads them in the order they were written."""
        return SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=purge_step, flush_secs=10,
                             filename_suffix=f".{time.time_ns():020d}")

    def flush(self) -> None:
        """Write every pending event to disk (before a checkpoint, so a resume finds every step
        up to it). tensorboardX's own ``flush`` leaves queued events to its writer thread, and
        a kill loses them; closing the file drains that queue, so the file is closed and the
        next steps go to a new one (TensorBoard reads a directory of event files as one run)."""
        if self._events is not None:
            self._events.close()
            self._events = self._event_file()

    def close(self) -> None:
        """Flush and close the event file."""
        if self._events is not None:
            self._events.close()
            self._events = None
