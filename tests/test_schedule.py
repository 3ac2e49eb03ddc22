"""Scheduled runs: the logical date in a spec's name and paths (`{ds}`, `{ts}`, ...), and idempotent reruns."""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from qwen_batch.jobs import submit
from qwen_batch.jobs.cli import main
from qwen_batch.schemas.errors import SpecError
from qwen_batch.schemas.spec import LOGICAL_DATE_ENV, load_spec, parse_logical_date

NIGHT = datetime(2026, 11, 28, tzinfo=timezone.utc)


def spec(**fields: Any) -> dict[str, Any]:
    """A valid spec dict; keyword arguments replace whole sections or set `name`."""
    return {
        "name": "events",
        "input": {"path": "s3://bucket/events/", "format": "jsonl"},
        "prompt": {"system": "Today is {ds}.", "template": "On {ds}: {text}"},
        "model": {"variant": "qwen2.5-7b-instruct"},
        "output": {"path": "s3://bucket/out/"},
        **fields,
    }


@pytest.fixture(autouse=True)
def no_logical_date_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LOGICAL_DATE_ENV, raising=False)


def test_placeholders_fill_name_and_paths_with_the_logical_date():
    loaded = load_spec(spec(name="events-{ds_nodash}", input={"path": "s3://bucket/events/{ds}/", "format": "jsonl"},
                            output={"path": "s3://bucket/out/{ts_nodash}/{ts}/"}),
                       logical_date=datetime(2026, 11, 28, 2, 30, tzinfo=timezone.utc))
    assert loaded.name == "events-20261128"
    assert loaded.input.path == "s3://bucket/events/2026-11-28/"
    assert loaded.output.path == "s3://bucket/out/20261128T023000/2026-11-28T02:30:00+00:00/"
    assert loaded.prompt.template == "On {ds}: {text}" and loaded.prompt.columns == ["ds", "text"]
    assert loaded.prompt.system == "Today is {ds}."


def test_a_spec_without_placeholders_needs_no_logical_date():
    assert load_spec(spec()).output.path == "s3://bucket/out/"
    assert load_spec(spec(), logical_date=NIGHT).output.path == "s3://bucket/out/"


def test_doubled_braces_are_literal():
    loaded = load_spec(spec(output={"path": "/out/{{raw}}/{ds}"}), logical_date=NIGHT)
    assert loaded.output.path == "/out/{raw}/2026-11-28"


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-11-28", datetime(2026, 11, 28, tzinfo=timezone.utc)),
    ("2026-11-28T02:30:00", datetime(2026, 11, 28, 2, 30, tzinfo=timezone.utc)),
    ("2026-11-28 02:30", datetime(2026, 11, 28, 2, 30, tzinfo=timezone.utc)),
    ("2026-11-28T02:30:00Z", datetime(2026, 11, 28, 2, 30, tzinfo=timezone.utc)),
    ("2026-11-28T03:30:00+01:00", datetime(2026, 11, 28, 2, 30, tzinfo=timezone.utc)),
])
def test_logical_date_is_a_date_or_an_iso_datetime_in_utc(text: str, expected: datetime):
    parsed = parse_logical_date(text)
    assert parsed == expected and parsed.tzinfo == timezone.utc


def test_the_date_of_a_zoned_time_is_its_utc_date():
    loaded = load_spec(spec(output={"path": "/out/{ds}"}), logical_date=parse_logical_date("2026-11-28T00:30+02:00"))
    assert loaded.output.path == "/out/2026-11-27"


@pytest.mark.parametrize("text", ["28/11/2026", "20261128", "2026-13-01", "2026-11-28T25:00", "yesterday", ""])
def test_a_bad_logical_date_is_a_spec_error(text: str):
    with pytest.raises(SpecError, match=f"--logical-date: found {re.escape(repr(text))}; expected a date YYYY-MM-DD"):
        parse_logical_date(text)


