"""qwen-batch's public entry points: run or plan a job here, submit one to a Ray cluster, and the `qwen-batch` CLI."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qwen_batch.jobs.driver import plan_job, run_job
    from qwen_batch.jobs.submit import submit_job

__all__ = ["plan_job", "run_job", "submit_job"]

_HOMES = {"plan_job": "qwen_batch.jobs.driver", "run_job": "qwen_batch.jobs.driver",
          "submit_job": "qwen_batch.jobs.submit"}


def __getattr__(name: str) -> Any:
    # Imported on first use: `qwen-batch --help` should not pay for importing Ray.
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'qwen_batch.jobs' has no attribute {name!r}")
