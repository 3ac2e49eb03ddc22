"""Post-process, accounting and write: a shard's rows become one Parquet file, then a create-only commit record."""

from __future__ import annotations

import io
import json
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qwen_batch.pipelines import storage
from qwen_batch.pipelines.metrics import record_commit
from qwen_batch.pipelines.openai_batch import response_line
from qwen_batch.pipelines.stage import MODEL_COLUMN, Stage
from qwen_batch.schemas.results import ADAPTER_FIELD, IMAGES_FIELD, LOGPROBS_FIELD, RESULT_SCHEMA, CommitRecord, Totals

COMMITS_DIR = "_commits"
ANSWERED_ERROR = "invalid_structured_output"
OPENAI_DIR = "_openai"


@dataclass(frozen=True)
class Layout:
    """Where a job's files live under its output folder."""

    output: str

    @classmethod
    def at(cls, path: str) -> Layout:
        """The layout of the output folder `path`; a relative local path made absolute, as listings name files."""
        path = path.rstrip("/")
        return cls(os.path.abspath(path) if "://" not in path else path)

    def data_file(self, variant: str, shard_id: str, attempt: str) -> str:
        """The name, relative to the output folder, of one write attempt's data: each attempt writes its own file and
        the commit record names the one that counts, so no write ever touches committed data."""
        return f"{variant}/part-{shard_id}-{attempt}.parquet"

    def commit_url(self, variant: str, shard_id: str) -> str:
        return f"{self.output}/{COMMITS_DIR}/{variant}/{shard_id}.json"

    def openai_file(self, data_file: str) -> str:
        """The OpenAI batch output lines written beside `data_file`."""
        return f"{self.output}/{OPENAI_DIR}/{data_file.removesuffix('.parquet')}.jsonl"

    def uncommitted(self, variants: list[str], records: list[CommitRecord], options: dict) -> list[str]:
        """Data files of `variants` that no commit record names: attempts that lost a race to commit or whose writer
        died before committing."""
        named = {url for record in records if record.data_file
                 for url in (self.url(record.data_file), self.openai_file(record.data_file))}
        return [url for variant in variants for folder in (self.url(variant), f"{self.output}/{OPENAI_DIR}/{variant}")
                for url in storage.list_names(folder, options)
                if url.endswith((".parquet", ".jsonl")) and url not in named]

    def commits_prefix(self) -> str:
        return f"{self.output}/{COMMITS_DIR}"

    def url(self, name: str) -> str:
        return f"{self.output}/{name}"


@dataclass(frozen=True)
class WriteConfig:
    """What the write stage needs: where, which variant, the prices and the run."""

    layout: Layout
    storage_options: dict
    variant: str
    model: str
    input_per_mtok: float
    output_per_mtok: float
    carried: pa.Schema
    """The carried columns and the types every output file gives them (the plan's)."""
    run_id: str
    openai_output: bool = False
    job_id: str = ""
    logprobs: bool = False  # the output has the `logprobs` column (OpenAI batch input, whose requests may ask)
    images: bool = False  # the output has the `images` column (a model with a vision tower)
    adapter_prices: dict[str, tuple[float, float]] | None = None
    """(input, output) USD per 1M tokens of each LoRA adapter's rows; set when the model has adapters, which puts the
    `adapter` column in the output."""


