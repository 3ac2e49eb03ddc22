"""What a job writes: one Parquet row per input row, a commit record per shard, and the manifest."""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

# The columns every output file has, in order; carried input columns follow them.
RESULT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("variant", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("generated_text", pa.string()),
        pa.field("reasoning_text", pa.string()),
        pa.field("parsed", pa.string()),
        pa.field("finish_reason", pa.string(), nullable=False),
        pa.field("prompt_tokens", pa.int64(), nullable=False),
        pa.field("completion_tokens", pa.int64(), nullable=False),
        pa.field("reasoning_tokens", pa.int64(), nullable=False),
        pa.field("cached_tokens", pa.int64(), nullable=False),
        pa.field("total_tokens", pa.int64(), nullable=False),
        pa.field("input_cost_usd", pa.float64(), nullable=False),
        pa.field("output_cost_usd", pa.float64(), nullable=False),
        pa.field("cost_usd", pa.float64(), nullable=False),
        pa.field("error_type", pa.string()),
        pa.field("error", pa.string()),
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("source_row", pa.int64(), nullable=False),
    ]
)
_TOKEN_LOGPROB = [pa.field("token", pa.string()), pa.field("logprob", pa.float64())]
LOGPROBS_FIELD = pa.field("logprobs", pa.list_(pa.struct(
    [*_TOKEN_LOGPROB, pa.field("top_logprobs", pa.list_(pa.struct(_TOKEN_LOGPROB)))])))
"""Each generated token with its log probability and the most likely alternatives, for rows whose request asked
(OpenAI's `logprobs`/`top_logprobs`), else null: a column of OpenAI batch jobs, after the ones above."""
ADAPTER_FIELD = pa.field("adapter", pa.string())
"""The LoRA adapter that answered the row (null: the base model, or no answer): a column of jobs whose model has
adapters, after the ones above."""
IMAGES_FIELD = pa.field("images", pa.list_(pa.struct([
    ("source", pa.string()),  # a display URL or path, `data:<media type>`, or `column '<name>'` for bytes
    ("format", pa.string()),  # Pillow's name of the encoding: JPEG, PNG, WEBP, ...
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("bytes", pa.int64()),  # encoded size
    ("tokens", pa.int64()),  # prompt tokens the engine gave the image (counted in prompt_tokens); 0 if unanswered
])))
"""Each of the row's images in prompt order, null for rows without images: a column of jobs whose model has a vision
tower, after the ones above."""
RESULT_COLUMNS = frozenset([*RESULT_SCHEMA.names, LOGPROBS_FIELD.name, IMAGES_FIELD.name, ADAPTER_FIELD.name])


class Totals(BaseModel):
    """Row, token and cost sums over a set of output rows."""

    model_config = ConfigDict(extra="forbid")

    rows: int = Field(0, description="Output rows.")
    rows_ok: int = Field(0, description="Rows the engine answered.")
    rows_failed: int = Field(0, description="Error rows (`error_type` set).")
    prompt_tokens: int = Field(0, description="Sum of `prompt_tokens`.")
    completion_tokens: int = Field(0, description="Sum of `completion_tokens`.")
    reasoning_tokens: int = Field(0, description="Sum of `reasoning_tokens`.")
    cached_tokens: int = Field(0, description="Sum of `cached_tokens`.")
    total_tokens: int = Field(0, description="Sum of `total_tokens`.")
    input_cost_usd: float = Field(0.0, description="Sum of `input_cost_usd`.")
    output_cost_usd: float = Field(0.0, description="Sum of `output_cost_usd`.")
    cost_usd: float = Field(0.0, description="Sum of `cost_usd`: the list-price cost of the rows on a hosted API.")
    engine_seconds: float = Field(
        0.0, description="Engine busy seconds spent on these rows: each engine step's time split among the rows in it."
    )
    batch_seconds: float = Field(
        0.0, description="Engine busy seconds each row spent in the running batch, summed over rows; divided by "
        "`engine_seconds` it is the engine's mean running batch size."
    )
    parsed_rows: int = Field(0, description="Rows whose answer satisfied the response format (`parsed` set).")
    errors_by_type: dict[str, int] = Field(default_factory=dict, description="Error rows per `error_type`.")
    finish_reasons: dict[str, int] = Field(default_factory=dict, description="Rows per `finish_reason`.")

    def __add__(self, other: Totals) -> Totals:
        summed: dict[str, Any] = {}
        for name in type(self).model_fields:
            mine, theirs = getattr(self, name), getattr(other, name)
            summed[name] = dict(Counter(mine) + Counter(theirs)) if isinstance(mine, dict) else mine + theirs
        return Totals(**summed)

    @classmethod
    def of_table(cls, table: pa.Table, engine_seconds: float = 0.0, batch_seconds: float = 0.0) -> Totals:
        """Sums over one shard's output table."""
        column = table.column
        sums = {name: int(pa.compute.sum(column(name)).as_py() or 0)
                for name in ("prompt_tokens", "completion_tokens", "reasoning_tokens", "cached_tokens", "total_tokens")}
        costs = {name: float(pa.compute.sum(column(name)).as_py() or 0.0)
                 for name in ("input_cost_usd", "output_cost_usd", "cost_usd")}
        errors = Counter(value for value in column("error_type").to_pylist() if value is not None)
        failed = sum(errors.values())
        return cls(
            rows=table.num_rows, rows_ok=table.num_rows - failed, rows_failed=failed, **sums, **costs,
            parsed_rows=table.num_rows - table.column("parsed").null_count,
            engine_seconds=engine_seconds, batch_seconds=batch_seconds, errors_by_type=dict(errors),
            finish_reasons=dict(Counter(column("finish_reason").to_pylist())),
        )


