"""A corpus of bad input of every kind: what fails the job before any engine starts, what becomes an error row, what
skips a file, and that credentials and prompt text never reach logs or output files."""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from qwen_batch.jobs import driver
from qwen_batch.jobs.driver import OutputLease, claim_output, plan_job, prompt_columns, run_job
from qwen_batch.pipelines import read, storage
from qwen_batch.pipelines.read import ReadConfig, read_shard
from qwen_batch.pipelines.storage import RetryPolicy
from qwen_batch.schemas.catalog import get_variant
from qwen_batch.schemas.errors import SpecError
from qwen_batch.schemas.spec import load_spec

REPO = Path(__file__).resolve().parent.parent
SYSTEM = "Answer in one word."
TEMPLATE = "Q: {text}"
MAX_MODEL_LEN = 256
MAX_TOKENS = 4
# Our own S3 client options, never shared with another test's cached filesystem (fsspec caches filesystems by their
# options, not by the environment, so a dead endpoint or a wrong secret set in the environment would otherwise stick).
PRIVATE_S3_CLIENT = {"skip_instance_cache": True}
NO_BOTOCORE_RETRIES = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}


def spec_of(root: Path | str, **sections: Any) -> dict[str, Any]:
    """A valid spec over `root/input` (Parquet) writing to `root/output`, with the given sections' fields changed.

    It names a catalog variant that needs no local checkpoint, so planning it touches no model."""
    spec: dict[str, Any] = {
        "name": "bad-input",
        "input": {"path": f"{root}/input", "format": "parquet", "id_column": "rid"},
        "prompt": {"system": SYSTEM, "template": TEMPLATE},
        "model": {"variant": "qwen2.5-0.5b-instruct", "max_model_len": MAX_MODEL_LEN},
        "sampling": {"max_tokens": MAX_TOKENS, "temperature": 0},
        "output": {"path": f"{root}/output"},
    }
    for section, fields in sections.items():
        spec[section] = {**spec.get(section, {}), **fields} if isinstance(fields, dict) else fields
    return spec


def write_parquet(path: Path | str, rows: list[dict[str, Any]]) -> None:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    storage.write_bytes(str(path), sink.getvalue())


def planning_error(spec: dict[str, Any]) -> SpecError:
    """The SpecError that loading and planning the spec raises."""
    with pytest.raises(SpecError) as caught:
        plan_job(load_spec(spec))
    return caught.value


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def parquet_input(tmp_path: Path) -> Path:
    """Two good Parquet files with columns rid and text under tmp_path/input."""
    write_parquet(tmp_path / "input" / "a.parquet", [{"rid": "a0", "text": "hello"}, {"rid": "a1", "text": "bye"}])
    write_parquet(tmp_path / "input" / "b.parquet", [{"rid": "b0", "text": "again"}])
    return tmp_path


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> RetryPolicy:
    policy = RetryPolicy(attempts=2, first_delay_s=0.01, max_delay_s=0.01)
    monkeypatch.setattr(storage, "RETRY_POLICY", policy)
    return policy


# Spec-level problems: SpecError before any engine starts; no Ray needed.


def test_invalid_yaml_names_the_file_and_position(tmp_path: Path) -> None:
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text("name: x\ninput: {path: [unclosed\n")

    with pytest.raises(SpecError) as caught:
        load_spec(spec_file)

    message = str(caught.value)
    assert message.startswith(f"{spec_file} is not valid YAML or JSON")
    assert "line 2" in message


def test_unknown_field_names_its_path(parquet_input: Path) -> None:
    error = planning_error(spec_of(parquet_input, input={"formt": "parquet"}))

    assert error.problems == ["input.formt: unknown field; did you mean `format`? Else remove it or check its "
                              "spelling against the spec reference in README.md"]


def test_unknown_variant_suggests_close_names(parquet_input: Path) -> None:
    message = str(planning_error(spec_of(parquet_input, model={"variant": "qwen2.5-7b-instrct"})))

    assert message.startswith("model.variant: found 'qwen2.5-7b-instrct'; it is not in the catalog. Closest: "
                              "qwen2.5-7b-instruct")
    assert "`qwen-batch models` lists them all" in message


def test_missing_input_path_names_the_path(tmp_path: Path) -> None:
    message = str(planning_error(spec_of(tmp_path, input={"path": str(tmp_path / "nowhere")})))

    assert message == f"no input files at {tmp_path / 'nowhere'}: the path does not exist; check input.path"


def test_empty_input_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "_SUCCESS").write_bytes(b"")

    message = str(planning_error(spec_of(tmp_path)))

    assert message.startswith(f"no input files at {tmp_path / 'input'}: the folder is empty or holds only names "
                              "starting with _ or .")


def test_unknown_format_names_the_value_and_the_choices(parquet_input: Path) -> None:
    [problem] = planning_error(spec_of(parquet_input, input={"format": "xml"})).problems

    assert problem.startswith("input.format: found 'xml'; Input should be ")
    assert all(f"'{choice}'" in problem for choice in ("parquet", "jsonl", "csv"))


def test_template_column_missing_from_a_parquet_footer_names_the_file_and_column(parquet_input: Path) -> None:
    error = planning_error(spec_of(parquet_input, prompt={"template": "Say {body}"}))

    assert [p.split(" has ")[0] for p in error.problems] == [
        f"input file {parquet_input / 'input' / name}" for name in ("a.parquet", "b.parquet")
    ]
    assert all("has no column(s) ['body'] that the spec uses" in p and "it has ['rid', 'text']" in p
               for p in error.problems)


def test_template_column_missing_from_a_csv_header_names_the_file_and_column(tmp_path: Path) -> None:
    storage.write_bytes(str(tmp_path / "input" / "a.csv"), b"rid,text\nr1,hello\n")

    [problem] = planning_error(spec_of(tmp_path, input={"format": "csv"}, prompt={"template": "Say {body}"})).problems

    assert problem == (f"input file {tmp_path / 'input' / 'a.csv'} has no column(s) ['body'] that the spec uses "
                       "(prompt, route_column, input.id_column or input.carry_columns); it has ['rid', 'text']")


def test_template_column_missing_from_a_later_csv_file_is_refused_too(tmp_path: Path) -> None:
    storage.write_bytes(str(tmp_path / "input" / "a.csv"), b"rid,text\nr1,hello\n")
    storage.write_bytes(str(tmp_path / "input" / "b.csv"), b"rid,body\nr2,hello\n")

    message = str(planning_error(spec_of(tmp_path, input={"format": "csv"})))

    assert f"input file {tmp_path / 'input' / 'b.csv'} has no column(s) ['text']" in message


def test_id_column_missing_from_one_parquet_file_names_that_file(parquet_input: Path) -> None:
    write_parquet(parquet_input / "input" / "c.parquet", [{"key": "c0", "text": "no id here"}])

    [problem] = planning_error(spec_of(parquet_input)).problems

    assert problem.startswith(f"input file {parquet_input / 'input' / 'c.parquet'} has no column(s) ['rid']")
    assert problem.endswith("it has ['key', 'text']")


@pytest.mark.parametrize(
    ("sampling", "expected"),
    [
        ({"max_tokens": 0}, "sampling.max_tokens: found 0; Input should be greater than 0"),
        ({"max_tokens": -3}, "sampling.max_tokens: found -3; Input should be greater than 0"),
        ({"temperature": -0.5}, "sampling.temperature: found -0.5; Input should be greater than or equal to 0"),
        ({"top_p": 0}, "sampling.top_p: found 0; Input should be greater than 0"),
        ({"top_p": 1.5}, "sampling.top_p: found 1.5; Input should be less than or equal to 1"),
    ],
)
def test_out_of_range_sampling_names_field_value_and_bound(parquet_input: Path, sampling: dict, expected: str) -> None:
    assert planning_error(spec_of(parquet_input, sampling=sampling)).problems == [expected]


def test_max_tokens_that_leaves_no_room_for_the_prompt_is_refused(parquet_input: Path) -> None:
    [problem] = planning_error(spec_of(parquet_input, sampling={"max_tokens": MAX_MODEL_LEN})).problems

    assert problem == (f"sampling.max_tokens: found {MAX_MODEL_LEN}; it must be below model max_model_len "
                       f"{MAX_MODEL_LEN} to leave room for the prompt")


