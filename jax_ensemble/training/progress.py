"""Progress of long work: a tqdm bar on a terminal; on a log (stderr not a terminal) one
``INFO`` line per tenth of the work, so a log file gets readable lines, not ``\\r`` updates."""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm

log = logging.getLogger(__name__)

LOG_LINES = 10
"""Lines per task when stderr is not a terminal (plus one at the end)."""


class Progress:
    """``total`` units of work named ``desc``; ``enabled`` False shows nothing (e.g. on
    processes other than 0). ``update(n, note)`` advances by ``n`` units; ``note`` is shown
    beside the bar or at the end of the log line (the current loss, the task)."""

    def __init__(self, total: int, desc: str, unit: str, *, enabled: bool = True, initial: int = 0) -> None:
        self.total, self.desc, self.unit, self.done = total, desc, unit, initial
        self.terminal = enabled and total > 0 and sys.stderr.isatty()
        self.logging = enabled and total > 0 and not self.terminal
        self._next_line = self._line_after(initial)
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr,
                        disable=not self.terminal, dynamic_ncols=True)

    def _line_after(self, done: int) -> int:
        step = max(1, -(-self.total // LOG_LINES))
        return min(self.total, (done // step + 1) * step)

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if self.terminal:
            if note:
                self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(n)
        elif self.logging and self.done >= self._next_line:
            log.info("%s: %d/%d %s%s", self.desc, self.done, self.total, self.unit, f" ({note})" if note else "")
            self._next_line = self._line_after(self.done)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
