"""Job metrics a cluster operator can scrape: rows, tokens, cost, errors and committed shards, per job and model.

They are Ray metrics (`ray.util.metrics` counters), counted where a shard commits, so a shard counts once however
often its task is retried. Ray exports them through each node's metrics agent in the Prometheus text format, named
with Ray's `ray_` prefix and the counters' `_total` suffix (`ray_qwen_batch_rows_total{job=...,model=...}`), one series
per worker process: sum them `by (job, model)`. A counter that a shard would raise by 0 is left alone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ray.util.metrics import Counter

from qwen_batch.schemas.results import Totals

__all__ = ["JOB_TAGS", "METRICS", "Metric", "record_commit"]

JOB_TAGS = ("job", "model")


@dataclass(frozen=True)
class Metric:
    """One counter: its name (before Ray's `ray_` prefix and `_total` suffix), what it counts, and extra tag keys."""

    name: str
    description: str
    tags: tuple[str, ...] = ()


ROWS = Metric("qwen_batch_rows", "Output rows committed, error rows included.")
PROMPT_TOKENS = Metric("qwen_batch_prompt_tokens", "Prompt tokens of the committed rows, as the engine counted them.")
COMPLETION_TOKENS = Metric("qwen_batch_completion_tokens", "Tokens the engine generated for the committed rows.")
COST = Metric("qwen_batch_cost_usd", "List-price cost of the committed rows, in USD.")
ROW_ERRORS = Metric("qwen_batch_row_errors", "Committed error rows, by error_type.", ("error_type",))
SHARDS = Metric("qwen_batch_shards_committed", "Shards committed.")
METRICS = (ROWS, PROMPT_TOKENS, COMPLETION_TOKENS, COST, ROW_ERRORS, SHARDS)


@functools.cache
def _counter(metric: Metric) -> Counter:
    """The process's counter for `metric`, made once (a worker process runs many shards)."""
    return Counter(metric.name, description=metric.description, tag_keys=(*JOB_TAGS, *metric.tags))


def record_commit(job: str, model: str, totals: Totals) -> None:
    """Count one shard that has just committed: its rows, tokens, cost and error rows, and the shard itself."""
    tags = {"job": job, "model": model}
    for metric, value in ((ROWS, totals.rows), (PROMPT_TOKENS, totals.prompt_tokens),
                          (COMPLETION_TOKENS, totals.completion_tokens), (COST, totals.cost_usd), (SHARDS, 1)):
        if value > 0:
            _counter(metric).inc(value, tags=tags)
    for error_type, count in totals.errors_by_type.items():
        _counter(ROW_ERRORS).inc(count, tags={**tags, "error_type": error_type})
