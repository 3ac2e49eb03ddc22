"""End to end: real Ray, real vLLM on the tiny Qwen checkpoints, real S3 (SeaweedFS) and local files."""

from __future__ import annotations

import csv
import functools
import io
import json
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qwen_batch.jobs.driver import run_job
from qwen_batch.pipelines import storage
from qwen_batch.schemas.catalog import get_variant
from qwen_batch.schemas.spec import load_spec

pytestmark = [pytest.mark.engine, pytest.mark.s3]

SYSTEM = "You label customer reviews."
TEMPLATE = "Review: {text}\nIs this review positive or negative?"


def reviews(count: int, start: int = 0) -> list[dict[str, Any]]:
    """Rows with an id, a text of varying length and a carried score."""
    words = ["great", "broken", "late", "perfect", "cheap", "solid", "noisy", "bright"]
    return [{"review_id": f"r{i:05d}", "text": " ".join(words[(i + k) % 8] for k in range(1 + i % 5)),
             "score": i % 5} for i in range(start, start + count)]


def encode(rows: list[dict[str, Any]], fmt: str) -> bytes:
    """The rows as a file of the given format."""
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue().encode()
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink, row_group_size=16)
    return sink.getvalue()


def base_url(where: str, tmp_path: Path, s3) -> str:
    """A fresh folder on S3 or on the local disk."""
    return f"s3://{s3.bucket}/{uuid.uuid4().hex[:8]}" if where == "s3" else str(tmp_path)


def write_input(url: str, files: list[list[dict[str, Any]]], fmt: str) -> None:
    for index, rows in enumerate(files):
        storage.write_bytes(f"{url}/input/part-{index}.{fmt}", encode(rows, fmt))


EDGE_COLUMNS = ["price", "seen_at", "note"]


def with_edge_types(files: list[list[dict[str, Any]]], fmt: str) -> list[list[dict[str, Any]]]:
    """The files with carried columns whose types differ from file to file, as real inputs' do: prices as decimals of
    different precision (Parquet) or as integers in one file and floats in another (JSONL), nanosecond timestamps,
    a column that is null in every row of some files."""
    edged = []
    for index, rows in enumerate(files):
        edged.append([{**row, "price": None if index == 2 else (row["score"] + 0.25 if index else row["score"] * 10),
                       "seen_at": 1_700_000_000_000_000_001 + position, "note": f"n{position}" if index == 0 else None}
                      for position, row in enumerate(rows)])
    return edged


def write_edge_input(url: str, files: list[list[dict[str, Any]]], fmt: str) -> None:
    if fmt != "parquet":
        return write_input(url, files, fmt)
    for index, rows in enumerate(files):
        table = pa.Table.from_pylist([{k: v for k, v in row.items() if k not in EDGE_COLUMNS} for row in rows])
        price = pa.array([None if row["price"] is None else Decimal(str(row["price"])) for row in rows],
                         pa.decimal128(6 + index, 2 + index) if index < 2 else pa.null())
        table = table.append_column("price", price).append_column(
            "seen_at", pa.array([row["seen_at"] for row in rows], pa.timestamp("ns"))).append_column(
            "note", pa.array([row["note"] for row in rows], pa.string() if index == 0 else pa.null()))
        sink = io.BytesIO()
        pq.write_table(table, sink, row_group_size=16)
        storage.write_bytes(f"{url}/input/part-{index}.parquet", sink.getvalue())


def check_readers(url: str, rows: int) -> None:
    """The output folder reads whole, one schema over all its part files, with pyarrow and pandas (through fsspec
    on S3), and locally with Polars and DuckDB too."""
    import duckdb
    import pandas as pd
    import polars as pl

    fs, path = storage.filesystem(url)
    table = pq.read_table(path, filesystem=fs)
    assert table.num_rows == rows
    assert len(pd.read_parquet(path, filesystem=fs)) == rows
    if "://" in url:
        return
    assert pl.read_parquet(f"{url}/**/*.parquet").height == rows
    assert duckdb.sql(f"select count(*) from read_parquet('{url}/**/*.parquet')").fetchall() == [(rows,)]


def job_spec(input_url: str, fmt: str, output_url: str, **overrides: Any) -> dict[str, Any]:
    spec = {
        "name": "reviews",
        "input": {"path": f"{input_url}/input", "format": fmt, "id_column": "review_id", "carry_columns": ["score"],
                  "rows_per_shard": 16},
        "prompt": {"system": SYSTEM, "template": TEMPLATE},
        "model": {"variant": "tiny-qwen2", "max_model_len": 512},
        "sampling": {"max_tokens": 8, "temperature": 0, "seed": 0},
        "output": {"path": f"{output_url}/output"},
    }
    for section, values in overrides.items():
        spec[section] = {**spec[section], **values} if isinstance(values, dict) else values
    return spec


def read_output(url: str) -> pa.Table:
    """Every committed output row, read back with pyarrow through fsspec."""
    fs, path = storage.filesystem(url)
    return pq.read_table(path, filesystem=fs)


def read_manifest(url: str) -> dict[str, Any]:
    return json.loads(storage.read_bytes(f"{url}/_manifest.json"))