def test_planning_writes_nothing_to_the_output(parquet_input: Path) -> None:
    plan_job(load_spec(spec_of(parquet_input)))
    assert not (parquet_input / "output").exists()


def test_output_holding_another_jobs_data_is_refused(parquet_input: Path) -> None:
    first = plan_job(load_spec(spec_of(parquet_input)))
    claim_output(first)  # what a run does before its first shard
    assert plan_job(load_spec(spec_of(parquet_input))).job_id == first.job_id  # the same spec may resume

    message = str(planning_error(spec_of(parquet_input, sampling={"max_tokens": MAX_TOKENS + 1})))

    assert message.startswith(f"output.path {parquet_input / 'output'} holds job {first.job_id!r}, not 'bad-input-")
    assert "--overwrite" in message


@pytest.mark.parametrize(("fields", "expected"), [
    ({"carry_columns": ["text"], "schema": {"rid": "int64"}},
     "input.schema: found an object with fields ['rid']; column 'rid' is not in input.carry_columns ['text']; the "
     "schema types the carried columns"),
    ({"carry_columns": ["text"], "schema": {"text": "integer"}},
     "input.schema: found an object with fields ['text']; column 'text': 'integer' is not an Arrow type name; use "
     "one such as int64"),
    ({"id_column": None, "unique_ids": True}, "input.unique_ids: found True; it needs input.id_column"),
])
def test_bad_carried_types_and_id_checks_name_the_field(parquet_input: Path, fields: dict, expected: str) -> None:
    assert expected in str(planning_error(spec_of(parquet_input, input=fields)))


def test_parquet_files_disagreeing_on_a_carried_columns_type_are_refused_at_planning(parquet_input: Path) -> None:
    write_parquet(parquet_input / "input" / "c.parquet", [{"rid": "c0", "text": "x", "size": 3}])
    write_parquet(parquet_input / "input" / "d.parquet", [{"rid": "d0", "text": "y", "size": "large"}])

    message = str(planning_error(spec_of(parquet_input, input={"carry_columns": ["size"]})))

    assert "column 'size' has types ['int64', 'string'] in different Parquet files" in message
    assert "input.schema: {size: string}" in message


def test_a_resume_writes_the_carried_types_its_job_record_keeps(tmp_path: Path) -> None:
    """The job record fixes the types; a later plan of the same job takes them from there, not from the input again."""
    storage.write_bytes(str(tmp_path / "input" / "a.jsonl"), b'{"rid": "a0", "text": "x", "n": 1}\n')
    spec = spec_of(tmp_path, input={"format": "jsonl", "carry_columns": ["n"]})
    first = plan_job(load_spec(spec))
    assert first.carried == pa.schema([("n", pa.int64())])
    claim_output(first)
    record_file = tmp_path / "output" / driver.JOB_FILE
    record = json.loads(record_file.read_text())
    assert driver._schema_of(record["carried_schema"]) == first.carried
    record["carried_schema"] = driver._schema_text(pa.schema([("n", pa.float64())]))  # as an earlier run fixed it
    record_file.write_text(json.dumps(record))

    assert plan_job(load_spec(spec)).carried == pa.schema([("n", pa.float64())])
    assert plan_job(load_spec(spec), overwrite=True).carried == first.carried


def test_output_holding_foreign_files_is_refused(parquet_input: Path) -> None:
    storage.write_bytes(str(parquet_input / "output" / "report.csv"), b"someone else's")

    message = str(planning_error(spec_of(parquet_input)))

    assert message == (f"output.path {parquet_input / 'output'} already holds 1 file(s) that no qwen-batch job "
                       "wrote; pick an empty folder, or rerun with --overwrite to delete them")
    assert not (parquet_input / "output" / "_job.json").exists()


def test_unreachable_storage_names_the_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_retries: RetryPolicy
) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "unused-key",
                        "AWS_SECRET_ACCESS_KEY": "unused-secret-5a1d", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    options = {**NO_BOTOCORE_RETRIES, **PRIVATE_S3_CLIENT}

    message = str(planning_error(spec_of(tmp_path, input={"path": "s3://nowhere/input", "storage_options": options})))

    assert message.startswith(f"cannot reach the storage endpoint {endpoint} for s3://nowhere/input")
    assert f"after {fast_retries.attempts} attempts; check AWS_ENDPOINT_URL" in message
    assert "unused-secret-5a1d" not in message