class CommitRecord(BaseModel):
    """Written create-only after a shard's data file; its existence is what makes the shard count."""

    model_config = ConfigDict(extra="forbid")

    shard_id: str = Field(description="Stable hash of the shard's source file, size and row range.")
    variant: str = Field(description="Catalog variant that answered the shard.")
    data_file: str | None = Field(
        description="Output file name, relative to the output folder; None when routing sent none of the shard's "
        "rows to this model."
    )
    source_file: str = Field(description="Input file the shard was read from.")
    row_start: int = Field(description="First row (0-based position in the source file) of the shard.")
    row_count: int = Field(description="Rows the plan gave the shard.")
    run_id: str = Field(description="Run that committed the shard.")
    committed_at: str = Field(description="UTC time of the commit, ISO 8601.")
    totals: Totals = Field(description="Sums over the shard's output rows.")


class RunRecord(BaseModel):
    """One invocation of `qwen-batch run` on the job's output folder."""

    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(description="Unique id of the run.")
    started_at: str = Field(description="UTC start time, ISO 8601.")
    finished_at: str = Field(description="UTC end time, ISO 8601.")
    wall_seconds: float = Field(description="Wall time of the run.")
    shards_planned: int = Field(description="Shards in the plan.")
    shards_skipped: int = Field(description="Shards already committed by earlier runs, not recomputed.")
    shards_committed: int = Field(description="Shards this run committed.")
    accelerators: int = Field(description="Accelerators (GPUs, or CPU engines) the run's engines held.")
    accelerator_seconds: float = Field(description="Accelerators x seconds the engines were held.")
    engine_restarts: int = Field(0, description="Engine actors Ray restarted during the run: after a crash, or "
                                 "elsewhere when their node was lost.")
    outcome: Literal["running", "finished", "failed", "interrupted"] = Field(
        "finished", description="How the run ended: `running` is what the heartbeat writes while it runs, and stays "
        "if the driver was killed outright (SIGKILL); `failed` when an error stopped it, `interrupted` on Ctrl-C or a "
        "stop signal."
    )
    error: str | None = Field(None, description="With `failed`: the error that stopped the run, secrets redacted.")


class LeaseRecord(BaseModel):
    """A run's hold on its output folder (`_lease/<generation>.json`): while live, no other run writes there."""

    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(description="Run holding the lease.")
    host: str = Field(description="Host name of the holder's driver.")
    pid: int = Field(description="Process id of the holder's driver on that host.")
    since: str = Field(description="UTC time the lease was taken, ISO 8601.")
    renewed_at: str = Field(description="UTC time of the holder's last heartbeat, ISO 8601.")
    expires_at: str = Field(description="UTC time after which, without a heartbeat, the lease is free, ISO 8601.")


class JobManifest(BaseModel):
    """Written last, from the commit records: the job's totals equal the committed rows by construction."""

    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(description="`<name>-<spec hash>`: the same for every run of the same spec.")
    name: str = Field(description="Job name from the spec.")
    spec_hash: str = Field(description="Hash of the spec fields that decide the output rows.")
    spec: dict[str, Any] = Field(description="The spec, with secrets redacted.")
    output_path: str = Field(description="Output folder.")
    started_at: str = Field(description="UTC start of the first run, ISO 8601.")
    finished_at: str = Field(description="UTC end of the last run, ISO 8601.")
    complete: bool = Field(description="True when every planned shard is committed.")
    shards: int = Field(description="Shards committed.")
    rows_in: int = Field(description="Input rows read; equals rows_ok + rows_failed.")
    rows_ok: int = Field(description="Rows the engine answered.")
    rows_failed: int = Field(description="Error rows.")
    totals: Totals = Field(description="Sums over all output rows.")
    per_variant: dict[str, Totals] = Field(description="Sums per variant.")
    bad_files: list[str] = Field(default_factory=list, description="Input files skipped as unreadable (`on_bad_file: skip`).")
    carried_schema: dict[str, str] = Field(
        default_factory=dict, description="Arrow type of each carried column, as every output file has it after "
        "the result columns: fixed when the job was first planned, from input.schema or the input."
    )
    runs: list[RunRecord] = Field(description="Every run that worked on this output, oldest first.")
    wall_seconds: float = Field(description="Wall time summed over runs.")
    engine_seconds: float = Field(description="Engine busy seconds, summed over engines.")
    output_tokens_per_s: float = Field(description="Completion tokens per engine-second.")
    mean_running_batch: float = Field(
        0.0, description="Rows in an engine's running batch, averaged over its busy time: low values while shards "
        "remain mean the engine was starved."
    )
    error_rate: float = Field(0.0, description="rows_failed / rows_in.")
    error_limit_exceeded: bool = Field(
        False, description="error_rate is over the spec's limits.max_error_rate: the job counts as failed (exit 1)."
    )
    stopped: str | None = Field(None, description="Why the last run stopped before the end, if it did.")
    structured_validity_rate: float | None = Field(
        description="With a response format: share of answered rows whose answer satisfied it; else None."
    )
    list_price_cost_usd: float = Field(description="What the rows would cost on a hosted API at list prices.")
    accelerator_seconds: float = Field(description="Accelerator-seconds the engines were held, over all runs.")
    accelerator_hour_usd: float = Field(description="Price per accelerator-hour used for the compute cost.")
    compute_cost_usd: float = Field(description="accelerator_seconds / 3600 x accelerator_hour_usd.")
    savings_usd: float = Field(description="list_price_cost_usd - compute_cost_usd.")
    versions: dict[str, str] = Field(description="Versions of qwen-batch, vllm, ray, pyarrow and python.")
