"""Tests for pipelines.write and the result schema: accounting columns, the shard's Parquet file and its commit."""

from __future__ import annotations

import re
import threading
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qwen_batch.pipelines import storage
from qwen_batch.pipelines.engine import EngineStage
from qwen_batch.pipelines.read import BLOCK_SCHEMA
from qwen_batch.pipelines.write import COMMITS_DIR, Layout, WriteConfig, WriteStage, read_commit, results_table
from qwen_batch.schemas.results import IMAGES_FIELD, LOGPROBS_FIELD, RESULT_SCHEMA, Totals

SHARD = "0123456789abcdef0123"
VARIANT = "tiny-qwen2"
INPUT_PER_MTOK = 0.35
OUTPUT_PER_MTOK = 1.4

# One engine-output row per case; the error rows carry stray token counts the write stage must ignore.
ROWS: list[dict[str, Any]] = [
    {"prompt_tokens": 1213, "completion": 78, "finish_reason": "stop", "cached_tokens": 16, "error": None,
     "stars": 5, "note": "great"},
    {"prompt_tokens": 999_999, "completion": 256, "finish_reason": "length", "cached_tokens": 0, "error": None,
     "stars": 1, "note": None},
    {"prompt_tokens": 0, "completion": 0, "finish_reason": "error", "cached_tokens": 0,
     "error": ("invalid_json", "/data/in.jsonl line 3: expected one JSON object per line, found an empty line"),
     "stars": None, "note": None},
    {"prompt_tokens": 50, "completion": 2, "finish_reason": "stop", "cached_tokens": 7,
     "error": ("prompt_too_long", "prompt is 5000 tokens; ..."), "stars": 3, "note": "long"},
    {"prompt_tokens": 3, "completion": 1, "finish_reason": "stop", "cached_tokens": 0, "error": None,
     "stars": 4, "note": "short"},
]
OK_ROWS = [0, 1, 4]
ERROR_ROWS = [2, 3]


def engine_block(rows: list[dict[str, Any]] = ROWS, shard: str = SHARD, first_row: int = 40) -> pa.Table:
    """A block as EngineStage returns it: the read columns, carried columns, prompt ids and the engine's columns."""
    count = len(rows)
    columns: dict[str, Any] = {
        "_shard": [shard] * count,
        "_shard_rows": [count] * count,
        "id": [f"in.jsonl:{first_row + i}" for i in range(count)],
        "source_file": ["/data/in.jsonl"] * count,
        "source_row": [first_row + i for i in range(count)],
        "_prompt": ['{"q": "x"}'] * count,
        "_error_type": [row["error"][0] if row["error"] else None for row in rows],
        "_error": [row["error"][1] if row["error"] else None for row in rows],
        "_request": [None] * count,
    }
    table = pa.table(columns, schema=BLOCK_SCHEMA)
    table = table.append_column("stars", pa.array([row["stars"] for row in rows], pa.int64()))
    table = table.append_column("note", pa.array([row["note"] for row in rows], pa.string()))
    table = table.append_column("_adapter", pa.array([None] * count, pa.string()))
    engine_columns = {
        "prompt_token_ids": pa.array([[1] * row["prompt_tokens"] for row in rows], pa.list_(pa.int32())),
        "_skip": pa.array([False] * count, pa.bool_()),
        "generated_text": pa.array([f"answer {i}" for i in range(count)], pa.string()),
        "reasoning_text": pa.array([None] * count, pa.string()),
        "reasoning_tokens": pa.array([0] * count, pa.int64()),
        "completion_token_ids": pa.array([list(range(row["completion"])) for row in rows], pa.list_(pa.int32())),
        "finish_reason": pa.array([row["finish_reason"] for row in rows], pa.string()),
        "prompt_tokens": pa.array([row["prompt_tokens"] for row in rows], pa.int64()),
        "cached_tokens": pa.array([row["cached_tokens"] for row in rows], pa.int64()),
        "parsed": pa.array([None] * count, pa.string()),
        "logprobs": pa.array([None] * count, LOGPROBS_FIELD.type),
        "images": pa.array([None] * count, IMAGES_FIELD.type),
        "_engine_seconds": pa.array([0.5] * count, pa.float64()),
        "_batch_seconds": pa.array([1.5] * count, pa.float64()),
    }
    assert list(engine_columns) == ["prompt_token_ids", "_skip", *EngineStage.produces]
    for name, values in engine_columns.items():
        table = table.append_column(name, values)
    return table