@pytest.mark.s3
@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("given_in", ["environment", "storage_options"])
def test_rejected_credentials_are_named_without_the_secret(
    side: str, given_in: str, s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = f"s3://{s3.bucket}/bad-credentials-{uuid.uuid4().hex[:8]}"
    write_parquet(f"{root}/input/a.parquet", [{"rid": "a0", "text": "hello"}])
    wrong = "wrong-secret-3f9e"
    if given_in == "environment":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
        options = dict(PRIVATE_S3_CLIENT)
    else:
        options = {"key": s3.access_key, "secret": wrong}
    where = root if side == "input" else str(tmp_path)
    spec = spec_of(root, input={"path": f"{where}/input", "storage_options": options if side == "input" else {}},
                   output={"path": f"{root}/output", "storage_options": options if side == "output" else {}})
    if side == "output":
        write_parquet(tmp_path / "input" / "a.parquet", [{"rid": "a0", "text": "hello"}])

    message = str(planning_error(spec))

    assert message.startswith(f"access to {root}/{side} was refused (")
    assert "the credentials were rejected; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in message
    assert wrong not in message and s3.secret_key not in message
    assert wrong not in caplog.text and s3.secret_key not in caplog.text


@pytest.mark.parametrize(
    ("spec_text", "expected"),
    [
        ("name: x\ninput: {path: [unclosed\n", "is not valid YAML or JSON"),
        (None, "input.formt: unknown field"),
    ],
    ids=["invalid-yaml", "unknown-field"],
)
def test_cli_validate_exits_2_with_the_problem_on_stderr(
    parquet_input: Path, spec_text: str | None, expected: str
) -> None:
    spec_file = parquet_input / "job.yaml"
    spec_file.write_text(spec_text or yaml.safe_dump(spec_of(parquet_input, input={"formt": "parquet"})))

    done = subprocess.run([sys.executable, "-m", "qwen_batch.jobs.cli", "validate", str(spec_file)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)

    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("qwen-batch validate: the job cannot start:\n")
    assert expected in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


# Templates are data, not code.


@pytest.mark.parametrize("template", ["{text.__class__}", "{0}", "{text[0]}", "{text!r}", "{text:>99}", "{}"])
def test_template_that_is_not_plain_substitution_is_refused_at_load(template: str, tmp_path: Path) -> None:
    with pytest.raises(SpecError) as caught:
        load_spec(spec_of(tmp_path, prompt={"template": template}))

    [problem] = caught.value.problems
    assert problem.startswith(f"prompt.template: found {template!r}; template placeholder ")
    assert "plain" in problem


# File-level problems.


def corrupt_parquet_input(root: Path) -> str:
    """Two good Parquet files and, between them, one whose footer is garbage; the bad file. (A job that skips such a
    file and runs the others is test_job's Parquet case.)"""
    write_parquet(root / "input" / "a.parquet", [{"rid": f"a{i}", "text": f"fine row {i}"} for i in range(3)])
    bad = root / "input" / "b.parquet"
    bad.write_bytes(b"PAR1 not a parquet file at all PAR1")
    write_parquet(root / "input" / "c.parquet", [{"rid": "c0", "text": "last fine row"}])
    return str(bad)


def test_corrupt_parquet_with_on_bad_file_fail_is_refused_naming_it(tmp_path: Path) -> None:
    bad = corrupt_parquet_input(tmp_path)

    message = str(planning_error(spec_of(tmp_path, input={"on_bad_file": "fail"})))

    assert message.startswith(f"input file {bad} cannot be read as parquet")
    assert "input.on_bad_file: skip" in message


# Row-level problems: one end-to-end job over a JSONL file holding every kind of bad row.

LONG_TEXT = " ".join(f"word{i}" for i in range(300))

# (case, the line as bytes, error_type or None for a good row, fragments of the error message). In fragments,
# <file> stands for the input file's path, <line> for the 1-based line number and <row> for the 0-based row.
ROW_CASES: list[tuple[str, bytes, str | None, list[str]]] = [
    ("good-plain", b'{"rid": "g1", "text": "what is two plus two"}', None, []),
    ("empty-value", b'{"rid": "e1", "text": ""}', "empty_prompt", ["column 'text' is empty or whitespace only"]),
    ("whitespace-value", b'{"rid": "e2", "text": "  \\t \\n "}', "empty_prompt",
     ["column 'text' is empty or whitespace only"]),
    ("null-value", b'{"rid": "n1", "text": null}', "invalid_field",
     ["column 'text' used by the template must be a string, found null"]),
    ("number-value", b'{"rid": "n2", "text": 42}', "invalid_field",
     ["column 'text' used by the template must be a string, found int"]),
    ("good-literal-placeholder", b'{"rid": "g2", "text": "say {other} and {0} and {text.__class__}"}', None, []),
    ("missing-column", b'{"rid": "m1", "title": "no text column"}', "invalid_field",
     ["column 'text' used by the template must be a string, found no such column in this row"]),
    ("malformed-json", b'{"rid": "j1", "text": "unterminated', "invalid_json",
     ["<file> line <line>: expected one JSON object per line, found invalid JSON (Unterminated string"]),
    ("empty-line", b"", "invalid_json", ["<file> line <line>: expected one JSON object per line, found an empty line"]),
    ("good-literal-braces", b'{"rid": "g3", "text": "keep {{ and }} and {"}', None, []),
    ("json-list", b'["rid", "text"]', "invalid_json", ["<file> line <line>: expected a JSON object, found list"]),
    ("invalid-utf8", b'{"rid": "u1", "text": "caf\xe9 au lait"}', "invalid_utf8",
     ["<file> line <line> is not valid UTF-8 (invalid continuation byte at byte ", "re-encode the file as UTF-8"]),
    ("prompt-too-long", json.dumps({"rid": "l1", "text": LONG_TEXT}).encode(), "prompt_too_long",
     [f"with max_tokens {MAX_TOKENS}", f"over max_model_len {MAX_MODEL_LEN}", "raise model.max_model_len"]),
    ("null-id", b'{"rid": null, "text": "who am i"}', "missing_id",
     ["<file> row <row>: id column 'rid' is missing or null"]),
    ("absent-id", b'{"text": "no id at all"}', "missing_id", ["<file> row <row>: id column 'rid' is missing or null"]),
    ("good-unicode", '{"rid": "g4", "text": "naïve café ☕ 日本"}'.encode(), None, []),
    ("good-path-like-id", b'{"rid": "../../escape", "text": "where does my id go"}', None, []),
    ("deeply-nested", b'{"rid": "d1", "text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "invalid_json",
     ["<file> line <line>: expected one JSON object per line, found JSON nested too deeply to read"]),
    ("huge-integer", b'{"rid": "h1", "text": "x", "n": ' + b"7" * 5000 + b"}", "invalid_json",
     ["<file> line <line>: expected one JSON object per line, found JSON Python cannot read (Exceeds the limit"]),
]
BAD_CASES = [case for case, _, error_type, _ in ROW_CASES if error_type is not None]


@functools.cache
def tokenizer_of(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def prompt_tokens_of(model_dir: Path, messages: list[dict[str, str]]) -> int:
    """An independent count: the chat template rendered and tokenized with the model's own tokenizer."""
    tokenizer = tokenizer_of(model_dir)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def template_prompt_tokens(model_dir: Path, text: str) -> int:
    """Tokens of SYSTEM + TEMPLATE with `text` put in literally (no str.format on the text)."""
    user = TEMPLATE.replace("{text}", text)
    return prompt_tokens_of(model_dir, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}])


def check_error_row(row: dict[str, Any], error_type: str, fragments: list[str]) -> None:
    """An error row: its type, every fragment of its message, no answer, zero tokens and cost."""
    assert row["error_type"] == error_type, row["error"]
    for fragment in fragments:
        assert fragment in row["error"], (fragment, row["error"])
    assert row["finish_reason"] == "error" and row["generated_text"] is None
    assert row["prompt_tokens"] == row["completion_tokens"] == row["total_tokens"] == row["cached_tokens"] == 0
    assert row["input_cost_usd"] == row["output_cost_usd"] == row["cost_usd"] == 0.0


def check_manifest_matches_parquet(manifest: dict[str, Any], table: pa.Table) -> None:
    rows = table.to_pylist()
    errors = Counter(r["error_type"] for r in rows if r["error_type"] is not None)
    assert manifest["rows_in"] == len(rows) == manifest["rows_ok"] + manifest["rows_failed"]
    assert manifest["rows_failed"] == sum(errors.values())
    assert manifest["totals"]["errors_by_type"] == dict(errors)
    assert manifest["totals"]["finish_reasons"] == dict(Counter(r["finish_reason"] for r in rows))
    assert manifest["totals"]["prompt_tokens"] == sum(r["prompt_tokens"] for r in rows)
    assert manifest["totals"]["completion_tokens"] == sum(r["completion_tokens"] for r in rows)
    assert manifest["complete"]


@pytest.fixture(scope="module")
def row_job(tmp_path_factory: pytest.TempPathFactory, ray_local, tiny_models: dict[str, Path]) -> dict[str, Any]:
    """The JSONL job over ROW_CASES, run once: the input file, the output rows by line, the manifest."""
    root = tmp_path_factory.mktemp("rows")
    source = root / "input" / "rows.jsonl"
    source.parent.mkdir()
    source.write_bytes(b"".join(line + b"\n" for _, line, _, _ in ROW_CASES))
    spec = spec_of(root, input={"format": "jsonl", "rows_per_shard": 4}, model={"variant": "tiny-qwen2"})
    manifest = run_job(load_spec(spec))
    table = pq.read_table(root / "output")
    return {"file": str(source), "table": table, "manifest": manifest.model_dump(mode="json"),
            "rows": {row["source_row"]: row for row in table.to_pylist()}, "model_dir": tiny_models["qwen2"]}


@pytest.mark.engine
def test_every_input_line_becomes_exactly_one_output_row(row_job: dict[str, Any]) -> None:
    table = row_job["table"]
    assert table.num_rows == len(ROW_CASES)
    assert sorted(row_job["rows"]) == list(range(len(ROW_CASES)))
    assert len(set(table.column("id").to_pylist())) == len(ROW_CASES)
    assert set(table.column("source_file").to_pylist()) == {row_job["file"]}
    assert row_job["manifest"]["shards"] == -(-len(ROW_CASES) // 4)


@pytest.mark.engine
@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_row_is_an_error_row_saying_what_and_where(row_job: dict[str, Any], case: str) -> None:
    index = next(i for i, (name, _, _, _) in enumerate(ROW_CASES) if name == case)
    _, _, error_type, fragments = ROW_CASES[index]
    where = {"<file>": row_job["file"], "<line>": str(index + 1), "<row>": str(index)}
    expected = [functools.reduce(lambda text, pair: text.replace(*pair), where.items(), f) for f in fragments]
    row = row_job["rows"][index]

    check_error_row(row, error_type, expected)
    if error_type in ("invalid_json", "invalid_utf8", "missing_id"):
        assert row["id"] == f"rows.jsonl:{index}"  # no usable id: the row's position names it


@pytest.mark.engine
def test_prompt_too_long_states_the_numbers(row_job: dict[str, Any]) -> None:
    index = next(i for i, (name, _, _, _) in enumerate(ROW_CASES) if name == "prompt-too-long")
    tokens = template_prompt_tokens(row_job["model_dir"], LONG_TEXT)
    assert tokens + MAX_TOKENS > MAX_MODEL_LEN

    assert row_job["rows"][index]["error"].startswith(
        f"prompt is {tokens} tokens; with max_tokens {MAX_TOKENS} that is {tokens + MAX_TOKENS}, over max_model_len "
        f"{MAX_MODEL_LEN} by {tokens + MAX_TOKENS - MAX_MODEL_LEN}."
    )


@pytest.mark.engine
def test_good_rows_are_answered_and_braces_in_values_are_literal(row_job: dict[str, Any]) -> None:
    variant = get_variant("tiny-qwen2")
    good = [(i, json.loads(line)) for i, (_, line, error_type, _) in enumerate(ROW_CASES) if error_type is None]
    for index, record in good:
        row = row_job["rows"][index]
        assert row["error_type"] is None and row["error"] is None, row["error"]
        assert row["id"] == record["rid"]
        assert row["finish_reason"] in ("length", "stop") and 0 < row["completion_tokens"] <= MAX_TOKENS
        assert row["generated_text"] is not None
        assert row["prompt_tokens"] == template_prompt_tokens(row_job["model_dir"], record["text"])
        assert row["cost_usd"] == pytest.approx(
            (row["prompt_tokens"] * variant.input_per_mtok + row["completion_tokens"] * variant.output_per_mtok) / 1e6)


@pytest.mark.engine
def test_manifest_counts_equal_the_parquet(row_job: dict[str, Any]) -> None:
    manifest = row_job["manifest"]
    check_manifest_matches_parquet(manifest, row_job["table"])
    assert manifest["totals"]["errors_by_type"] == dict(Counter(t for _, _, t, _ in ROW_CASES if t is not None))
    assert manifest["rows_ok"] == sum(t is None for _, _, t, _ in ROW_CASES)


# Chats from a messages column, read from S3 with credentials in the environment and in storage_options: the bad
# chats become error rows, and no credential, prompt or answer reaches the logs or any output file.

DISTINCTIVE = "zebra-quartz-7731"
MESSAGE_CASES: list[tuple[str, Any, str | None, str]] = [
    ("good-one-turn", [{"role": "user", "content": f"{DISTINCTIVE} tell me a story"}], None, ""),
    ("good-multi-turn", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Count to 3"}],
     None, ""),
    ("not-a-list", "just a string", "invalid_messages",
     "column 'messages' must be a non-empty list of {role, content} messages, found str"),
    ("null", None, "invalid_messages", "column 'messages' must be a non-empty list of {role, content} messages, "
     "found null"),
    ("empty-list", [], "invalid_messages", "column 'messages' must be a non-empty list"),
    ("message-not-object", ["hello"], "invalid_messages",
     "column 'messages' message 0 must be an object with `role` and `content`, found str"),
    ("wrong-role", [{"role": "robot", "content": "beep"}], "invalid_messages",
     "column 'messages' message 0 has role 'robot'; expected one of ('system', 'developer', 'user', 'assistant')"),
    ("missing-content", [{"role": "system", "content": "x"}, {"role": "user"}], "invalid_messages",
     "column 'messages' message 1 content must be a string"),
    ("last-from-assistant", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
     "invalid_messages", "column 'messages': the last message must be from the user, found 'assistant'"),
    ("blank-user", [{"role": "user", "content": "   "}], "empty_prompt",
     "column 'messages': every user message is empty or whitespace only"),
]


def read_everything(prefix: str) -> dict[str, bytes]:
    """Every object under a prefix, as bytes, by URL."""
    return {url: storage.read_bytes(url) for url in storage.list_names(prefix)}


@pytest.mark.engine
@pytest.mark.s3
def test_s3_chat_job_records_bad_chats_and_leaks_no_secret_or_text(
    s3, ray_local, tiny_models: dict[str, Path], caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str], tmp_path_factory: pytest.TempPathFactory,
) -> None:
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == s3.secret_key  # the environment holds the credentials too
    root = f"s3://{s3.bucket}/chats-{uuid.uuid4().hex[:8]}"
    lines = [json.dumps({"rid": f"c{i:02d}", "messages": chat}) for i, (_, chat, _, _) in enumerate(MESSAGE_CASES)]
    storage.write_bytes(f"{root}/input/chats.jsonl", "".join(line + "\n" for line in lines).encode())
    credentials = {"key": s3.access_key, "secret": s3.secret_key}
    spec = spec_of(root, prompt={"system": None, "template": None, "messages_column": "messages"},
                   input={"format": "jsonl", "rows_per_shard": 4, "storage_options": credentials},
                   output={"storage_options": credentials}, model={"variant": "tiny-qwen2"})
    caplog.set_level(logging.DEBUG)

    from qwen_batch.cluster.local import job_log_file

    run_job(load_spec(spec))
    out, err = capfd.readouterr()

    files = read_everything(f"{root}/output")
    table = pa.concat_tables(pq.read_table(io.BytesIO(data)) for url, data in sorted(files.items())
                             if url.endswith(".parquet"))
    manifest = json.loads(files[f"{root}/output/_manifest.json"])
    check_chat_rows(table, manifest, tiny_models["qwen2"])
    # Worker output (the engine actor's lines among it) goes to the run's log file, not the terminal. The file also
    # holds this process's log records at the test's DEBUG level, botocore's request signing among them: those are
    # held to the caplog rules (the secret nowhere), the rest to the output rules.
    run_log = job_log_file(manifest["job_id"], manifest["runs"][-1]["run_id"]).read_text(errors="replace")
    assert s3.secret_key not in run_log
    debug_line = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ DEBUG ")
    worker_lines = "\n".join(line for line in run_log.splitlines() if not debug_line.match(line))
    check_nothing_leaked(s3, files, manifest, caplog, out + err + worker_lines, table)
    check_ray_logs_hold_no_secret_or_text(s3, tmp_path_factory.getbasetemp())


def check_chat_rows(table: pa.Table, manifest: dict[str, Any], model_dir: Path) -> None:
    rows = {row["id"]: row for row in table.to_pylist()}
    assert table.num_rows == len(rows) == len(MESSAGE_CASES)
    for index, (case, chat, error_type, fragment) in enumerate(MESSAGE_CASES):
        row = rows[f"c{index:02d}"]
        assert row["source_row"] == index, case
        if error_type is None:
            assert row["error_type"] is None, (case, row["error"])
            assert row["prompt_tokens"] == prompt_tokens_of(model_dir, chat), case
            assert row["finish_reason"] in ("length", "stop") and 0 < row["completion_tokens"] <= MAX_TOKENS
        else:
            check_error_row(row, error_type, [fragment])
    check_manifest_matches_parquet(manifest, table)


def check_nothing_leaked(s3, files: dict[str, bytes], manifest: dict[str, Any], caplog: pytest.LogCaptureFixture,
                         output: str, table: pa.Table) -> None:
    """The secret nowhere; the access key nowhere but botocore's DEBUG request signing; no text at INFO or above."""
    names = {url.rsplit("/output/", 1)[1].split("/")[0] for url in files}
    assert {"_job.json", "_manifest.json", "_commits", "_runs", "tiny-qwen2"} <= names
    for url, data in files.items():
        assert s3.secret_key.encode() not in data, url
        assert s3.access_key.encode() not in data, url
    assert manifest["spec"]["input"]["storage_options"] == {"key": "***", "secret": "***"}
    assert manifest["spec"]["output"]["storage_options"] == {"key": "***", "secret": "***"}

    assert caplog.records, "nothing was logged"
    assert "MapBatches(EngineStage)" in output, "no engine worker output was forwarded to the driver"
    debug_text = "\n".join(record.getMessage() + (record.exc_text or "") for record in caplog.records)
    assert s3.secret_key not in debug_text and s3.secret_key not in output
    info_text = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    assert s3.access_key not in info_text and s3.access_key not in output
    answers = [t for t in table.column("generated_text").to_pylist()
               if t and len(t.strip()) >= 8 and any(c.isalnum() for c in t)]
    for text in [DISTINCTIVE, "tell me a story", *answers]:
        assert text not in info_text and text not in output, text


def check_ray_logs_hold_no_secret_or_text(s3, base_temp: Path) -> None:
    """Every file every Ray process of the session logged to (workers, raylet, Ray Data): no secret, no prompt."""
    logged = [path for path in base_temp.glob("ray*/session_2*/logs/**/*") if path.is_file()]
    assert any(path.name.startswith("worker-") for path in logged), "no Ray worker log files found"
    for path in logged:
        data = path.read_bytes()
        assert s3.secret_key.encode() not in data, path
        assert DISTINCTIVE.encode() not in data, path


@pytest.mark.engine
def test_ids_never_reach_file_names(row_job: dict[str, Any]) -> None:
    """A row id like `../../escape` is data: output files are named by shard ids, never by row ids."""
    root = Path(row_job["file"]).parent.parent
    assert "../../escape" in row_job["table"].column("id").to_pylist()
    names = sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())
    assert all(name.startswith(("input/", "output/")) for name in names), names
    assert not any("escape" in name for name in names), names
    assert not list(root.parent.glob("escape*"))