def test_the_environment_gives_the_logical_date_unless_one_is_passed(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(LOGICAL_DATE_ENV, "2026-11-27")
    dated = spec(output={"path": "/out/{ds}"})
    assert load_spec(dated).output.path == "/out/2026-11-27"
    assert load_spec(dated, logical_date=NIGHT).output.path == "/out/2026-11-28"
    monkeypatch.setenv(LOGICAL_DATE_ENV, "tomorrow")
    with pytest.raises(SpecError, match=f"{LOGICAL_DATE_ENV}: found 'tomorrow'"):
        load_spec(dated)


def test_a_missing_logical_date_is_a_spec_error_naming_each_field():
    with pytest.raises(SpecError) as error:
        load_spec(spec(name="events-{ds_nodash}", output={"path": "/out/{ds}"}))
    assert error.value.problems == [
        f"name: found 'events-{{ds_nodash}}', which needs the run's logical date; pass --logical-date YYYY-MM-DD (or "
        f"an ISO datetime) or set {LOGICAL_DATE_ENV}",
        f"output.path: found '/out/{{ds}}', which needs the run's logical date; pass --logical-date YYYY-MM-DD (or an "
        f"ISO datetime) or set {LOGICAL_DATE_ENV}",
    ]


@pytest.mark.parametrize(("path", "named"), [
    ("/out/{date}/", "{date}"), ("/out/{ds:%Y}/", "{ds:%Y}"), ("/out/{ds!r}/", "{ds!r}"), ("/out/{a,b}/", "{a,b}"),
    ("/out/{}/", "{}"),
])
def test_an_unknown_placeholder_is_a_spec_error_naming_it(path: str, named: str):
    with pytest.raises(SpecError, match=re.escape(f"output.path: found {path!r}; unknown placeholder(s) {named}; "
                                                  "the placeholders are {ds}, {ds_nodash}, {ts}, {ts_nodash}")):
        load_spec(spec(output={"path": path}), logical_date=NIGHT)


def test_a_lone_brace_is_a_spec_error():
    with pytest.raises(SpecError, match=re.escape("input.path: found '/in/{ds'; ") + ".*write a literal brace as"):
        load_spec(spec(input={"path": "/in/{ds", "format": "jsonl"}), logical_date=NIGHT)


def test_placeholder_problems_come_with_the_other_problems_of_the_spec():
    with pytest.raises(SpecError) as error:
        load_spec(spec(output={"path": "/out/{day}"}, sampling={"max_tokens": 0}), logical_date=NIGHT)
    assert [problem.split(":")[0] for problem in error.value.problems] == ["output.path", "sampling.max_tokens"]


def test_the_name_must_match_the_name_pattern_after_filling():
    with pytest.raises(SpecError, match=r"name: found 'events-2026-11-28T00:00:00\+00:00'; .*from 'events-\{ts\}' "
                                        r"with the logical date filled in.*\{ts_nodash\}"):
        load_spec(spec(name="events-{ts}"), logical_date=NIGHT)


def test_each_slot_is_its_own_job():
    dated = spec(name="events-{ds}", input={"path": "/in/{ds}", "format": "jsonl"}, output={"path": "/out/{ds}"})
    night, again = load_spec(dated, logical_date=NIGHT), load_spec(dated, logical_date=NIGHT)
    other = load_spec(dated, logical_date=datetime(2026, 11, 29, tzinfo=timezone.utc))
    assert night == again and night.output_hash() == again.output_hash()
    assert other.output.path != night.output.path and other.output_hash() != night.output_hash()


def write_dated_job(root: Path, days: list[str], variant: str = "tiny-qwen2") -> Path:
    """A jsonl input folder of 10 rows per day under root/events/, and a spec reading `{ds}`'s folder."""
    for day in days:
        folder = root / "events" / day
        folder.mkdir(parents=True)
        (folder / "part-0.jsonl").write_text("".join(
            json.dumps({"event_id": f"{day}-{i}", "text": f"event {i} of {day}"}) + "\n" for i in range(10)))
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump({
        "name": "events-{ds_nodash}",
        "input": {"path": str(root / "events" / "{ds}"), "format": "jsonl", "id_column": "event_id",
                  "rows_per_shard": 5},
        "prompt": {"template": "Event: {text}"},
        "model": {"variant": variant, "max_model_len": 512},
        "sampling": {"max_tokens": 2, "temperature": 0, "seed": 0},
        "output": {"path": str(root / "out" / "{ds}")},
    }))
    return path