def write_config(output: Path, run_id: str = "run-1") -> WriteConfig:
    return WriteConfig(layout=Layout(str(output)), storage_options={}, variant=VARIANT,
                       model="qwen-batch/tiny-qwen2", input_per_mtok=INPUT_PER_MTOK, output_per_mtok=OUTPUT_PER_MTOK,
                       carried=pa.schema([("stars", pa.int64()), ("note", pa.string())]), run_id=run_id)


@pytest.fixture
def table(tmp_path: Path) -> pa.Table:
    return results_table(engine_block(), write_config(tmp_path / "out"))


def column(table: pa.Table, name: str, rows: list[int]) -> list[Any]:
    values = table.column(name).to_pylist()
    return [values[i] for i in rows]


def test_costs_are_tokens_times_price_per_million_exactly(table: pa.Table) -> None:
    prompt = [ROWS[i]["prompt_tokens"] for i in OK_ROWS]
    completion = [ROWS[i]["completion"] for i in OK_ROWS]
    input_cost = [tokens * INPUT_PER_MTOK / 1e6 for tokens in prompt]
    output_cost = [tokens * OUTPUT_PER_MTOK / 1e6 for tokens in completion]

    assert column(table, "prompt_tokens", OK_ROWS) == prompt
    assert column(table, "completion_tokens", OK_ROWS) == completion
    assert column(table, "input_cost_usd", OK_ROWS) == input_cost
    assert column(table, "output_cost_usd", OK_ROWS) == output_cost
    assert column(table, "cost_usd", OK_ROWS) == [i + o for i, o in zip(input_cost, output_cost)]
    # The order of operations shows in the last bit: price / 1e6 first would give a different float.
    assert input_cost[0] != prompt[0] * (INPUT_PER_MTOK / 1e6)
    assert output_cost[0] != completion[0] * (OUTPUT_PER_MTOK / 1e6)


def test_total_tokens_is_prompt_plus_completion(table: pa.Table) -> None:
    totals = table.column("total_tokens").to_pylist()
    prompt, completion = table.column("prompt_tokens").to_pylist(), table.column("completion_tokens").to_pylist()

    assert totals == [p + c for p, c in zip(prompt, completion)]
    assert column(table, "total_tokens", OK_ROWS) == [1213 + 78, 999_999 + 256, 3 + 1]


def test_ok_rows_keep_the_engine_outputs(table: pa.Table) -> None:
    assert column(table, "generated_text", OK_ROWS) == ["answer 0", "answer 1", "answer 4"]
    assert column(table, "finish_reason", OK_ROWS) == ["stop", "length", "stop"]
    assert column(table, "cached_tokens", OK_ROWS) == [16, 0, 0]
    assert column(table, "error_type", OK_ROWS) == [None] * 3
    assert table.column("reasoning_tokens").to_pylist() == [0] * len(ROWS)
    assert table.column("variant").to_pylist() == [VARIANT] * len(ROWS)
    assert table.column("model").to_pylist() == ["qwen-batch/tiny-qwen2"] * len(ROWS)
    assert table.column("id").to_pylist() == [f"in.jsonl:{40 + i}" for i in range(len(ROWS))]
    assert table.column("source_row").to_pylist() == list(range(40, 40 + len(ROWS)))