@functools.cache
def tokenizer_of(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def expected_prompt_tokens(model_dir: Path, text: str) -> int:
    """An independent count: the tokenizer applied to the chat-templated prompt."""
    tokenizer = tokenizer_of(model_dir)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TEMPLATE.format(text=text)}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def check_accounting(table: pa.Table, manifest: dict[str, Any], source: list[dict[str, Any]], model_dir: Path) -> None:
    """One row per input row with ids kept, exact token and cost columns, manifest totals equal to the row sums."""
    variant = get_variant("tiny-qwen2")
    rows = {r["id"]: r for r in table.to_pylist()}
    assert table.num_rows == len(source) == len(rows)
    assert set(rows) == {r["review_id"] for r in source}
    for original in source:
        row = rows[original["review_id"]]
        assert row["error_type"] is None, row["error"]
        assert str(row["score"]) == str(original["score"])
        assert row["variant"] == "tiny-qwen2" and row["model"] == variant.hf_id
        assert row["prompt_tokens"] == expected_prompt_tokens(model_dir, original["text"])
        assert row["finish_reason"] == "length" and row["completion_tokens"] == 8
        assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]
        assert row["input_cost_usd"] == row["prompt_tokens"] * variant.input_per_mtok / 1e6
        assert row["output_cost_usd"] == row["completion_tokens"] * variant.output_per_mtok / 1e6
        assert row["cost_usd"] == row["input_cost_usd"] + row["output_cost_usd"]
    totals = manifest["totals"]
    for column in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert totals[column] == sum(r[column] for r in rows.values())
    assert totals["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in rows.values()), rel=1e-12)
    assert manifest["rows_in"] == manifest["rows_ok"] == len(source) and manifest["rows_failed"] == 0
    assert manifest["complete"] and manifest["per_variant"]["tiny-qwen2"]["rows"] == len(source)
    assert manifest["compute_cost_usd"] > 0 and manifest["list_price_cost_usd"] == totals["cost_usd"]
    assert manifest["versions"]["vllm"] and manifest["versions"]["ray"]


# Each format once, each storage once as the source and once as the destination: an engine start is the cost of a
# case, and the readers of every format on local files are tested in test_read, JSONL on S3 in test_bad_input.
@pytest.mark.parametrize(
    ("fmt", "source", "destination"),
    [("parquet", "s3", "local"), ("jsonl", "local", "s3"), ("csv", "s3", "s3")],
)
def test_job_writes_one_accounted_row_per_input_row(fmt, source, destination, tmp_path, s3, ray_local, tiny_models):
    input_url, output_url = base_url(source, tmp_path, s3), base_url(destination, tmp_path, s3)
    files = with_edge_types([reviews(20), reviews(13, start=20), reviews(1, start=33)], fmt)
    write_edge_input(input_url, files, fmt)
    carried = {"carry_columns": ["score", *EDGE_COLUMNS]} | ({"schema": {"seen_at": "int64"}} if fmt == "csv" else {})
    bad_files = []
    if fmt == "parquet":  # between the good files, one whose footer is garbage: skipped, as input.on_bad_file says
        bad_files = [f"{input_url}/input/part-1-corrupt.parquet"]
        storage.write_bytes(bad_files[0], b"PAR1 not a parquet file at all PAR1")
        carried["on_bad_file"] = "skip"
    manifest = run_job(load_spec(job_spec(input_url, fmt, output_url, input=carried)))
    assert manifest.shards == 4  # 16 + 4, 13, 1 rows
    assert manifest.bad_files == read_manifest(f"{output_url}/output")["bad_files"] == bad_files
    table = read_output(f"{output_url}/output")
    check_accounting(table, read_manifest(f"{output_url}/output"), [r for f in files for r in f], tiny_models["qwen2"])
    check_readers(f"{output_url}/output", manifest.rows_in)
    expected = {"parquet": {"score": "int64", "price": "decimal128(7, 3)", "seen_at": "timestamp[ns]",
                            "note": "string"},
                "jsonl": {"score": "int64", "price": "double", "seen_at": "int64", "note": "string"},
                "csv": {"score": "string", "price": "string", "seen_at": "int64", "note": "string"}}[fmt]
    assert manifest.carried_schema == expected
    rows = {row["id"]: row for row in table.to_pylist()}
    for row in (r for f in files for r in f):
        written = rows[row["review_id"]]
        assert written["note"] == row["note"] or (fmt == "csv" and written["note"] == "" and row["note"] is None)
        if fmt != "csv":
            assert (None if written["price"] is None else float(written["price"])) == row["price"]
        seen_at = written["seen_at"]
        assert (seen_at.value if fmt == "parquet" else seen_at) == row["seen_at"]


def test_finish_reason_is_stop_when_a_stop_string_ends_generation(tmp_path, reviews_job):
    """The session's finished reviews job run again with a stop string taken from its own answers."""
    texts = read_output(str(reviews_job.output)).column("generated_text").to_pylist()
    stop = texts[0][2:5]  # greedy decoding repeats itself, so this appears again in the rerun
    spec = {**reviews_job.spec, "sampling": {**reviews_job.spec["sampling"], "stop": [stop]},
            "output": {"path": str(tmp_path / "stopped")}}
    rerun = run_job(load_spec(spec))
    rows = read_output(rerun.output_path).to_pylist()
    stopped = [r for r in rows if r["finish_reason"] == "stop"]
    assert stopped, f"no row stopped on {stop!r}"
    for row in stopped:
        assert stop not in row["generated_text"] and 0 < row["completion_tokens"] < 8
    assert rerun.totals.finish_reasons == {reason: sum(r["finish_reason"] == reason for r in rows)
                                           for reason in {r["finish_reason"] for r in rows}}