class WriteStage(Stage):
    """Computes the cost columns, writes the shard's Parquet under its deterministic name, then commits it."""

    requires = {
        "_shard": "id of the shard the row belongs to",
        "_shard_rows": "rows the shard was planned with, to refuse a partial one",
        "id": "row id",
        "source_file": "input file",
        "source_row": "row position in the input file",
        "generated_text": "decoded answer",
        "reasoning_text": "decoded reasoning block, or null",
        "reasoning_tokens": "tokens of the reasoning block",
        "parsed": "the answer when it satisfied the row's response format, else null",
        "completion_token_ids": "token ids the engine generated",
        "finish_reason": "`stop`, `length`, or `error`",
        "logprobs": "generated tokens with their logprobs, for rows whose request asked",
        "images": "each of the row's images with the prompt tokens the engine gave it, null without images",
        "_adapter": "LoRA adapter that answered the row, null for the base model",
        "_skip": "true for rows another model of the job answers",
        "prompt_tokens": "prompt tokens the engine counted",
        "cached_tokens": "prompt tokens from the prefix cache",
        "_error_type": "error class, or null",
        "_error": "error message, or null",
        "_engine_seconds": "the row's share of the engine's busy time",
        "_batch_seconds": "engine busy time the row spent in the running batch",
    }
    produces = {
        "model": "the model whose output the shard is", "shard_id": "committed shard", "committed": "false if an earlier writer had committed it",
        "rows": "rows in the shard", "rows_failed": "error rows", "completion_tokens": "tokens generated",
        "cost_usd": "list-price cost of the shard",
    }

    def __init__(self, *configs: WriteConfig):
        self.configs = {config.variant: config for config in configs}

    def __call__(self, block: pa.Table) -> pa.Table:
        self.check(block)
        # Ray may hand several whole shards over as one block, and in a job of several models each shard's rows come
        # once per model (MODEL_COLUMN); each model's shard is written and committed on its own.
        if MODEL_COLUMN in block.column_names:
            models = [(model, block.filter(pc.equal(block.column(MODEL_COLUMN), model)))
                      for model in pc.unique(block.column(MODEL_COLUMN)).to_pylist()]
        else:
            models = [(next(iter(self.configs)), block)]
        return _summary_table([(model, *self.commit_shard(rows.filter(pc.equal(rows.column("_shard"), shard)),
                                                          self.configs[model]))
                               for model, rows in models for shard in pc.unique(rows.column("_shard")).to_pylist()])

    def commit_shard(self, rows: pa.Table, config: WriteConfig) -> tuple[str, bool, Totals]:
        """Write one shard's rows for one model and commit them; refuse a partial shard rather than commit it."""
        shard, expected = rows.column("_shard")[0].as_py(), rows.column("_shard_rows")[0].as_py()
        if rows.num_rows != expected:
            raise RuntimeError(f"shard {shard} reached the write stage with {rows.num_rows} of its {expected} rows: "
                               "Ray split its block, and a partial shard is never committed. Lower "
                               "input.rows_per_shard so each shard stays well below Ray's block size.")
        source_file, row_start = rows.column("source_file")[0].as_py(), int(pc.min(rows.column("source_row")).as_py())
        table = results_table(rows.filter(pc.invert(rows.column("_skip"))), config)
        commit_url = config.layout.commit_url(config.variant, shard)
        if storage.exists(commit_url, config.storage_options):
            # A retry of a shard that is already committed: its data is final, and this attempt writes none.
            return shard, False, Totals.of_table(table)
        data_file = None
        if table.num_rows:
            buffer = io.BytesIO()
            pq.write_table(table, buffer, compression="zstd")
            data_file = config.layout.data_file(config.variant, shard, uuid.uuid4().hex[:12])
            storage.write_bytes(config.layout.url(data_file), buffer.getvalue(), config.storage_options)
            if config.openai_output:
                created = int(datetime.now(timezone.utc).timestamp())
                lines = "".join(json.dumps(response_line(row, config.job_id, created)) + "\n"
                                for row in table.to_pylist())
                storage.write_bytes(config.layout.openai_file(data_file), lines.encode(), config.storage_options)
        totals = Totals.of_table(table, engine_seconds=float(pc.sum(rows.column("_engine_seconds")).as_py() or 0.0),
                                 batch_seconds=float(pc.sum(rows.column("_batch_seconds")).as_py() or 0.0))
        record = CommitRecord(
            shard_id=shard, variant=config.variant, data_file=data_file, source_file=source_file, row_start=row_start,
            row_count=table.num_rows, run_id=config.run_id,
            committed_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), totals=totals,
        )
        committed = storage.create_only(commit_url, record.model_dump_json().encode(), config.storage_options)
        if not committed and data_file is not None:
            # Another attempt committed first; unless its record names this attempt's file (a create whose reply was
            # lost and whose retry found its own record), this attempt's files are garbage.
            winner = read_commit(storage.read_bytes(commit_url, config.storage_options))
            committed = winner.data_file == data_file
            if not committed:
                storage.delete_files(config.layout.output, [config.layout.url(data_file), *(
                    [config.layout.openai_file(data_file)] if config.openai_output else [])], config.storage_options)
        if committed:
            record_commit(config.job_id, config.variant, totals)
        return shard, committed, totals