def test_error_rows_have_zero_tokens_and_costs_and_finish_reason_error(table: pa.Table) -> None:
    for name in ("prompt_tokens", "completion_tokens", "reasoning_tokens", "cached_tokens", "total_tokens"):
        assert column(table, name, ERROR_ROWS) == [0, 0], name
    for name in ("input_cost_usd", "output_cost_usd", "cost_usd"):
        assert column(table, name, ERROR_ROWS) == [0.0, 0.0], name
    assert column(table, "finish_reason", ERROR_ROWS) == ["error", "error"]
    assert column(table, "generated_text", ERROR_ROWS) == [None, None]
    assert column(table, "error_type", ERROR_ROWS) == ["invalid_json", "prompt_too_long"]
    assert column(table, "error", ERROR_ROWS) == [ROWS[2]["error"][1], ROWS[3]["error"][1]]


def test_columns_follow_result_schema_with_carry_columns_after(table: pa.Table) -> None:
    assert table.schema.names == [*RESULT_SCHEMA.names, "stars", "note"]
    for index, field in enumerate(RESULT_SCHEMA):
        assert table.schema.field(index) == field
    assert table.schema.field("stars").type == pa.int64()
    assert table.column("stars").to_pylist() == [row["stars"] for row in ROWS]
    assert table.column("note").to_pylist() == [row["note"] for row in ROWS]


def test_write_stage_writes_the_shard_file_and_a_commit_record(tmp_path: Path) -> None:
    output = tmp_path / "out"
    block = engine_block()
    config = write_config(output)

    summary = WriteStage(config)(block)

    record = read_commit((output / COMMITS_DIR / VARIANT / f"{SHARD}.json").read_bytes())
    assert (record.shard_id, record.variant) == (SHARD, VARIANT)
    assert re.fullmatch(f"{VARIANT}/part-{SHARD}-[0-9a-f]{{12}}.parquet", record.data_file)
    assert pq.read_table(output / record.data_file).equals(results_table(block, config))
    assert [p.name for p in (output / VARIANT).iterdir()] == [record.data_file.split("/")[1]]
    assert (record.source_file, record.row_start, record.row_count, record.run_id) == ("/data/in.jsonl", 40, 5, "run-1")
    assert record.totals == Totals.of_table(results_table(block, config), engine_seconds=2.5, batch_seconds=7.5)
    assert summary.to_pylist() == [{
        "model": VARIANT, "shard_id": SHARD, "committed": True, "rows": 5, "rows_failed": 2, "completion_tokens": 78 + 256 + 1,
        "cost_usd": record.totals.cost_usd,
    }]


def test_second_write_of_a_committed_shard_changes_nothing(tmp_path: Path) -> None:
    output = tmp_path / "out"
    block = engine_block()
    commit_file = output / COMMITS_DIR / VARIANT / f"{SHARD}.json"
    WriteStage(write_config(output, run_id="run-1"))(block)
    first_commit = commit_file.read_bytes()
    data_file = output / read_commit(first_commit).data_file
    first_data = data_file.read_bytes()

    summary = WriteStage(write_config(output, run_id="run-2"))(block)

    assert summary.column("committed").to_pylist() == [False]
    assert data_file.read_bytes() == first_data
    assert commit_file.read_bytes() == first_commit
    assert read_commit(first_commit).run_id == "run-1"
    assert sorted(p.name for p in commit_file.parent.iterdir()) == [f"{SHARD}.json"]
    assert sorted(p.name for p in data_file.parent.iterdir()) == [data_file.name]