# The output folder: never the input, never a store's root, and --overwrite deletes last and only inside it.


@pytest.mark.parametrize(
    ("output", "why"),
    [
        ("<root>/input", "which is or holds input.path"),
        ("<root>/input/", "which is or holds input.path"),
        ("file://<root>/input", "which is or holds input.path"),
        ("<root>//input/.", "which is or holds input.path"),
        ("<root>", "which is or holds input.path"),
        ("<root>/input/out", "which lies inside input.path"),
        ("<root>/input/a/../out", "which lies inside input.path"),
        ("input", "which is or holds input.path"),
        ("./input/out/", "which lies inside input.path"),
    ],
)
def test_output_that_is_holds_or_lies_inside_the_input_is_refused(
    parquet_input: Path, monkeypatch: pytest.MonkeyPatch, output: str, why: str
) -> None:
    monkeypatch.chdir(parquet_input)
    path = output.replace("<root>", str(parquet_input))

    error = planning_error(spec_of(parquet_input, output={"path": path}))

    assert error.problems == [f"output.path: found {path!r}, {why} {str(parquet_input / 'input')!r}: "
                              + error.problems[0].split(": ", 2)[2]]
    assert "write to a folder outside the input" in error.problems[0]


def test_output_beside_a_glob_input_inside_its_folder_is_refused(parquet_input: Path) -> None:
    spec = spec_of(parquet_input, input={"path": f"{parquet_input}/input/*.parquet"},
                   output={"path": f"{parquet_input}/input/results"})

    [problem] = planning_error(spec).problems

    assert problem.startswith(f"output.path: found '{parquet_input}/input/results', which lies inside input.path")