def test_validate_takes_the_logical_date(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    job = write_dated_job(tmp_path, ["2026-11-28"], variant="qwen2.5-0.5b-instruct")
    assert main(["validate", str(job), "--logical-date", "2026-11-28", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["job_id"].startswith("events-20261128-")
    assert shown["output"] == str(tmp_path / "out" / "2026-11-28") and shown["rows"] == 10

    assert main(["validate", str(job)]) == 2
    assert "input.path: found" in (error := capsys.readouterr().err) and "pass --logical-date" in error
    assert main(["validate", str(job), "--logical-date", "28.11.2026"]) == 2
    assert "--logical-date: found '28.11.2026'" in capsys.readouterr().err


def test_submit_passes_the_logical_date_to_run_on_the_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               ray_head):
    """On the session's real head: the run there fills `{ds}` with the date given here, not with its own env."""
    job = write_dated_job(tmp_path, [])  # no input for the date: the run on the cluster fails naming the path
    monkeypatch.setenv(LOGICAL_DATE_ENV, "2026-11-28T02:00:00Z")  # the cluster does not see this machine's env
    submission_id = submit.submit_job(str(job), ray_head.address, extra_args=["--overwrite"])

    info = submit._client(ray_head.address).get_job_info(submission_id)
    assert info.entrypoint == ("python -m qwen_batch.jobs.cli run job.yaml --logical-date 2026-11-28T02:00:00+00:00 "
                               "--overwrite")
    assert info.metadata == {"qwen_batch_job": "events-20261128"}
    assert submit.wait_job(ray_head.address, submission_id, timeout_s=120, poll_s=0.5) == "FAILED"
    logs = next(submit.job_logs(ray_head.address, submission_id))
    assert f"no input files at {tmp_path / 'events' / '2026-11-28'}: the path does not exist" in logs, logs[-3000:]


@pytest.mark.engine
def test_a_rerun_of_a_slot_resumes_and_a_new_slot_writes_its_own_path(tmp_path: Path, ray_local, tiny_models,
                                                                       caplog: pytest.LogCaptureFixture):
    from qwen_batch.jobs.driver import run_job

    caplog.set_level(logging.INFO, logger="qwen_batch.jobs.progress")
    job = write_dated_job(tmp_path, ["2026-11-27", "2026-11-28"])
    first_night, second_night = parse_logical_date("2026-11-27"), parse_logical_date("2026-11-28")

    first = run_job(load_spec(job, logical_date=first_night))
    assert first.complete and first.output_path == str(tmp_path / "out" / "2026-11-27")
    assert any(re.fullmatch(r"tiny-qwen2  10/10 rows \(100%\)  2/2 shards  0 errors  \d+ out tok/s  \$\S+  "
                            r"done in \d:\d\d:\d\d", record.getMessage()) for record in caplog.records)

    again = run_job(load_spec(job, logical_date=first_night))
    assert again.job_id == first.job_id and again.complete
    assert sorted(run.shards_committed for run in again.runs) == [0, 2]
    ids = pq.read_table(first.output_path).column("id").to_pylist()
    assert sorted(ids) == sorted(f"2026-11-27-{i}" for i in range(10))

    second = run_job(load_spec(job, logical_date=second_night))
    assert second.name == "events-20261128" and second.job_id != first.job_id
    assert second.output_path == str(tmp_path / "out" / "2026-11-28") and len(second.runs) == 1
    assert sorted(pq.read_table(second.output_path).column("id").to_pylist()) == sorted(
        f"2026-11-28-{i}" for i in range(10))
    assert sorted(pq.read_table(first.output_path).column("id").to_pylist()) == sorted(ids)
