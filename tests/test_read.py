"""Tests for pipelines.read: shard planning and reading JSONL, CSV and Parquet files on local disk."""

from __future__ import annotations

import csv
import decimal
import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from qwen_batch.pipelines import read
from qwen_batch.pipelines.read import BLOCK_SCHEMA, ReadConfig, Shard, plan_shards, read_shard
from qwen_batch.pipelines.storage import list_files
from qwen_batch.schemas.errors import SpecError
from qwen_batch.schemas.spec import InputSpec

ROWS_PER_SHARD = [1, 2, 7, 1000]


def plan(path: Path, fmt: str, **fields: Any) -> tuple[list[Shard], list[str]]:
    return plan_shards(InputSpec(path=str(path), format=fmt, **fields), list_files(str(path)))


def read_all(path: Path, fmt: str, prompt_columns: tuple[str, ...] = ("text",), **fields: Any) -> pa.Table:
    """Plan the input and read every shard into one table, in plan order."""
    spec = InputSpec(path=str(path), format=fmt, **fields)
    shards, _ = plan_shards(spec, list_files(str(path)))
    config = ReadConfig.of(spec, list(prompt_columns))
    return pa.concat_tables([read_shard(shard, config) for shard in shards])


def prompts(table: pa.Table) -> list[dict[str, Any] | None]:
    return [None if raw is None else json.loads(raw) for raw in table.column("_prompt").to_pylist()]


def errors_by_row(table: pa.Table) -> dict[int, tuple[str, str]]:
    return {row["source_row"]: (row["_error_type"], row["_error"]) for row in table.to_pylist() if row["_error_type"]}


def assert_shards_tile(shards: list[Shard], rows: int, rows_per_shard: int, byte_start: int, byte_end: int) -> None:
    """Row ranges and byte ranges follow each other without gap or overlap and cover the whole file."""
    assert sum(s.row_count for s in shards) == rows
    assert [s.row_start for s in shards] == [sum(s.row_count for s in shards[:i]) for i in range(len(shards))]
    assert all(s.row_count == rows_per_shard for s in shards[:-1])
    assert 0 < shards[-1].row_count <= rows_per_shard
    assert shards[0].byte_start == byte_start
    assert [s.byte_start for s in shards[1:]] == [s.byte_end for s in shards[:-1]]
    assert shards[-1].byte_end == byte_end


def jsonl_bytes(records: list[dict[str, Any]], newline: str = "\n", trailing: bool = True) -> bytes:
    text = newline.join(json.dumps(record) for record in records) + (newline if trailing else "")
    return text.encode()


RECORDS = [{"text": f"row {i} ✓", "n": i} for i in range(23)]


@pytest.mark.parametrize("rows_per_shard", ROWS_PER_SHARD)
@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["lf", "crlf"])
@pytest.mark.parametrize("trailing", [True, False], ids=["trailing-newline", "no-trailing-newline"])
def test_jsonl_shards_cover_every_row_exactly_once(
    tmp_path: Path, rows_per_shard: int, newline: str, trailing: bool
) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(jsonl_bytes(RECORDS, newline, trailing))

    shards, bad_files = plan(path, "jsonl", rows_per_shard=rows_per_shard)
    table = read_all(path, "jsonl", rows_per_shard=rows_per_shard)

    assert bad_files == []
    assert_shards_tile(shards, len(RECORDS), rows_per_shard, 0, path.stat().st_size)
    assert table.column("source_row").to_pylist() == list(range(len(RECORDS)))
    assert prompts(table) == [{"text": r["text"]} for r in RECORDS]
    assert table.column("_error_type").null_count == len(RECORDS)


@pytest.mark.parametrize("rows_per_shard", ROWS_PER_SHARD)
def test_jsonl_rows_per_shard_dividing_the_row_count_keeps_the_last_line_without_newline(
    tmp_path: Path, rows_per_shard: int
) -> None:
    records = RECORDS[: 7 if rows_per_shard == 1000 else rows_per_shard * 2]
    path = tmp_path / "data.jsonl"
    path.write_bytes(jsonl_bytes(records, trailing=False))

    shards, _ = plan(path, "jsonl", rows_per_shard=rows_per_shard)

    assert_shards_tile(shards, len(records), rows_per_shard, 0, path.stat().st_size)


def test_jsonl_block_has_the_block_schema_columns_in_order(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(jsonl_bytes(RECORDS[:3]))

    table = read_all(path, "jsonl", carry_columns=["n"])

    assert table.schema.names == [*BLOCK_SCHEMA.names, "n"]
    for field in BLOCK_SCHEMA:
        assert table.schema.field(field.name).type == field.type
    assert set(table.column("_shard").to_pylist()) == {s.shard_id for s in plan(path, "jsonl")[0]}
    assert table.column("source_file").to_pylist() == [str(path)] * 3


def csv_bytes(header: list[str], rows: list[list[Any]], newline: str = "\n", trailing: bool = True) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator=newline).writerows([header, *rows])
    text = buffer.getvalue()
    return (text if trailing else text.removesuffix(newline)).encode()