def test_output_next_to_the_input_is_accepted(parquet_input: Path) -> None:
    plan = plan_job(load_spec(spec_of(parquet_input, output={"path": f"{parquet_input}/input-results"})))
    assert plan.layout.output == f"{parquet_input}/input-results"


@pytest.mark.parametrize("output", ["/", "file:///", "/tmp/..", "s3://some-bucket", "s3://some-bucket/"])
def test_output_at_a_store_root_is_refused(parquet_input: Path, output: str) -> None:
    [problem] = planning_error(spec_of(parquet_input, output={"path": output})).problems

    assert problem.startswith(f"output.path: found {output!r}, the root of ")
    assert "give a folder of its own for the job's output" in problem


@pytest.mark.parametrize("output", ["", "   "])
def test_empty_output_path_is_refused_at_load(parquet_input: Path, output: str) -> None:
    [problem] = planning_error(spec_of(parquet_input, output={"path": output})).problems

    assert problem.startswith(f"output.path: found {output!r}; String should match pattern")


@pytest.mark.s3
@pytest.mark.parametrize("output", ["s3://<bucket>/<run>/input", "s3a://<bucket>/<run>//input/", "s3://<bucket>/<run>"])
def test_s3_output_that_holds_the_input_is_refused(s3, output: str) -> None:
    run = f"overlap-{uuid.uuid4().hex[:8]}"
    write_parquet(f"s3://{s3.bucket}/{run}/input/a.parquet", [{"rid": "a0", "text": "hello"}])
    path = output.replace("<bucket>", s3.bucket).replace("<run>", run)

    [problem] = planning_error(spec_of(f"s3://{s3.bucket}/{run}", output={"path": path})).problems

    assert problem.startswith(f"output.path: found {path!r}, which is or holds input.path")


def earlier_job_output(root: Path) -> list[str]:
    """An output folder written by an earlier job of another spec, and a sibling folder that is none of ours."""
    first = plan_job(load_spec(spec_of(root, sampling={"max_tokens": MAX_TOKENS + 1})))
    claim_output(first)
    storage.write_bytes(str(root / "output" / "_commits" / "bad-input" / "x.json"), b"{}")
    storage.write_bytes(str(root / "output-sibling" / "keep.txt"), b"not ours")
    storage.write_bytes(str(root / "outputx"), b"not ours either")
    return sorted(storage.list_names(str(root)))


@pytest.mark.parametrize(
    "breaks",
    [
        {"prompt": {"template": "Say {missing_column}"}},
        {"input": {"on_bad_file": "fail"}, "corrupt": True},
        {"model": {"max_model_len": 100_000_000}},
        {"lease": True},
    ],
    ids=["missing-column", "corrupt-file", "bad-max-model-len", "held-by-another-run"],
)
def test_overwrite_deletes_nothing_when_anything_refuses(parquet_input: Path, breaks: dict[str, Any]) -> None:
    before = earlier_job_output(parquet_input)
    if breaks.pop("corrupt", False):
        (parquet_input / "input" / "c.parquet").write_bytes(b"PAR1 garbage PAR1")
    holder = None
    if breaks.pop("lease", False):
        holder = OutputLease(plan_job(load_spec(spec_of(parquet_input)), overwrite=True), "other-run")
        holder.acquire()
    spec = load_spec(spec_of(parquet_input, **breaks))

    with pytest.raises(SpecError):
        run_job(spec, overwrite=True)

    after = sorted(storage.list_names(str(parquet_input)))
    kept = [url for url in after if "/input/" not in url and "/_lease/" not in url]
    assert kept == [url for url in before if "/input/" not in url]
    if holder is not None:
        holder.release()


def test_overwrite_deletes_only_inside_the_output_folder_and_only_when_the_run_claims_it(parquet_input: Path) -> None:
    before = earlier_job_output(parquet_input)
    plan = plan_job(load_spec(spec_of(parquet_input)), overwrite=True)
    assert sorted(storage.list_names(str(parquet_input))) == before  # planning deleted nothing

    claim_output(plan)

    after = sorted(storage.list_names(str(parquet_input)))
    assert [url for url in after if "/output/" not in url] == [url for url in before if "/output/" not in url]
    assert [url for url in after if "/output/" in url] == [str(parquet_input / "output" / "_job.json")]


def test_a_run_that_claimed_the_folder_after_planning_is_noticed_at_claim(parquet_input: Path) -> None:
    first = plan_job(load_spec(spec_of(parquet_input)))
    second = plan_job(load_spec(spec_of(parquet_input, sampling={"max_tokens": MAX_TOKENS + 1})))
    claim_output(first)  # another spec's run got the lease first and claimed the empty folder

    with pytest.raises(SpecError, match=f"holds job {first.job_id!r}, not {second.job_id!r}"):
        claim_output(second)


# Column names the pipeline uses itself are refused as carry columns.


@pytest.mark.parametrize(
    ("carry", "names"),
    [
        (["_shard"], "['_shard']"), (["_prompt"], "['_prompt']"), (["_error_type"], "['_error_type']"),
        (["_request"], "['_request']"), (["_mine"], "['_mine']"), (["id"], "['id']"),
        (["source_file", "text"], "['source_file']"), (["prompt_token_ids"], "['prompt_token_ids']"),
        (["cost_usd"], "['cost_usd']"),
    ],
)
def test_reserved_carry_column_is_a_spec_error_naming_the_field(parquet_input: Path, carry: list[str],
                                                                 names: str) -> None:
    [problem] = planning_error(spec_of(parquet_input, input={"carry_columns": carry})).problems

    assert problem.startswith(f"input.carry_columns: found a list of {len(carry)} item(s); {names} are the pipeline's "
                              "own column names")
    assert "rename the input column" in problem