def test_a_torn_file_of_a_dead_attempt_is_left_alone_and_listed_as_uncommitted(tmp_path: Path) -> None:
    output = tmp_path / "out"
    torn = output / VARIANT / f"part-{SHARD}-0123456789ab.parquet"
    torn.parent.mkdir(parents=True)
    torn.write_bytes(b"torn write")
    config = write_config(output)

    summary = WriteStage(config)(engine_block())

    assert summary.column("committed").to_pylist() == [True]
    record = read_commit((output / COMMITS_DIR / VARIANT / f"{SHARD}.json").read_bytes())
    assert pq.read_table(output / record.data_file).num_rows == len(ROWS)
    assert torn.read_bytes() == b"torn write"
    assert config.layout.uncommitted([VARIANT], [record], {}) == [str(torn)]


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_two_writers_racing_on_one_shard_never_rewrite_the_committed_data(where: str, tmp_path: Path,
                                                                         request: pytest.FixtureRequest,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The worst order: A writes its data, B writes its data, A commits, B's commit finds A's. B's data differs (its
    answers, its run), so a B that rewrote A's file would leave a commit record whose totals the file does not
    hold."""
    output = (f"s3://{request.getfixturevalue('s3').bucket}/race-{uuid.uuid4().hex[:8]}" if where == "s3"
              else str(tmp_path / "out"))
    steps = {name: threading.Event() for name in ("a wrote", "b wrote", "a committed")}
    real_write, real_create = storage.write_bytes, storage.create_only

    def write_bytes(url: str, data: bytes, options: dict | None = None) -> None:
        writer = threading.current_thread().name
        if writer == "b" and url.endswith(".parquet"):
            steps["a wrote"].wait(30)
        real_write(url, data, options)
        if url.endswith(".parquet"):
            steps[f"{writer} wrote"].set()

    def create_only(url: str, data: bytes, options: dict | None = None) -> bool:
        writer = threading.current_thread().name
        steps["b wrote" if writer == "a" else "a committed"].wait(30)
        created = real_create(url, data, options)
        if writer == "a":
            steps["a committed"].set()
        return created

    monkeypatch.setattr(storage, "write_bytes", write_bytes)
    monkeypatch.setattr(storage, "create_only", create_only)
    blocks = {"a": engine_block(), "b": engine_block(ROWS[::-1])}  # B's shard: the same rows, other answers
    summaries: dict[str, pa.Table] = {}
    writers = [threading.Thread(target=lambda name=name: summaries.update({name: WriteStage(
        write_config(Layout.at(output).output, run_id=f"run-{name}"))(blocks[name])}), name=name) for name in blocks]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)

    assert summaries["a"].column("committed").to_pylist() == [True]
    assert summaries["b"].column("committed").to_pylist() == [False]
    layout = Layout.at(output)
    record = read_commit(storage.read_bytes(layout.commit_url(VARIANT, SHARD)))
    assert record.run_id == "run-a"
    committed = pq.read_table(storage.filesystem(layout.url(record.data_file))[1],
                              filesystem=storage.filesystem(output)[0])
    assert committed.equals(results_table(blocks["a"], write_config(Path(output), run_id="run-a")))
    assert Totals.of_table(committed, engine_seconds=2.5, batch_seconds=7.5) == record.totals
    assert storage.list_names(layout.url(VARIANT)) == [layout.url(record.data_file)]  # B removed its own file


def test_a_block_holding_two_whole_shards_commits_each(tmp_path: Path) -> None:
    first, second = engine_block(ROWS[:2]), engine_block(ROWS[2:], shard="another-shard", first_row=0)

    summary = WriteStage(write_config(tmp_path / "out"))(pa.concat_tables([first, second]))

    assert summary.column("shard_id").to_pylist() == [SHARD, "another-shard"]
    assert summary.column("committed").to_pylist() == [True, True]
    assert summary.column("rows").to_pylist() == [2, 3]
    for shard, block in ((SHARD, first), ("another-shard", second)):
        record = read_commit((tmp_path / "out" / COMMITS_DIR / VARIANT / f"{shard}.json").read_bytes())
        written = pq.read_table(tmp_path / "out" / record.data_file)
        assert written.equals(results_table(block, write_config(tmp_path / "out")))
        assert record.row_count == block.num_rows


def test_a_block_of_two_models_commits_each_models_shard_under_its_own_name(tmp_path: Path) -> None:
    first = write_config(tmp_path / "out")
    second = replace(first, variant="second")
    block = engine_block()
    tagged = pa.concat_tables([block.append_column("_model", pa.array([name] * block.num_rows))
                               for name in (VARIANT, "second")])

    summary = WriteStage(first, second)(tagged)

    assert summary.select(["model", "shard_id", "committed", "rows"]).to_pylist() == [
        {"model": VARIANT, "shard_id": SHARD, "committed": True, "rows": len(ROWS)},
        {"model": "second", "shard_id": SHARD, "committed": True, "rows": len(ROWS)}]
    for config in (first, second):
        record = read_commit((tmp_path / "out" / COMMITS_DIR / config.variant / f"{SHARD}.json").read_bytes())
        written = pq.read_table(tmp_path / "out" / record.data_file)
        assert record.variant == config.variant and written.column("variant").to_pylist() == [config.variant] * 5


def test_a_partial_shard_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    whole = engine_block()

    with pytest.raises(RuntimeError, match=f"shard {SHARD} reached the write stage with 3 of its 5 rows"):
        WriteStage(write_config(tmp_path / "out"))(whole.slice(0, 3))
    assert not (tmp_path / "out").exists()


def test_write_stage_names_missing_columns(tmp_path: Path) -> None:
    block = engine_block().drop_columns(["_engine_seconds", "completion_token_ids"])

    with pytest.raises(KeyError, match=r"\['_engine_seconds', 'completion_token_ids'\] not found at the input of "
                                       "WriteStage"):
        WriteStage(write_config(tmp_path / "out"))(block)


def test_totals_of_table_sums_the_rows(table: pa.Table) -> None:
    totals = Totals.of_table(table, engine_seconds=2.5)

    rows = table.to_pylist()
    assert (totals.rows, totals.rows_ok, totals.rows_failed) == (5, 3, 2)
    for name in ("prompt_tokens", "completion_tokens", "reasoning_tokens", "cached_tokens", "total_tokens"):
        assert getattr(totals, name) == sum(row[name] for row in rows), name
    for name in ("input_cost_usd", "output_cost_usd", "cost_usd"):
        assert getattr(totals, name) == pytest.approx(sum(row[name] for row in rows), rel=1e-12), name
    assert totals.prompt_tokens == 1213 + 999_999 + 3
    assert totals.engine_seconds == 2.5
    assert totals.errors_by_type == {"invalid_json": 1, "prompt_too_long": 1}
    assert totals.finish_reasons == {"stop": 2, "length": 1, "error": 2}


def test_totals_of_an_empty_table_are_zero() -> None:
    empty = RESULT_SCHEMA.empty_table()

    assert Totals.of_table(empty, engine_seconds=0.0) == Totals()


def test_totals_add_sums_counts_and_merges_breakdowns() -> None:
    first = Totals(rows=3, rows_ok=2, rows_failed=1, prompt_tokens=10, completion_tokens=5, total_tokens=15,
                   cost_usd=0.25, engine_seconds=1.5, errors_by_type={"invalid_json": 1},
                   finish_reasons={"stop": 2, "error": 1})
    second = Totals(rows=2, rows_ok=1, rows_failed=1, prompt_tokens=7, cached_tokens=4, total_tokens=7,
                    cost_usd=0.5, engine_seconds=2.0, errors_by_type={"invalid_json": 1},
                    finish_reasons={"length": 1, "error": 1})

    summed = first + second

    assert summed == Totals(rows=5, rows_ok=3, rows_failed=2, prompt_tokens=17, completion_tokens=5, cached_tokens=4,
                            total_tokens=22, cost_usd=0.75, engine_seconds=3.5, errors_by_type={"invalid_json": 2},
                            finish_reasons={"stop": 2, "length": 1, "error": 2})
    assert first + Totals() == first
    assert sum([first, second], Totals()) == summed



def test_a_relative_output_path_names_files_as_listings_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qwen_batch.pipelines import storage

    monkeypatch.chdir(tmp_path)
    layout = Layout.at("out/")
    storage.write_bytes(layout.url("_lease/1.json"), b"{}")
    assert layout.output == str(tmp_path / "out")
    assert storage.list_names(layout.output) == [layout.url("_lease/1.json")]
    assert Layout.at("s3://bucket/out/").output == "s3://bucket/out"