CSV_ROWS = [[f"row {i}", str(i)] for i in range(23)]


@pytest.mark.parametrize("rows_per_shard", ROWS_PER_SHARD)
@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["lf", "crlf"])
@pytest.mark.parametrize("trailing", [True, False], ids=["trailing-newline", "no-trailing-newline"])
def test_csv_shards_cover_every_row_exactly_once(
    tmp_path: Path, rows_per_shard: int, newline: str, trailing: bool
) -> None:
    path = tmp_path / "data.csv"
    path.write_bytes(csv_bytes(["text", "n"], CSV_ROWS, newline, trailing))
    header_end = len(f"text,n{newline}")

    shards, _ = plan(path, "csv", rows_per_shard=rows_per_shard)
    table = read_all(path, "csv", rows_per_shard=rows_per_shard, carry_columns=["n"])

    assert_shards_tile(shards, len(CSV_ROWS), rows_per_shard, header_end, path.stat().st_size)
    assert all(s.header_end == header_end for s in shards)
    assert table.column("source_row").to_pylist() == list(range(len(CSV_ROWS)))
    assert prompts(table) == [{"text": text} for text, _ in CSV_ROWS]
    assert table.column("n").to_pylist() == [n for _, n in CSV_ROWS]
    assert table.column("_error_type").null_count == len(CSV_ROWS)


QUOTED_ROWS = [
    ["plain", "1"],
    ["two\nlines", "2"],
    ['she said ""hi""\nthen "left"', "3"],
    ["", "4"],
    ['"', "5"],
    ["comma, and\r\ncrlf inside", "6"],
    ['ends with a newline\n', "7"],
    ["\n\n\n", "8"],
    ["last", "9"],
]


@pytest.mark.parametrize("rows_per_shard", ROWS_PER_SHARD)
@pytest.mark.parametrize("scan_chunk_bytes", [1, 5, 16 << 20])
@pytest.mark.parametrize("trailing", [True, False], ids=["trailing-newline", "no-trailing-newline"])
def test_csv_quoted_newlines_and_doubled_quotes_split_only_at_record_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows_per_shard: int, scan_chunk_bytes: int, trailing: bool
) -> None:
    monkeypatch.setattr(read, "SCAN_CHUNK_BYTES", scan_chunk_bytes)
    path = tmp_path / "quoted.csv"
    data = csv_bytes(["text", "n"], [[text.replace('""', '"'), n] for text, n in QUOTED_ROWS], trailing=trailing)
    path.write_bytes(data)
    expected = list(csv.reader(io.StringIO(data.decode(), newline="")))[1:]

    shards, _ = plan(path, "csv", rows_per_shard=rows_per_shard)
    table = read_all(path, "csv", rows_per_shard=rows_per_shard, carry_columns=["n"])

    assert_shards_tile(shards, len(expected), rows_per_shard, len(b"text,n\n"), len(data))
    for shard in shards:
        piece = data[shard.byte_start : shard.byte_end].decode()
        assert len(list(csv.reader(io.StringIO(piece, newline="")))) == shard.row_count
    assert prompts(table) == [{"text": text} for text, _ in expected]
    assert table.column("n").to_pylist() == [n for _, n in expected]