def test_repeated_carry_column_is_a_spec_error_naming_it(parquet_input: Path) -> None:
    [problem] = planning_error(spec_of(parquet_input, input={"carry_columns": ["text", "rid", "text"]})).problems

    assert problem == ("input.carry_columns: found a list of 3 item(s); ['text'] appear more than once; name each "
                       "column once")


# validate catches what cannot work before any engine starts.


def write_jsonl(path: Path, records: list[Any]) -> None:
    storage.write_bytes(str(path), "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode())


@pytest.mark.parametrize(
    ("sections", "missing"),
    [
        ({"prompt": {"template": "Say {body}"}}, "['body']"),
        ({"input": {"id_column": "key"}}, "['key']"),
        ({"input": {"carry_columns": ["topic"]}}, "['topic']"),
    ],
    ids=["template", "id-column", "carry-column"],
)
def test_jsonl_column_no_sampled_row_has_is_refused_naming_the_file(tmp_path: Path, sections: dict,
                                                                     missing: str) -> None:
    write_jsonl(tmp_path / "input" / "a.jsonl", ["not json", {"rid": "a0", "text": "hi"}, [1, 2]])
    sections = {"input": {"format": "jsonl", **sections.get("input", {})},
                **{k: v for k, v in sections.items() if k != "input"}}

    [problem] = planning_error(spec_of(tmp_path, **sections)).problems

    assert problem == (f"input file {tmp_path / 'input' / 'a.jsonl'} has no column(s) {missing} that the spec uses "
                       "(prompt, route_column, input.id_column or input.carry_columns); the JSON objects of its first "
                       f"{read.COLUMN_SAMPLE_ROWS} lines have ['rid', 'text']")


def test_jsonl_column_some_sampled_rows_have_is_accepted(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "input" / "a.jsonl", [{"rid": "a0", "title": "x"}, {"rid": "a1", "text": "hi"}])
    assert plan_job(load_spec(spec_of(tmp_path, input={"format": "jsonl"}))).rows == 2


def test_openai_batch_carry_key_no_sampled_line_has_is_refused_and_one_some_have_is_accepted(tmp_path: Path) -> None:
    """The request's chat and model are in its body (checked row by row), so only the carried keys are checked."""
    line = {"custom_id": "c0", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}
    write_jsonl(tmp_path / "input" / "a.jsonl", [line, {**line, "custom_id": "c1", "team": "x"}])
    spec = spec_of(tmp_path, input={"format": "openai-batch", "id_column": None, "carry_columns": ["team", "topic"]})
    del spec["prompt"]

    [problem] = planning_error(spec).problems

    assert problem == (f"input file {tmp_path / 'input' / 'a.jsonl'} has no column(s) ['topic'] that the spec uses "
                       "(prompt, route_column, input.id_column or input.carry_columns); the JSON objects of its first "
                       f"{read.COLUMN_SAMPLE_ROWS} lines have ['custom_id', 'method', 'url', 'body', 'team']")
    spec["input"]["carry_columns"] = ["team"]
    assert plan_job(load_spec(spec)).carried == pa.schema([("team", pa.string())])


@pytest.mark.parametrize(
    ("files", "found"),
    [
        ({"a.jsonl": b""}, "its 1 file(s) hold no rows (1 empty or header only)"),
        ({"a.jsonl": b"", "b.jsonl": b""}, "its 2 file(s) hold no rows (2 empty or header only)"),
    ],
)
def test_input_without_a_single_row_is_refused(tmp_path: Path, files: dict[str, bytes], found: str) -> None:
    for name, data in files.items():
        storage.write_bytes(str(tmp_path / "input" / name), data)

    [problem] = planning_error(spec_of(tmp_path, input={"format": "jsonl"})).problems

    assert problem == f"input.path {tmp_path / 'input'}: {found}; check input.path and input.format"


def test_csv_input_with_only_headers_is_refused(tmp_path: Path) -> None:
    storage.write_bytes(str(tmp_path / "input" / "a.csv"), b"rid,text\n")

    [problem] = planning_error(spec_of(tmp_path, input={"format": "csv"})).problems

    assert problem.startswith(f"input.path {tmp_path / 'input'}: its 1 file(s) hold no rows")


def test_empty_files_beside_rows_are_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_jsonl(tmp_path / "input" / "a.jsonl", [{"rid": "a0", "text": "hi"}])
    storage.write_bytes(str(tmp_path / "input" / "b.jsonl"), b"")

    assert plan_job(load_spec(spec_of(tmp_path, input={"format": "jsonl"}))).rows == 1
    assert f"1 input file(s) hold no rows and are left out: {tmp_path / 'input' / 'b.jsonl'}" in caplog.text


def test_max_model_len_below_the_system_prompt_is_refused(parquet_input: Path, tiny_models: dict[str, Path]) -> None:
    spec = spec_of(parquet_input, model={"variant": "tiny-qwen2", "max_model_len": 64},
                   prompt={"system": "Be brief. " * 40, "template": TEMPLATE})

    [problem] = planning_error(spec).problems

    assert problem.startswith("model.max_model_len: found 64; the shortest possible prompt (system message and "
                              "template text) is ")
    assert f"and with sampling.max_tokens {MAX_TOKENS} no row fits. Raise max_model_len to at least " in problem


def test_max_model_len_that_fits_the_system_prompt_is_accepted(parquet_input: Path,
                                                               tiny_models: dict[str, Path]) -> None:
    spec = spec_of(parquet_input, model={"variant": "tiny-qwen2", "max_model_len": 64})
    assert plan_job(load_spec(spec)).models[0].max_model_len == 64


# Resume trusts the input only while it is the same: files added, removed or changed are refused.


@pytest.mark.parametrize("change", ["changed-same-size", "added", "removed", "grown"])
def test_resume_over_changed_input_is_refused_naming_the_files(parquet_input: Path, change: str) -> None:
    claim_output(plan_job(load_spec(spec_of(parquet_input))))
    a = parquet_input / "input" / "a.parquet"
    if change == "changed-same-size":
        data = a.read_bytes()
        write_parquet(a, [{"rid": "a0", "text": "HELLO"}, {"rid": "a1", "text": "BYE"}])
        assert len(a.read_bytes()) == len(data)
        os.utime(a, ns=(10**18, 10**18))
    elif change == "added":
        write_parquet(parquet_input / "input" / "sub" / "new.parquet", [{"rid": "n0", "text": "new"}])
    elif change == "removed":
        (parquet_input / "input" / "b.parquet").unlink()
    else:
        write_parquet(a, [{"rid": "a0", "text": "hello"}, {"rid": "a1", "text": "bye"}, {"rid": "a2", "text": "+"}])
    named = {"changed-same-size": "1 changed (size, ETag or modification time): a.parquet",
             "added": "1 added: sub/new.parquet", "removed": "1 removed: b.parquet",
             "grown": "1 changed (size, ETag or modification time): a.parquet"}[change]

    message = str(planning_error(spec_of(parquet_input)))

    assert message == (f"input.path {parquet_input / 'input'} is not the input the job in output.path "
                       f"{parquet_input / 'output'} started from; since its first run, file(s) {named}. Resuming "
                       "would mix output of two inputs: write to a new output path, or rerun with --overwrite to "
                       "start over.")
    assert plan_job(load_spec(spec_of(parquet_input)), overwrite=True).models[0].committed == frozenset()


def test_resume_over_the_same_input_is_accepted(parquet_input: Path) -> None:
    first = plan_job(load_spec(spec_of(parquet_input)))
    claim_output(first)
    assert plan_job(load_spec(spec_of(parquet_input))).shards == first.shards


# The logical date is part of a scheduled job's identity.


def test_logical_date_in_the_output_path_alone_gives_each_slot_its_own_job_id(parquet_input: Path) -> None:
    from datetime import datetime

    dated = spec_of(parquet_input, output={"path": f"{parquet_input}/out/{{ds}}"})
    first, again, second = (load_spec(dated, datetime(2026, 11, day)) for day in (27, 27, 28))

    assert plan_job(first).job_id == plan_job(again).job_id != plan_job(second).job_id
    assert load_spec(spec_of(parquet_input)).output_hash() == load_spec(spec_of(parquet_input),
                                                                         datetime(2026, 11, 27)).output_hash()


# A run holds a lease on its output; every run leaves a run record.


@pytest.fixture
def quick_leases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(driver, "HEARTBEAT_S", 0.05)


def lease_files(root: Path) -> list[str]:
    return storage.list_names(str(root / "output" / "_lease"))


def test_a_held_lease_refuses_a_second_run_naming_the_holder(parquet_input: Path) -> None:
    plan = plan_job(load_spec(spec_of(parquet_input)))
    with OutputLease(plan, "first-run"):
        holder = json.loads(storage.read_bytes(lease_files(parquet_input)[0]))
        for other_spec in (spec_of(parquet_input), spec_of(parquet_input, sampling={"max_tokens": 7})):
            with pytest.raises(SpecError) as caught:
                run_job(load_spec(other_spec), overwrite=True)
            assert str(caught.value) == (
                f"output.path {parquet_input / 'output'} is held by run first-run (host {socket.gethostname()}, pid "
                f"{os.getpid()}, since {holder['since']}, last heartbeat {holder['renewed_at']}): another run is "
                f"writing there. Wait for it to finish or stop it; if its driver died elsewhere, the lease frees "
                f"itself at {holder['expires_at']}.")
    assert lease_files(parquet_input) == []  # released


@pytest.mark.parametrize("stale", ["expired", "dead-pid"])
def test_a_stale_lease_is_taken_over(parquet_input: Path, stale: str) -> None:
    plan = plan_job(load_spec(spec_of(parquet_input)))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {"run_id": "gone", "host": socket.gethostname(), "pid": int(dead.stdout), "since": "2026-01-01T00:00:00+00:00",
              "renewed_at": "2026-01-01T00:00:00+00:00", "expires_at": "2999-01-01T00:00:00+00:00"}
    if stale == "expired":
        record.update(pid=os.getpid(), expires_at="2026-01-01T00:02:00+00:00")
    storage.write_bytes(str(parquet_input / "output" / "_lease" / "0000000007.json"), json.dumps(record).encode())

    with OutputLease(plan, "second-run"):
        [url] = lease_files(parquet_input)
        assert url.endswith("/_lease/0000000008.json")
        assert json.loads(storage.read_bytes(url))["run_id"] == "second-run"
    assert lease_files(parquet_input) == []


@pytest.mark.s3
def test_lease_on_s3_has_one_winner(s3) -> None:
    root = f"s3://{s3.bucket}/lease-{uuid.uuid4().hex[:8]}"
    write_parquet(f"{root}/input/a.parquet", [{"rid": "a0", "text": "hello"}])
    plan = plan_job(load_spec(spec_of(root)))

    with OutputLease(plan, "first-run"):
        with pytest.raises(SpecError, match="is held by run first-run"):
            OutputLease(plan, "second-run").acquire()
    with OutputLease(plan, "third-run"):
        assert [json.loads(storage.read_bytes(u))["run_id"] for u in storage.list_names(f"{root}/output/_lease")] == [
            "third-run"]


def fake_cluster(monkeypatch: pytest.MonkeyPatch, follow) -> None:
    """Run jobs on the session's real Ray but without vLLM: the engines 'hold' 3 accelerators while `follow` runs."""
    from qwen_batch.cluster import resources
    from qwen_batch.pipelines import pipeline

    replicas = resources.ReplicaPlan("gpu", 1, 3, {}, {}, 1.0, num_gpus=1)
    monkeypatch.setattr(resources, "plan_models", lambda spec, models, nodes, lora_slots=None: [[replicas] * len(models)])
    monkeypatch.setattr(pipeline, "build_dataset", lambda *args, **kwargs: None)
    monkeypatch.setattr(driver, "_follow", lambda dataset, plan, work, started, errors: follow())


def run_records(root: Path) -> list[dict[str, Any]]:
    return [json.loads(storage.read_bytes(url)) for url in storage.list_names(str(root / "output" / "_runs"))]


@pytest.mark.parametrize("ends", [RuntimeError("engine exploded"), KeyboardInterrupt()], ids=["failed", "interrupted"])
def test_a_run_that_fails_leaves_a_run_record_with_its_accelerator_seconds(
    parquet_input: Path, monkeypatch: pytest.MonkeyPatch, quick_leases: None, ends: BaseException
, ray_local: None) -> None:
    seen: list[list[dict[str, Any]]] = []

    def follow() -> int:
        time.sleep(0.3)
        seen.append(run_records(parquet_input))  # the heartbeat's record, while the run runs
        raise ends

    fake_cluster(monkeypatch, follow)

    with pytest.raises(type(ends)):
        run_job(load_spec(spec_of(parquet_input)))

    [running] = seen[0]
    assert running["outcome"] == "running" and running["accelerators"] == 3 and running["accelerator_seconds"] > 0
    [record] = run_records(parquet_input)
    assert record["outcome"] == ("failed" if isinstance(ends, RuntimeError) else "interrupted")
    assert record["error"] == ("RuntimeError: engine exploded" if isinstance(ends, RuntimeError) else
                               "KeyboardInterrupt: ")
    assert record["accelerators"] == 3 and 0.9 <= record["accelerator_seconds"] <= 3 * 5
    assert record["shards_committed"] == 0 and record["shards_planned"] == 2
    assert lease_files(parquet_input) == []


def test_an_engine_the_cluster_has_no_room_for_fails_the_run_within_start_timeout_naming_it(
        parquet_input: Path, ray_local: None, tiny_models: dict[str, Path]) -> None:
    """An autoscaling pool is not checked against the nodes at planning (the cluster may grow): on the session's
    2-CPU Ray no node ever has room for a replica of 64 CPUs, so the run ends after start_timeout_s with no engine."""
    from qwen_batch.pipelines.pipeline import PoolsDidNotStart

    spec = spec_of(parquet_input, model={"variant": "tiny-qwen2"},
                   resources={"replicas": {"min": 1, "max": 1}, "cpus_per_replica": 64, "start_timeout_s": 3})
    started = time.monotonic()

    with pytest.raises(PoolsDidNotStart) as raised:
        run_job(load_spec(spec))

    assert time.monotonic() - started < 120
    message = str(raised.value)
    # (the prompt actor, still loading its tokenizer 3 s in, may be named too)
    assert message.startswith("no actor of these started within resources.start_timeout_s (3 s): engine replicas of "
                              "tiny-qwen2, each asking for {'CPU': 64.0}; ")
    assert "; the Ray cluster has {'CPU': " in message and "free of {'CPU': 2.0}" in message
    assert "raise resources.start_timeout_s" in message
    [record] = run_records(parquet_input)
    assert record["outcome"] == "failed" and record["error"].startswith("PoolsDidNotStart: no actor of these")


def test_a_failed_run_counts_in_the_next_runs_manifest(parquet_input: Path, monkeypatch: pytest.MonkeyPatch, ray_local: None) -> None:
    def fail() -> int:
        time.sleep(0.1)
        raise RuntimeError("engine exploded")

    fake_cluster(monkeypatch, fail)
    with pytest.raises(RuntimeError):
        run_job(load_spec(spec_of(parquet_input)))
    # Runs are ordered by their start, to the second: the next one starts in a later second than the failed one.
    [failed] = run_records(parquet_input)
    deadline = time.monotonic() + 5
    while datetime.now(timezone.utc).replace(microsecond=0) <= datetime.fromisoformat(failed["started_at"]):
        assert time.monotonic() < deadline, f"the clock did not pass the failed run's start {failed['started_at']}"
        time.sleep(0.05)
    fake_cluster(monkeypatch, lambda: 0)

    manifest = run_job(load_spec(spec_of(parquet_input)))

    assert [run.outcome for run in manifest.runs] == ["failed", "finished"]
    assert manifest.accelerator_seconds == pytest.approx(sum(run.accelerator_seconds for run in manifest.runs))
    assert manifest.accelerator_seconds >= 0.3


# Secrets are redacted by value too, wherever they reach the manifest or a message.


def test_secrets_in_values_never_reach_the_manifest(parquet_input: Path, monkeypatch: pytest.MonkeyPatch, ray_local: None) -> None:
    secrets = ["hf_QwenBatchSecretToken12345", "hunter2-db-pass", "Zm9vYmFyc2VjcmV0a2V5"]
    fake_cluster(monkeypatch, lambda: 0)
    spec = spec_of(parquet_input, engine={"env": {"HF_TOKEN": secrets[0], "MIRROR": f"token {secrets[0]}",
                                                  "DATABASE_URL": f"postgresql://app:{secrets[1]}@db:5432/x",
                                                  "AZURE": f"AccountName=a;AccountKey={secrets[2]};Suffix=x",
                                                  "HEADERS": f"Authorization: Bearer {secrets[0]}"}})

    run_job(load_spec(spec))

    written = {url: storage.read_bytes(url) for url in storage.list_names(str(parquet_input / "output"))}
    for url, data in written.items():
        for secret in secrets:
            assert secret.encode() not in data, (secret, url)
    env = json.loads(written[str(parquet_input / "output" / "_manifest.json")])["spec"]["engine"]["env"]
    assert env["HF_TOKEN"] == "***" and env["DATABASE_URL"] == "postgresql://***@db:5432/x"


def test_credentials_in_an_input_url_never_reach_the_message(tmp_path: Path, fast_retries: RetryPolicy,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    url = f"https://reader:hunter2-pass@127.0.0.1:{closed_port()}/data.jsonl?X-Amz-Signature=deadbeef42"

    message = str(planning_error(spec_of(tmp_path, input={"path": url, "format": "jsonl"})))

    assert "hunter2-pass" not in message and "deadbeef42" not in message
    assert "hunter2-pass" not in caplog.text and "deadbeef42" not in caplog.text


# Storage outages are never bad files, whatever input.on_bad_file says.


@pytest.mark.s3
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_storage_outage_mid_read_fails_the_shard_instead_of_committing_bad_file_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_retries: RetryPolicy, fmt: str
) -> None:
    from s3server import S3Server

    with S3Server(tmp_path / "s3") as server:
        options = {"endpoint_url": server.endpoint_url, "key": server.access_key, "secret": server.secret_key,
                   **NO_BOTOCORE_RETRIES}
        root = f"s3://{server.bucket}/outage"
        if fmt == "jsonl":
            lines = "".join(json.dumps({"rid": f"r{i}", "text": f"row {i}"}) + "\n" for i in range(50))
            storage.write_bytes(f"{root}/input/a.jsonl", lines.encode(), options)
        else:
            sink = io.BytesIO()
            pq.write_table(pa.table({"rid": [f"r{i}" for i in range(50)], "text": ["x"] * 50}), sink,
                           row_group_size=5)
            storage.write_bytes(f"{root}/input/a.parquet", sink.getvalue(), options)
        spec = load_spec(spec_of(root, input={"format": fmt, "on_bad_file": "skip", "storage_options": options,
                                              "rows_per_shard": 50}))
        [shard] = plan_job(spec).shards
        monkeypatch.setattr(read, "SCAN_CHUNK_BYTES", 64)
        reads = []
        real_read_bytes, real_read_file = storage.read_bytes, storage.read_file

        def stop_after_first_read(function):
            def call(*args, **kwargs):
                reads.append(args[0])
                if len(reads) == 2:
                    server.stop()  # the store goes away in the middle of the shard
                return function(*args, **kwargs)
            return call

        monkeypatch.setattr(storage, "read_bytes", stop_after_first_read(real_read_bytes))
        monkeypatch.setattr(storage, "read_file", stop_after_first_read(real_read_file))
        if fmt == "parquet":
            server.stop()

        with pytest.raises(SpecError, match=f"cannot reach the storage endpoint {server.endpoint_url}"):
            read_shard(shard, ReadConfig.of(spec.input, prompt_columns(spec)))


# OpenAI batch requests whose sampling vLLM would refuse are invalid_request rows at read time.

BAD_REQUESTS = [
    ({"temperature": -1}, "body.temperature: found -1; input should be greater than or equal to 0; allowed: a finite "
     "number in [0, 2]"),
    ({"top_p": 0}, "body.top_p: found 0; input should be greater than 0; allowed: a finite number in (0, 1]"),
    ({"stop": [""]}, "body.stop.0: found ''; string should have at least 1 character"),
    ({"seed": "abc"}, "body.seed: found 'abc'; input should be a valid integer"),
    ({"repetition_penalty": -0.5}, "body.repetition_penalty: found -0.5; input should be greater than 0"),
    ({"presence_penalty": 2.5}, "body.presence_penalty: found 2.5; input should be less than or equal to 2"),
    ({"frequency_penalty": float("nan")}, "body.frequency_penalty: found nan; input should be a finite number"),
    ({"temperature": float("inf")}, "body.temperature: found inf; input should be a finite number"),
]


def test_openai_requests_outside_vllms_ranges_are_invalid_request_rows(tmp_path: Path) -> None:
    requests = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}}
                for i, (body, _) in enumerate([({}, ""), *BAD_REQUESTS])]
    storage.write_bytes(str(tmp_path / "input" / "batch.jsonl"),
                        "".join(json.dumps(r) + "\n" for r in requests).encode())  # NaN and Infinity as JSON allows
    spec = load_spec({**spec_of(tmp_path, input={"format": "openai-batch", "id_column": None}), "prompt": None})
    [shard] = plan_job(spec).shards

    rows = read_shard(shard, ReadConfig.of(spec.input, prompt_columns(spec))).to_pylist()

    assert [row["id"] for row in rows] == [f"req-{i}" for i in range(len(requests))]
    assert rows[0]["_error_type"] is None
    for row, (_, message) in zip(rows[1:], BAD_REQUESTS):
        assert row["_error_type"] == "invalid_request"
        assert row["_error"].startswith(f"{tmp_path / 'input' / 'batch.jsonl'} line {row['source_row'] + 1}: {message}")