def _summary_table(shards: list[tuple[str, str, bool, Totals]]) -> pa.Table:
    """One row per model and shard (model, shard id, committed now, totals): what the driver follows progress with."""
    return pa.table({
        "model": pa.array([m for m, _, _, _ in shards], pa.string()),
        "shard_id": pa.array([s for _, s, _, _ in shards], pa.string()),
        "committed": pa.array([c for _, _, c, _ in shards], pa.bool_()),
        "rows": pa.array([t.rows for _, _, _, t in shards], pa.int64()),
        "rows_failed": pa.array([t.rows_failed for _, _, _, t in shards], pa.int64()),
        "completion_tokens": pa.array([t.completion_tokens for _, _, _, t in shards], pa.int64()),
        "cost_usd": pa.array([t.cost_usd for _, _, _, t in shards], pa.float64()),
    })


def results_table(block: pa.Table, config: WriteConfig) -> pa.Table:
    """The output rows of a shard, in RESULT_SCHEMA order with carried columns after, costs from token counts.

    Rows that failed before the engine carry zero tokens and cost; rows the engine answered keep their tokens and
    cost even when their answer then fails validation, because those tokens were spent.
    """
    count = block.num_rows
    # Rows the engine answered keep their tokens even when the answer then failed its format check.
    failed = pc.and_kleene(pc.is_valid(block.column("_error_type")),
                           pc.not_equal(block.column("_error_type"), ANSWERED_ERROR))
    prompt_tokens = pc.if_else(failed, 0, block.column("prompt_tokens"))
    completion_tokens = pc.if_else(failed, 0, pc.list_value_length(block.column("completion_token_ids")))
    completion_tokens = pc.cast(completion_tokens, pa.int64())
    input_price, output_price = config.input_per_mtok, config.output_per_mtok
    if config.adapter_prices is not None:
        prices = [config.adapter_prices.get(name, (input_price, output_price))
                  for name in block.column("_adapter").to_pylist()]
        input_price = pa.array([price for price, _ in prices], pa.float64())
        output_price = pa.array([price for _, price in prices], pa.float64())
    input_cost = _cost(prompt_tokens, input_price)
    output_cost = _cost(completion_tokens, output_price)
    text = pc.if_else(failed, pa.scalar(None, pa.string()), block.column("generated_text"))
    columns = {
        "id": block.column("id"),
        "variant": pa.array([config.variant] * count, pa.string()),
        "model": pa.array([config.model] * count, pa.string()),
        "generated_text": text,
        "reasoning_text": pc.if_else(failed, pa.scalar(None, pa.string()), block.column("reasoning_text")),
        "parsed": block.column("parsed"),
        "finish_reason": pc.if_else(failed, "error", block.column("finish_reason")),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "reasoning_tokens": pc.if_else(failed, 0, block.column("reasoning_tokens")),
        "cached_tokens": pc.if_else(failed, 0, block.column("cached_tokens")),
        "total_tokens": pc.add(prompt_tokens, completion_tokens),
        "input_cost_usd": input_cost,
        "output_cost_usd": output_cost,
        "cost_usd": pc.add(input_cost, output_cost),
        "error_type": block.column("_error_type"),
        "error": block.column("_error"),
        "source_file": block.column("source_file"),
        "source_row": block.column("source_row"),
    }
    table = pa.table(columns, schema=RESULT_SCHEMA)
    if config.logprobs:
        table = table.append_column(LOGPROBS_FIELD, pc.if_else(failed, pa.scalar(None, LOGPROBS_FIELD.type),
                                                               block.column(LOGPROBS_FIELD.name)))
    if config.adapter_prices is not None:
        table = table.append_column(ADAPTER_FIELD, pc.if_else(failed, pa.scalar(None, pa.string()),
                                                              block.column("_adapter")))
    if config.images:
        table = table.append_column(IMAGES_FIELD, block.column(IMAGES_FIELD.name))
    for field in config.carried:
        table = table.append_column(field, block.column(field.name).cast(field.type))
    return table


def _cost(tokens: pa.ChunkedArray, per_mtok: float | pa.Array) -> pa.ChunkedArray:
    """USD per row as tokens x price / 1e6, in that order, so it is the float a reader computes from the row."""
    return pc.divide(pc.multiply(pc.cast(tokens, pa.float64()), per_mtok), 1e6)


def read_commit(data: bytes) -> CommitRecord:
    """Parse a commit record."""
    return CommitRecord.model_validate(json.loads(data))