def test_csv_header_with_quoted_newline_is_one_record(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_bytes(b'"te\nxt",n\na,1\nb,2\n')

    table = read_all(path, "csv", prompt_columns=("te\nxt",), carry_columns=["n"])

    assert prompts(table) == [{"te\nxt": "a"}, {"te\nxt": "b"}]
    assert table.column("n").to_pylist() == ["1", "2"]


def test_csv_record_with_wrong_field_count_is_an_error_row(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_bytes(b"text,n\na,1\nb,2,extra\nc\nd,4\n")

    table = read_all(path, "csv", carry_columns=["n"])

    errors = errors_by_row(table)
    assert sorted(errors) == [1, 2]
    assert errors[1][0] == errors[2][0] == "invalid_csv"
    assert f"{path} record 2 (after the header): expected 2 fields as in the header, found 3" in errors[1][1]
    assert f"{path} record 3 (after the header): expected 2 fields as in the header, found 1" in errors[2][1]
    assert prompts(table) == [{"text": "a"}, None, None, {"text": "d"}]
    assert table.column("n").to_pylist() == ["1", None, None, "4"]


def test_csv_invalid_utf8_is_an_error_row(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_bytes(b"text,n\na,1\nb\xff\xfe,2\nc,3\n")

    table = read_all(path, "csv")

    errors = errors_by_row(table)
    assert list(errors) == [1]
    assert errors[1][0] == "invalid_utf8"
    assert f"{path} record 2 (after the header) is not valid UTF-8" in errors[1][1]
    assert prompts(table)[2] == {"text": "c"}


def test_csv_without_a_header_line_fails_planning_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    other = tmp_path / "ok.csv"
    other.write_bytes(b"text\na\n")

    with pytest.raises(SpecError, match="has no header line") as caught:
        plan(tmp_path, "csv")
    assert str(path) in str(caught.value)


def test_csv_header_longer_than_the_scanned_head_is_not_cut_short(tmp_path: Path) -> None:
    path = tmp_path / "wide.csv"
    path.write_bytes(b",".join(b"column_%d" % i for i in range(120_000)) + b"\na,b\n")

    with pytest.raises(SpecError, match="has no header line"):
        plan(path, "csv")


def test_empty_jsonl_file_plans_no_shards(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")

    assert plan(path, "jsonl") == ([], [])


def test_csv_with_only_a_header_plans_no_shards(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_bytes(b"text,n")

    assert plan(path, "csv") == ([], [])


def write_parquet(path: Path, table: pa.Table, row_group_size: int) -> None:
    pq.write_table(table, path, row_group_size=row_group_size)


PARQUET_TABLE = pa.table({
    "text": [f"row {i}" for i in range(23)],
    "n": pa.array(range(23), pa.int64()),
    "score": [i / 4 for i in range(23)],
    "unused": ["x"] * 23,
})


@pytest.mark.parametrize("rows_per_shard", ROWS_PER_SHARD)
@pytest.mark.parametrize("row_group_size", [1, 5, 100])
def test_parquet_shards_cover_every_row_exactly_once(tmp_path: Path, rows_per_shard: int, row_group_size: int) -> None:
    path = tmp_path / "data.parquet"
    write_parquet(path, PARQUET_TABLE, row_group_size)

    shards, _ = plan(path, "parquet", rows_per_shard=rows_per_shard)
    table = read_all(path, "parquet", rows_per_shard=rows_per_shard, carry_columns=["n", "score"])

    assert_shards_tile(shards, PARQUET_TABLE.num_rows, rows_per_shard, 0, 0)
    assert table.column("source_row").to_pylist() == list(range(PARQUET_TABLE.num_rows))
    assert prompts(table) == [{"text": text} for text in PARQUET_TABLE.column("text").to_pylist()]
    assert table.column("n").to_pylist() == PARQUET_TABLE.column("n").to_pylist()
    assert "unused" not in table.column_names


def test_parquet_carry_columns_keep_their_types(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    write_parquet(path, PARQUET_TABLE, 10)

    table = read_all(path, "parquet", carry_columns=["n", "score", "text"])

    assert table.schema.field("n").type == pa.int64()
    assert table.schema.field("score").type == pa.float64()
    assert table.schema.field("text").type == pa.string()
    assert table.column("score").to_pylist()[:3] == [0.0, 0.25, 0.5]


def test_jsonl_carry_columns_keep_their_types_and_are_null_on_error_rows(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "a", "n": 1, "tags": ["x"], "mixed": 1}\n'
                     b"not json\n"
                     b'{"text": "c", "n": 3, "tags": [], "mixed": "three"}\n')

    table = read_all(path, "jsonl", carry_columns=["n", "tags", "mixed"])

    assert table.schema.field("n").type == pa.int64()
    assert table.column("n").to_pylist() == [1, None, 3]
    assert table.column("tags").to_pylist() == [["x"], None, []]
    assert table.column("mixed").to_pylist() == ["1", None, "three"]


def test_a_shard_too_large_for_one_ray_block_is_refused_naming_a_rows_per_shard_that_fits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray slices a block past its size target, and a sliced shard never commits whole: planning refuses it. The
    limit is 512 MiB; here it is lowered to 200 bytes, which 23 rows of about 30 bytes pass in one shard."""
    path = tmp_path / "data.jsonl"
    path.write_bytes(jsonl_bytes(RECORDS))
    monkeypatch.setattr(read, "MAX_SHARD_BYTES", 200)
    per_row = len(jsonl_bytes(RECORDS)) / len(RECORDS)

    with pytest.raises(SpecError) as raised:
        plan(path, "jsonl", rows_per_shard=64)

    fits = int(200 / per_row)
    assert str(raised.value).startswith(f"input file {path}: rows 0-22 make a shard of 0 MiB, over the 0 MiB a shard "
                                        "may hold (it travels as one Ray block). ")
    assert str(raised.value).endswith(f"Set input.rows_per_shard to {fits} or less (today 64).")
    shards, _ = plan(path, "jsonl", rows_per_shard=fits)
    assert sum(s.row_count for s in shards) == len(RECORDS) and max(s.input_bytes for s in shards) <= 200


def test_shard_ids_are_stable_across_plans_and_unique(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(jsonl_bytes(RECORDS))

    first, _ = plan(path, "jsonl", rows_per_shard=5)
    second, _ = plan(path, "jsonl", rows_per_shard=5)

    assert [s.shard_id for s in first] == [s.shard_id for s in second]
    assert len({s.shard_id for s in first}) == len(first)


def test_shard_ids_change_when_the_file_size_changes(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(jsonl_bytes(RECORDS))
    before, _ = plan(path, "jsonl", rows_per_shard=5)

    path.write_bytes(jsonl_bytes([{**RECORDS[0], "text": "changed, and longer"}, *RECORDS[1:]]))
    after, _ = plan(path, "jsonl", rows_per_shard=5)

    assert [(s.row_start, s.row_count) for s in before] == [(s.row_start, s.row_count) for s in after]
    assert not {s.shard_id for s in before} & {s.shard_id for s in after}


def test_shard_ids_change_with_rows_per_shard(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(jsonl_bytes(RECORDS))

    by_five, _ = plan(path, "jsonl", rows_per_shard=5)
    by_six, _ = plan(path, "jsonl", rows_per_shard=6)

    assert by_five[0].shard_id != by_six[0].shard_id


def test_row_ids_default_to_relative_path_and_row(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes(RECORDS[:2]))
    (tmp_path / "sub" / "b.jsonl").write_bytes(jsonl_bytes(RECORDS[:3]))

    table = read_all(tmp_path, "jsonl", rows_per_shard=2)

    assert table.column("id").to_pylist() == ["a.jsonl:0", "a.jsonl:1", "sub/b.jsonl:0", "sub/b.jsonl:1",
                                              "sub/b.jsonl:2"]


def test_row_ids_come_from_id_column_and_a_missing_id_is_an_error_row(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"key": "k-0", "text": "a"}\n'
                     b'{"text": "b"}\n'
                     b'{"key": null, "text": "c"}\n'
                     b'{"key": 17, "text": "d"}\n')

    table = read_all(path, "jsonl", id_column="key")

    assert table.column("id").to_pylist() == ["k-0", "data.jsonl:1", "data.jsonl:2", "17"]
    errors = errors_by_row(table)
    assert {row: error_type for row, (error_type, _) in errors.items()} == {1: "missing_id", 2: "missing_id"}
    assert f"{path} row 1: id column 'key' is missing or null" in errors[1][1]
    assert prompts(table) == [{"text": "a"}, None, None, {"text": "d"}]


def test_parquet_id_column_is_read_even_when_not_carried(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    write_parquet(path, PARQUET_TABLE, 7)

    table = read_all(path, "parquet", id_column="n", rows_per_shard=4)

    assert table.column("id").to_pylist() == [str(i) for i in range(23)]
    assert "n" not in table.column_names


def test_bad_jsonl_lines_become_error_rows_and_the_others_still_read(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "first"}\n'
                     b'{"text": broken\n'
                     b"\n"
                     b"[1, 2]\n"
                     b'{"text": "caf\xe9"}\n'
                     b'"just a string"\n'
                     b'{"text": "last"}')

    table = read_all(path, "jsonl", rows_per_shard=3)

    errors = errors_by_row(table)
    assert {row: error_type for row, (error_type, _) in errors.items()} == {
        1: "invalid_json", 2: "invalid_json", 3: "invalid_json", 4: "invalid_utf8", 5: "invalid_json",
    }
    assert f"{path} line 2: expected one JSON object per line, found invalid JSON" in errors[1][1]
    assert f"{path} line 3: expected one JSON object per line, found an empty line" in errors[2][1]
    assert f"{path} line 4: expected a JSON object, found list" in errors[3][1]
    assert f"{path} line 5 is not valid UTF-8" in errors[4][1]
    assert f"{path} line 6: expected a JSON object, found str" in errors[5][1]
    assert prompts(table) == [{"text": "first"}, None, None, None, None, None, {"text": "last"}]
    assert table.column("id").to_pylist() == [f"data.jsonl:{i}" for i in range(7)]


def test_missing_prompt_column_is_marked_for_the_prompt_stage(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"other": 1}\n{"text": null}\n')

    table = read_all(path, "jsonl")

    assert prompts(table) == [{"text": "a"}, {"text": {"$missing": "column"}}, {"text": None}]
    assert table.column("_error_type").null_count == 3


def test_file_changed_since_planning_fails_the_shard_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(jsonl_bytes(RECORDS[:4]))
    spec = InputSpec(path=str(path), format="jsonl", rows_per_shard=10)
    [shard] = plan_shards(spec, list_files(str(path)))[0]
    path.write_bytes(jsonl_bytes(RECORDS[:2]))

    with pytest.raises(RuntimeError, match="the file changed since the job was planned") as caught:
        read_shard(shard, ReadConfig.of(spec, ["text"]))
    assert str(path) in str(caught.value)


def test_file_changed_since_planning_with_skip_gives_bad_file_rows(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(jsonl_bytes(RECORDS[:4]))
    spec = InputSpec(path=str(path), format="jsonl", rows_per_shard=10, on_bad_file="skip")
    [shard] = plan_shards(spec, list_files(str(path)))[0]
    path.write_bytes(jsonl_bytes(RECORDS[:2]))

    table = read_shard(shard, ReadConfig.of(spec, ["text"]))

    assert table.column("_error_type").to_pylist() == ["bad_file"] * 4
    assert table.column("source_row").to_pylist() == [0, 1, 2, 3]


def corrupt_parquet_input(tmp_path: Path) -> tuple[Path, Path]:
    good = tmp_path / "a.parquet"
    write_parquet(good, PARQUET_TABLE, 10)
    bad = tmp_path / "b.parquet"
    bad.write_bytes(b"PAR1 this is not a parquet file")
    return good, bad


def test_corrupt_parquet_fails_planning_naming_the_file(tmp_path: Path) -> None:
    _, bad = corrupt_parquet_input(tmp_path)

    with pytest.raises(SpecError) as caught:
        plan(tmp_path, "parquet", on_bad_file="fail")

    message = str(caught.value)
    assert f"input file {bad} cannot be read as parquet" in message
    assert "on_bad_file: skip" in message


def test_corrupt_parquet_with_skip_is_listed_in_bad_files(tmp_path: Path) -> None:
    good, bad = corrupt_parquet_input(tmp_path)

    shards, bad_files = plan(tmp_path, "parquet", on_bad_file="skip", rows_per_shard=10)

    assert bad_files == [str(bad)]
    assert {s.file for s in shards} == {str(good)}
    assert sum(s.row_count for s in shards) == PARQUET_TABLE.num_rows


def test_a_repeated_id_within_a_shard_becomes_a_duplicate_id_error_row(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"key": "a", "q": "x"}\n{"key": "b", "q": "y"}\n{"key": "a", "q": "z"}\n')
    spec = InputSpec(path=str(path), format="jsonl", id_column="key")
    (shard,), _ = plan_shards(spec, list_files(str(path)))
    block = read_shard(shard, ReadConfig.of(spec, ["q"]))
    assert block.column("id").to_pylist() == ["a", "b", "a"]
    assert block.column("_error_type").to_pylist() == [None, None, "duplicate_id"]
    assert "id 'a' was already used by row 0" in block.column("_error")[2].as_py()


# Messy CSV: the planner and the reader follow Python's csv module, so no quote can make them disagree.

MESSY_CSV = (b'text,n\n'
             b'5" screen,1\n'  # a quote inside an unquoted field is literal
             b'"quoted, with comma",2\n'
             b'"closed"then literal ",3\n'  # characters after a closing quote are literal, quotes included
             b'a "b" c,4\n'
             b'"multi\nline ""quoted""",5\n'
             b'12" and 14",6\n'
             b',7\n'
             b'"",8\n'
             b'x""y,9\n')


@pytest.mark.parametrize("rows_per_shard", ROWS_PER_SHARD)
@pytest.mark.parametrize("scan_chunk_bytes", [1, 2, 5, 16 << 20])
def test_csv_stray_quotes_plan_and_read_as_the_csv_module_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows_per_shard: int, scan_chunk_bytes: int
) -> None:
    monkeypatch.setattr(read, "SCAN_CHUNK_BYTES", scan_chunk_bytes)
    path = tmp_path / "messy.csv"
    path.write_bytes(MESSY_CSV)
    expected = list(csv.reader(io.StringIO(MESSY_CSV.decode(), newline="")))[1:]

    shards, _ = plan(path, "csv", rows_per_shard=rows_per_shard)
    table = read_all(path, "csv", rows_per_shard=rows_per_shard, carry_columns=["n"])

    assert_shards_tile(shards, len(expected), rows_per_shard, len(b"text,n\n"), len(MESSY_CSV))
    assert table.column("_error_type").null_count == len(expected), errors_by_row(table)
    assert prompts(table) == [{"text": text} for text, _ in expected]
    assert table.column("n").to_pylist() == [n for _, n in expected]


def test_csv_field_over_128_kib_is_read(tmp_path: Path) -> None:
    path = tmp_path / "wide.csv"
    path.write_bytes(b"text,n\n" + b'"' + b"w" * (300 << 10) + b'",1\nshort,2\n')

    table = read_all(path, "csv", carry_columns=["n"])

    assert table.column("_error_type").to_pylist() == [None, None]
    assert prompts(table) == [{"text": "w" * (300 << 10)}, {"text": "short"}]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
@pytest.mark.parametrize("scan_chunk_bytes", [7, 16 << 20])
def test_a_row_over_the_row_byte_limit_is_an_error_row_and_never_held_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, scan_chunk_bytes: int
) -> None:
    monkeypatch.setattr(read, "MAX_ROW_BYTES", 64)
    monkeypatch.setattr(read, "SCAN_CHUNK_BYTES", scan_chunk_bytes)
    huge = "x" * 500
    lines = ([json.dumps({"text": t}) for t in ("before", huge, "after")] if fmt == "jsonl" else
             ["text", "before", f'"{huge}\n{huge}"', "after"])
    path = tmp_path / f"data.{fmt}"
    path.write_bytes("\n".join(lines).encode() + b"\n")
    records = list(read._records(plan(path, fmt)[0][0], ReadConfig.of(InputSpec(path=str(path), format=fmt), ["text"])))
    assert [len(r) if isinstance(r, bytes) else r for r in records][1] == len(lines[-2]) + 1
    assert all(len(r) <= 64 for r in records if isinstance(r, bytes))

    table = read_all(path, fmt)

    errors = errors_by_row(table)
    assert list(errors) == [1]
    where = f"{path} line 2" if fmt == "jsonl" else f"{path} record 2 (after the header)"
    assert errors[1] == ("row_too_large", f"{where} is {len(lines[-2]) + 1} bytes, over the 0 MiB one row may hold; "
                         "split or shorten it")
    assert [p["text"] for p in prompts(table) if p] == ["before", "after"]


@pytest.mark.parametrize(
    ("line", "found"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "found JSON nested too deeply to read; flatten it"),
        (b'{"text": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "found JSON nested too deeply to read; flatten it"),
        (b'{"text": "x", "n": ' + b"9" * 5000 + b"}", "found JSON Python cannot read (Exceeds the limit (4300 digits)"),
    ],
    ids=["deep-list", "deep-value", "huge-integer"],
)
def test_jsonl_lines_python_cannot_parse_are_invalid_json_rows(tmp_path: Path, line: bytes, found: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "ok"}\n' + line + b'\n{"text": "also ok"}\n')

    table = read_all(path, "jsonl")

    errors = errors_by_row(table)
    assert list(errors) == [1]
    assert errors[1][0] == "invalid_json"
    assert errors[1][1].startswith(f"{path} line 2: expected one JSON object per line, {found}")
    assert prompts(table)[2] == {"text": "also ok"}


def test_csv_carriage_return_outside_quotes_is_an_error_row(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_bytes(b"text,n\na,1\nb,2\rc,3\nd,4\n")

    table = read_all(path, "csv", carry_columns=["n"])

    errors = errors_by_row(table)
    assert list(errors) == [1] and errors[1][0] == "invalid_csv"
    assert "expected one record, found 2: a carriage return outside quotes ends a record" in errors[1][1]
    assert [p["text"] for p in prompts(table) if p] == ["a", "d"]


def test_corrupt_parquet_row_group_at_read_time_with_skip_gives_bad_file_rows(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    write_parquet(path, PARQUET_TABLE, 10)
    spec = InputSpec(path=str(path), format="parquet", rows_per_shard=10, on_bad_file="skip")
    shards, _ = plan_shards(spec, list_files(str(path)))
    data = bytearray(path.read_bytes())
    data[4:200] = b"\x00" * 196  # the first row groups' pages, not the footer
    path.write_bytes(bytes(data))

    table = read_shard(shards[0], ReadConfig.of(spec, ["text"]))

    assert table.column("_error_type").to_pylist() == ["bad_file"] * shards[0].row_count
    assert f"input file {path} could not be read: " in table.column("_error")[0].as_py()


def test_jsonl_columns_are_sampled_from_the_first_lines(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'not json\n{"rid": 1, "text": "a"}\n[1]\n{"rid": 2, "extra": true}\n')
    info = list_files(str(path))[0]

    schema = read.input_schema(InputSpec(path=str(path), format="jsonl"), info)
    assert schema == pa.schema([("rid", pa.int64()), ("text", pa.string()), ("extra", pa.bool_())])
    path.write_bytes(b"not json\n[1]\n")
    assert read.input_schema(InputSpec(path=str(path), format="jsonl"), list_files(str(path))[0]) is None


def test_an_unterminated_jsonl_string_is_reported_as_such(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "unterminated\n{"text": "ok"}\n')

    errors = errors_by_row(read_all(path, "jsonl"))

    assert errors[0][1] == f"{path} line 1: expected one JSON object per line, found invalid JSON (Unterminated string " \
                           "starting at at column 10)"


def carried(path: Path, fmt: str, **fields: Any) -> pa.Schema:
    spec = InputSpec(path=str(path), format=fmt, **fields)
    return read.carried_schema(spec, [read.input_schema(spec, info) for info in list_files(str(path))])


def test_carried_parquet_columns_take_one_type_over_all_files_and_keep_their_values_exactly(tmp_path: Path) -> None:
    """Decimals of different precision widen to one; nanosecond timestamps stay nanoseconds; a column that is all
    null in one file (Arrow's null type there) takes the other files' type."""
    (tmp_path / "in").mkdir()
    stamps = [1_700_000_000_123_456_789, 1_700_000_000_000_000_001]
    pq.write_table(pa.table({"text": ["a", "b"], "price": pa.array([decimal.Decimal("1.25"), None], pa.decimal128(5, 2)),
                             "seen": pa.array(stamps, pa.timestamp("ns")), "note": pa.nulls(2)}), tmp_path / "in/0.parquet")
    pq.write_table(pa.table({"text": ["c"], "price": pa.array([decimal.Decimal("12345.678")], pa.decimal128(9, 3)),
                             "seen": pa.array([None], pa.timestamp("ns")), "note": ["kept"]}), tmp_path / "in/1.parquet")
    fields = {"carry_columns": ["price", "seen", "note"]}

    schema = carried(tmp_path / "in", "parquet", **fields)
    table = read_all(tmp_path / "in", "parquet", **fields)

    assert schema == pa.schema([("price", pa.decimal128(9, 3)), ("seen", pa.timestamp("ns")), ("note", pa.string())])
    assert table.select(schema.names).schema == schema
    assert table.column("price").to_pylist() == [decimal.Decimal("1.250"), None, decimal.Decimal("12345.678")]
    assert table.column("seen").cast(pa.int64()).to_pylist() == [*stamps, None]
    assert table.column("note").to_pylist() == [None, None, "kept"]
    assert table.column("_error_type").to_pylist() == [None] * 3


def test_parquet_files_whose_column_types_have_nothing_in_common_need_a_declared_type(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"text": ["a"], "code": [7]}), tmp_path / "in/0.parquet")
    pq.write_table(pa.table({"text": ["b"], "code": ["x7"]}), tmp_path / "in/1.parquet")

    with pytest.raises(SpecError, match=r"column 'code' has types \['int64', 'string'\] in different Parquet files.*"
                                        r"input.schema: \{code: string\}"):
        carried(tmp_path / "in", "parquet", carry_columns=["code"])
    table = read_all(tmp_path / "in", "parquet", carry_columns=["code"], schema={"code": "string"})
    assert table.column("code").to_pylist() == ["7", "x7"]


def test_jsonl_types_come_from_the_first_lines_and_a_later_misfit_is_an_invalid_field_row(tmp_path: Path) -> None:
    """`n` is an integer in the sampled lines, so a text value after them is an error row naming the column and both
    types; `mixed` holds an int and a string there, so it is a string column; `empty` is only ever null there."""
    lines = [{"text": f"t{i}", "n": i, "mixed": 1 if i == 0 else "one", "empty": None, "score": i}
             for i in range(read.COLUMN_SAMPLE_ROWS)]
    lines += [{"text": "late", "n": "twelve", "mixed": {"a": 1}, "empty": 5, "score": 2.5},
              {"text": "fine", "n": 3.0, "mixed": None, "empty": "x", "score": 4}]
    path = tmp_path / "data.jsonl"
    path.write_bytes(jsonl_bytes(lines))
    fields = {"carry_columns": ["n", "mixed", "empty", "score"], "rows_per_shard": 64}

    table = read_all(path, "jsonl", **fields)

    assert carried(path, "jsonl", **fields) == pa.schema(
        [("n", pa.int64()), ("mixed", pa.string()), ("empty", pa.string()), ("score", pa.int64())])
    late, fine = table.slice(read.COLUMN_SAMPLE_ROWS).to_pylist()
    assert late["_error_type"] == "invalid_field" and late["_prompt"] is None
    assert late["_error"] == (f"{path} row 100: carried column 'n' expected int64 (its type in the job's output, fixed "
                              "when the job was planned), found str \"twelve\"; fix the value, or declare the "
                              "column's type in input.schema")
    assert (late["n"], late["mixed"], late["empty"], late["score"]) == (None, '{"a": 1}', "5", None)
    assert (fine["_error_type"], fine["n"], fine["empty"], fine["score"]) == (None, 3, "x", 4)
    assert table.column("mixed").to_pylist()[:2] == ["1", "one"]


def test_openai_batch_lines_carry_their_own_keys_typed_from_the_first_lines(tmp_path: Path) -> None:
    """A request line's keys besides body (custom_id, url, a key the user added) are its columns: `priority` is an
    integer in every sampled line, `tags` a list; a request the reader refuses is an error row with them null."""
    def request(i: int, **extra: Any) -> dict[str, Any]:
        return {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", **extra,
                "body": {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]}}

    lines = [request(0, priority=3, tags=["a"]), request(1, priority=7, tags=[]),
             {**request(2, priority=1, tags=["b"]), "method": "GET"}]
    path = tmp_path / "batch.jsonl"
    path.write_bytes(jsonl_bytes(lines))
    fields = {"carry_columns": ["priority", "tags", "url"]}

    table = read_all(path, "openai-batch", prompt_columns=("messages", "model"), **fields)

    assert carried(path, "openai-batch", **fields) == pa.schema(
        [("priority", pa.int64()), ("tags", pa.list_(pa.string())), ("url", pa.string())])
    assert table.schema.field("priority").type == pa.int64()
    assert table.column("id").to_pylist() == ["c0", "c1", "c2"]
    assert table.column("priority").to_pylist() == [3, 7, None]
    assert table.column("tags").to_pylist() == [["a"], [], None]
    assert table.column("url").to_pylist() == ["/v1/chat/completions"] * 2 + [None]
    assert table.column("_error_type").to_pylist() == [None, None, "invalid_request"]
    assert prompts(table)[0] == {"messages": [{"role": "user", "content": "q0"}], "model": "m"}


def test_declared_types_parse_csv_text_and_empty_fields_are_null(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("text,n,day,flag\na,12,2026-12-01,true\nb,,2026-12-02,false\nc,x,2026-13-01,true\n")

    table = read_all(path, "csv", carry_columns=["n", "day", "flag"],
                     schema={"n": "int64", "day": "date32", "flag": "bool"})

    assert table.select(["n", "day", "flag"]).schema == pa.schema(
        [("n", pa.int64()), ("day", pa.date32()), ("flag", pa.bool_())])
    assert table.column("n").to_pylist() == [12, None, None]
    assert [str(d) if d else None for d in table.column("day").to_pylist()] == ["2026-12-01", "2026-12-02", None]
    errors = errors_by_row(table)
    assert list(errors) == [2]
    assert errors[2][0] == "invalid_field" and "carried column 'n' expected int64" in errors[2][1]


def write_repeated_ids(folder: Path) -> Path:
    """Two JSONL files whose second repeats ids of the first (r4, r1) and of itself (r4, new), with a bad line."""
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(jsonl_bytes([{"rid": f"r{i}", "text": "x"} for i in range(6)]))
    (folder / "b.jsonl").write_bytes(jsonl_bytes(
        [{"rid": "r4", "text": "x"}, {"rid": "new", "text": "x"}, {"rid": "r1", "text": "x"}, {"rid": "r4", "text": "x"},
         "not json", {"rid": "new", "text": "x"}]))
    return folder


@pytest.mark.s3  # the session's Ray starts after the S3 server
@pytest.mark.parametrize(("rows_per_task", "rows_per_partition"), [(50_000, 1_000_000), (3, 4)],
                         ids=["one-partition", "tasks-of-two-shards-and-partitions-of-about-4-rows"])
def test_ids_repeated_across_shards_and_files_are_duplicate_id_rows_and_the_first_is_answered(
        tmp_path: Path, ray_local: None, monkeypatch: pytest.MonkeyPatch, rows_per_task: int,
        rows_per_partition: int) -> None:
    monkeypatch.setattr(read, "ID_CHECK_ROWS_PER_TASK", rows_per_task)
    monkeypatch.setattr(read, "ID_CHECK_ROWS_PER_PARTITION", rows_per_partition)
    spec = InputSpec(path=str(write_repeated_ids(tmp_path / "in")), format="jsonl", id_column="rid", rows_per_shard=2)
    config = ReadConfig.of(spec, ["text"])
    shards, _ = plan_shards(spec, list_files(spec.path))

    repeats = ray.get(read.start_repeated_ids(shards, config))

    assert set(repeats) <= {s.shard_id for s in shards}
    table = pa.concat_tables([read_shard(replace(shard, repeats=repeats.get(shard.shard_id, ())), config)
                              for shard in shards])
    rows = [(row["source_file"].rsplit("/", 1)[1], row["source_row"], row["_error_type"], row["_error"])
            for row in table.to_pylist()]
    errors = {(file, number): (kind, message) for file, number, kind, message in rows if kind}
    assert set(errors) == {("b.jsonl", 0), ("b.jsonl", 2), ("b.jsonl", 3), ("b.jsonl", 4), ("b.jsonl", 5)}
    assert errors["b.jsonl", 0] == ("duplicate_id", f"{tmp_path}/in/b.jsonl row 0: id 'r4' was already used by row "
                                    f"4 of {tmp_path}/in/a.jsonl, which is answered; make the ids in the id column "
                                    "unique")
    assert errors["b.jsonl", 2][1].startswith(f"{tmp_path}/in/b.jsonl row 2: id 'r1' was already used by row 1 of ")
    assert errors["b.jsonl", 3][0] == errors["b.jsonl", 5][0] == "duplicate_id"
    assert errors["b.jsonl", 4][0] == "invalid_json"
    assert [row for row in rows if row[:2] == ("b.jsonl", 1)][0][2] is None  # the first 'new' is answered


@pytest.mark.s3  # the session's Ray starts after the S3 server
def test_a_resume_takes_the_repeated_ids_from_the_job_record_instead_of_reading_every_shard_again(
        tmp_path: Path, ray_local: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from qwen_batch.jobs import driver
    from qwen_batch.schemas.spec import load_spec

    spec = load_spec({"name": "ids", "input": {"path": str(write_repeated_ids(tmp_path / "in")), "format": "jsonl",
                                "id_column": "rid", "rows_per_shard": 2, "unique_ids": True},
                      "prompt": {"template": "{text}"}, "model": {"variant": "tiny-qwen2"},
                      "output": {"path": str(tmp_path / "out")}})
    plan = driver.plan_job(spec)
    assert plan.repeats is None
    driver.claim_output(plan)
    check = driver._IdCheck(plan)
    check.wait()
    found = ray.get(check.repeats)
    assert sum(map(len, found.values())) == 4  # r4, r1 of a.jsonl; r4 and new again in b.jsonl
    record = json.loads((tmp_path / "out" / driver.JOB_FILE).read_text())
    assert record["repeated_ids"] == {shard: [list(repeat) for repeat in repeats] for shard, repeats in found.items()}

    def read_again(*_: Any) -> None:
        raise AssertionError("the resume read every shard again for the id check")

    monkeypatch.setattr(driver, "start_repeated_ids", read_again)
    again = driver.plan_job(spec)
    assert again.repeats == found
    assert ray.get(driver._IdCheck(again).repeats) == found
    # --overwrite starts over: the record is rewritten without them, and the next run checks again.
    assert driver.plan_job(spec, overwrite=True).repeats is None