# Rows that used to stop a job: each is one error row, the rows around it are read.

CSV_ROW_CASES = [
    ("stray-quote", b'5" screen,r1\n', None, ""),
    ("quote-after-closing-quote", b'"12" and 14",r2\n', None, ""),
    ("field-over-128-kib", b'"' + b"w" * (200 << 10) + b'",r3\n', None, ""),
    ("carriage-return", b"a\rb,r4\n", "invalid_csv", "expected one record, found 2"),
    ("too-many-fields", b"a,r5,extra\n", "invalid_csv", "expected 2 fields as in the header, found 3"),
    ("invalid-utf8", b"caf\xe9,r6\n", "invalid_utf8", "is not valid UTF-8 (invalid continuation byte"),
]


@pytest.mark.parametrize("case", [case for case, _, _, _ in CSV_ROW_CASES])
def test_csv_row_that_used_to_stop_the_job_is_one_row(tmp_path: Path, case: str) -> None:
    index = next(i for i, (name, _, _, _) in enumerate(CSV_ROW_CASES) if name == case)
    _, record, error_type, fragment = CSV_ROW_CASES[index]
    source = tmp_path / "input" / "rows.csv"
    storage.write_bytes(str(source), b"text,rid\nbefore,r0\n" + record + b"after,r9\n")
    spec = load_spec(spec_of(tmp_path, input={"format": "csv"}))
    [shard] = plan_job(spec).shards

    rows = read_shard(shard, ReadConfig.of(spec.input, prompt_columns(spec))).to_pylist()

    assert [row["source_row"] for row in rows] == [0, 1, 2]
    assert rows[1]["_error_type"] == error_type
    if error_type is None:
        assert rows[1]["id"] == f"r{index + 1}"
    else:
        assert rows[1]["_error"].startswith(f"{source} record 2 (after the header)") and fragment in rows[1]["_error"]
    assert rows[0]["id"] == "r0" and rows[2]["id"] == "r9"
