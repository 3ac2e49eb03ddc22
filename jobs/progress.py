"""A running job's progress: one line rewritten in place on a terminal, plain log lines every few seconds elsewhere."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from types import TracebackType
from typing import Any, TextIO

__all__ = ["PROGRESS_SECONDS_ENV", "Progress", "progress_seconds"]

log = logging.getLogger(__name__)

PROGRESS_SECONDS_ENV = "QWEN_BATCH_PROGRESS_SECONDS"
DEFAULT_PROGRESS_SECONDS = 10.0
CLEAR_LINE = "\r\x1b[K"  # back to the start of the line, erase to its end


class Progress:
    """Rows done, errors, output tokens/s, cost so far and ETA of one model's shards, updated as each one commits.

    On a terminal the line is rewritten in place after every shard; `close()` clears it and logs the final line
    once. Elsewhere (CI, Ray job logs) the line is logged at INFO for the first shard, then at most every
    `interval_s` seconds (default $QWEN_BATCH_PROGRESS_SECONDS, else 10), and always for the last shard.
    """

    def __init__(self, model: str, rows_total: int, shards_total: int, *, clock: Callable[[], float] = time.monotonic,
                 stream: TextIO | None = None, tty: bool | None = None, interval_s: float | None = None,
                 started: float | None = None):
        self.model = model
        self.rows_total = rows_total
        self.shards_total = shards_total
        self.shards_done = self.rows_done = self.rows_failed = self.completion_tokens = 0
        self.cost_usd = 0.0
        self._clock = clock
        self._stream = sys.stderr if stream is None else stream
        self._tty = self._stream.isatty() if tty is None else tty
        self._interval_s = progress_seconds() if interval_s is None else interval_s
        self._started = clock() if started is None else started
        self._last_logged: float | None = None
        self._drawn = False
        self._unlogged = False

    def update(self, summary: Mapping[str, Any]) -> None:
        """Count one committed shard's summary row (`rows`, `rows_failed`, `completion_tokens`, `cost_usd`)."""
        self.shards_done += 1
        self.rows_done += summary["rows"]
        self.rows_failed += summary["rows_failed"]
        self.completion_tokens += summary["completion_tokens"]
        self.cost_usd += summary["cost_usd"]
        now = self._clock()
        self._unlogged = True
        if self._tty:
            self._stream.write(CLEAR_LINE + self.line(now))
            self._stream.flush()
            self._drawn = True
        elif (self._last_logged is None or now - self._last_logged >= self._interval_s
              or self.shards_done >= self.shards_total):
            self._log(now)

    def close(self) -> None:
        """Clear the terminal line, and log the final state unless the last update was logged already."""
        if self._drawn:
            self._stream.write(CLEAR_LINE)
            self._stream.flush()
            self._drawn = False
        if self._unlogged:
            self._log(self._clock())

    def line(self, now: float) -> str:
        """The progress line at clock time `now`."""
        elapsed = max(now - self._started, 1e-9)
        percent = 100 if self.rows_total <= 0 else min(100, self.rows_done * 100 // self.rows_total)
        remaining = self.rows_total - self.rows_done
        if remaining <= 0:
            timing = f"done in {_duration(elapsed)}"
        elif self.rows_done == 0:
            timing = "ETA ?"
        else:
            timing = f"ETA {_duration(remaining * elapsed / self.rows_done)}"
        return "  ".join([
            self.model,
            f"{self.rows_done:,}/{self.rows_total:,} rows ({percent}%)",
            f"{self.shards_done:,}/{self.shards_total:,} shards",
            f"{self.rows_failed:,} error{'' if self.rows_failed == 1 else 's'}",
            f"{self.completion_tokens / elapsed:,.0f} out tok/s",
            f"${self.cost_usd:,.4f}" if self.cost_usd >= 0.01 else f"${self.cost_usd:.6f}",
            timing,
        ])

    def _log(self, now: float) -> None:
        log.info("%s", self.line(now))
        self._last_logged = now
        self._unlogged = False

    def __enter__(self) -> Progress:
        """On a terminal, draw the line at once (0 rows done), so the wait for the engines to start shows too."""
        if self._tty:
            self._stream.write(CLEAR_LINE + self.line(self._clock()))
            self._stream.flush()
            self._drawn = True
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


def progress_seconds() -> float:
    """Seconds between progress log lines off a terminal: $QWEN_BATCH_PROGRESS_SECONDS, else 10."""
    text = os.environ.get(PROGRESS_SECONDS_ENV, "").strip()
    if not text:
        return DEFAULT_PROGRESS_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not math.isfinite(seconds) or seconds < 0:
        log.warning("%s is %r, not a number of seconds >= 0; logging progress every %g s instead",
                    PROGRESS_SECONDS_ENV, text, DEFAULT_PROGRESS_SECONDS)
        return DEFAULT_PROGRESS_SECONDS
    return seconds


def _duration(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    return str(timedelta(seconds=round(seconds)))
