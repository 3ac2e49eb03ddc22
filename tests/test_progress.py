"""Tests for jobs.progress: the live line on a terminal, rate-limited log lines elsewhere, with a fake clock."""

from __future__ import annotations

import io
import logging
from typing import Any

import pytest

from qwen_batch.jobs.progress import PROGRESS_SECONDS_ENV, Progress, progress_seconds

CLEAR = "\r\x1b[K"


class FakeClock:
    """A clock that moves only when a test sets `now`."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def shard(rows: int, rows_failed: int, completion_tokens: int, cost_usd: float) -> dict[str, Any]:
    """A committed shard's summary row, as the write stage emits it."""
    return {"shard_id": "s", "committed": True, "rows": rows, "rows_failed": rows_failed,
            "completion_tokens": completion_tokens, "cost_usd": cost_usd}


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="qwen_batch.jobs.progress")
    return caplog


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "qwen_batch.jobs.progress"]


def test_terminal_line_is_rewritten_in_place_and_cleared_at_the_end(logged: pytest.LogCaptureFixture):
    clock, stream = FakeClock(), io.StringIO()
    progress = Progress("tiny-qwen2", 4096, 4, clock=clock, stream=stream, tty=True, interval_s=10)
    clock.now = 30.0
    progress.update(shard(1024, 12, 24_360, 0.0123))
    first = "tiny-qwen2  1,024/4,096 rows (25%)  1/4 shards  12 errors  812 out tok/s  $0.0123  ETA 0:01:30"
    assert stream.getvalue() == CLEAR + first
    clock.now = 31.0  # a second later: still rewritten, a terminal line is not rate limited
    progress.update(shard(1024, 0, 0, 0.0041))
    second = "tiny-qwen2  2,048/4,096 rows (50%)  2/4 shards  12 errors  786 out tok/s  $0.0164  ETA 0:00:31"
    assert stream.getvalue() == CLEAR + first + CLEAR + second
    assert messages(logged) == []

    clock.now = 45.0
    progress.close()
    assert stream.getvalue() == CLEAR + first + CLEAR + second + CLEAR
    assert messages(logged) == [
        "tiny-qwen2  2,048/4,096 rows (50%)  2/4 shards  12 errors  541 out tok/s  $0.0164  ETA 0:00:45"]


def test_off_a_terminal_lines_are_logged_at_most_every_interval_and_for_the_last_shard(
        logged: pytest.LogCaptureFixture):
    clock, stream = FakeClock(), io.StringIO()
    progress = Progress("tiny-qwen2", 1000, 5, clock=clock, stream=stream, tty=False, interval_s=10)
    for now, failed in ((2.0, 0), (5.0, 0), (13.0, 1), (14.0, 0), (15.0, 0)):
        clock.now = now
        progress.update(shard(200, failed, 400, 0.003))
    progress.close()
    assert messages(logged) == [
        "tiny-qwen2  200/1,000 rows (20%)  1/5 shards  0 errors  200 out tok/s  $0.003000  ETA 0:00:08",  # first
        # 5 s: 3 s after the last line, skipped
        "tiny-qwen2  600/1,000 rows (60%)  3/5 shards  1 error  92 out tok/s  $0.009000  ETA 0:00:09",  # 11 s later
        # 14 s: skipped
        "tiny-qwen2  1,000/1,000 rows (100%)  5/5 shards  1 error  133 out tok/s  $0.0150  done in 0:00:15",  # last
    ]
    assert all(record.levelno == logging.INFO for record in logged.records)
    assert stream.getvalue() == ""


def test_close_logs_where_a_job_stopped_between_lines(logged: pytest.LogCaptureFixture):
    clock = FakeClock()
    with Progress("m", 30, 3, clock=clock, stream=io.StringIO(), tty=False, interval_s=10) as progress:
        clock.now = 1.0
        progress.update(shard(10, 0, 10, 0.0))
        clock.now = 2.0
        progress.update(shard(10, 0, 10, 0.0))
    assert messages(logged) == [
        "m  10/30 rows (33%)  1/3 shards  0 errors  10 out tok/s  $0.000000  ETA 0:00:02",
        "m  20/30 rows (66%)  2/3 shards  0 errors  10 out tok/s  $0.000000  ETA 0:00:01",
    ]


def test_nothing_is_shown_before_the_first_shard(logged: pytest.LogCaptureFixture):
    stream = io.StringIO()
    Progress("m", 10, 1, clock=FakeClock(), stream=stream, tty=True).close()
    assert stream.getvalue() == "" and messages(logged) == []


def test_the_interval_comes_from_the_environment(logged: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(PROGRESS_SECONDS_ENV, raising=False)
    assert progress_seconds() == 10.0
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "0")
    clock = FakeClock()
    progress = Progress("m", 30, 3, clock=clock, stream=io.StringIO(), tty=False)
    for now in (1.0, 1.5):
        clock.now = now
        progress.update(shard(10, 0, 0, 0.0))
    assert len(messages(logged)) == 2  # every shard


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_interval_warns_and_keeps_the_default(value: str, logged: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, value)
    assert progress_seconds() == 10.0
    assert f"{PROGRESS_SECONDS_ENV} is {value!r}" in logged.records[-1].getMessage()
    assert logged.records[-1].levelno == logging.WARNING
