"""Progress lines for long stages: count, rate and ETA, at most one line every few seconds (plus the last one)."""
from __future__ import annotations

import time
from typing import Callable


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressLog:
    """``ProgressLog(log, "encoded", "items")(done, total)`` → "encoded 300/1094 items (27%) — 41.2 items/s, ETA 0:19"."""

    def __init__(self, log: Callable[[str], None] | None, what: str, unit: str = "rows", every_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.log, self.what, self.unit, self.every_s, self.clock = log, what, unit, every_s, clock
        self.t0 = clock()
        self.last = -float("inf")

    def line(self, done: int, total: int) -> str:
        elapsed = self.clock() - self.t0
        pct = f" ({done / total:.0%})" if total else ""
        text = f"{self.what} {done}/{total} {self.unit}{pct}"
        if done and elapsed > 0:
            rate = done / elapsed
            text += f" — {rate:.1f} {self.unit}/s"
            if total > done:
                text += f", ETA {_clock((total - done) / rate)}"
            else:
                text += f", took {_clock(elapsed)}"
        return text

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if self.log is not None and (now - self.last >= self.every_s or done >= total):
            self.last = now
            self.log(self.line(done, total))
