"""Jobs on a separate Ray cluster (the session's `ray start --head`, token auth on) driven only through the Jobs API
and the CLI: `qwen-batch submit/status/logs/stop`, the plain `ray job submit` path, and a stop that leaves no shard
half-written. Only the two jobs that run the tiny model start an engine (marked `engine`)."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import VENV_BIN, RayHead
from qwen_batch.jobs.cli import EXIT_JOBS_API, main
from qwen_batch.jobs.submit import METADATA_KEY, _client, _runtime_env, job_logs, job_status, submit_job, wait_job
from qwen_batch.schemas.errors import SpecError

JOB_TIMEOUT_S = 600  # a job's engine start and rows, minutes when other work shares the CPUs


def write_job(folder: Path, name: str, rows: int, **overrides: Any) -> Path:
    """A JSONL input of `rows` reviews and a spec for the tiny Qwen2 model, both under `folder`; the spec's path."""
    words = ["great", "broken", "late", "perfect", "cheap", "solid", "noisy", "bright"]
    (folder / "input").mkdir(parents=True)
    with open(folder / "input" / "reviews.jsonl", "w") as out:
        for i in range(rows):
            out.write(json.dumps({"review_id": f"r{i:05d}", "text": " ".join(words[(i + k) % 8] for k in range(3))})
                      + "\n")
    spec = {
        "name": name,
        "input": {"path": str(folder / "input"), "format": "jsonl", "id_column": "review_id", "rows_per_shard": 10},
        "prompt": {"system": "You label customer reviews.", "template": "Review: {text}\nPositive or negative?"},
        "model": {"variant": "tiny-qwen2", "max_model_len": 512},
        "sampling": {"max_tokens": 4, "temperature": 0, "seed": 0},
        "output": {"path": str(folder / "output")},
    }
    for section, values in overrides.items():
        spec[section] = {**spec[section], **values}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run `qwen-batch ARGV` in-process; its stdout, after checking it exited 0."""
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, f"qwen-batch {' '.join(argv)} exited {code}:\n{out}\n{err}"
    return out


@pytest.mark.parametrize("field", ["input", "output"])
def test_submit_refuses_a_relative_local_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, field: str) -> None:
    spec = write_job(tmp_path, "relative", 2)
    raw = yaml.safe_load(spec.read_text())
    raw[field]["path"] = "data/here"
    spec.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match=f"{field}.path: found 'data/here', a relative local path"):
        submit_job(str(spec), "http://127.0.0.1:9")


@pytest.mark.parametrize(("section", "fields", "path"), [
    ("input", {"storage_options": {"secret": "s3cr3t"}}, "input.storage_options.secret"),
    ("engine", {"env": {"HF_TOKEN": "hf_abcdefghijklmnopqrstuvwxyz0123"}}, "engine.env.HF_TOKEN"),
])
def test_submit_refuses_a_spec_that_carries_credentials_naming_them(tmp_path: Path, section: str, fields: dict,
                                                                    path: str) -> None:
    """Before contacting the cluster (nothing listens at the address), as `render k8s` refuses a ConfigMap."""
    spec = write_job(tmp_path, "secretive", 2)
    raw = yaml.safe_load(spec.read_text())
    raw[section] = {**raw.get(section, {}), **fields}
    spec.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError) as raised:
        submit_job(str(spec), "http://127.0.0.1:9")
    assert str(raised.value).startswith(f"{path}: `submit` uploads the spec to the cluster")
    assert "s3cr3t" not in str(raised.value) and "hf_abc" not in str(raised.value)


def test_jobs_api_names_the_token_sources_when_no_token_is_found(ray_head: RayHead, tmp_path: Path) -> None:
    """In a process of its own, as a user runs it: Ray keeps a token it has loaded for the rest of a process."""
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("RAY_AUTH_TOKEN_PATH")
    done = subprocess.run([str(VENV_BIN / "qwen-batch"), "status", "raysubmit_none", "--address", ray_head.address],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_JOBS_API, done.stdout + done.stderr
    assert "requires token authentication and no token was found here" in done.stderr
    assert ray_head.token_file.read_text() not in done.stdout + done.stderr


def test_submit_ships_the_project_packages_as_py_modules(ray_head: RayHead, tmp_path: Path) -> None:
    """The job imports our packages from the uploaded copies, not from an install on the cluster."""
    (tmp_path / "job.yaml").write_text("{}")
    (tmp_path / "staged").mkdir()
    client = _client(ray_head.address)
    submission_id = client.submit_job(
        entrypoint="python -c 'from qwen_batch import jobs, pipelines, cluster, schemas; "
                   "print(*(m.__path__[0] for m in (jobs, pipelines, cluster, schemas)), sep=chr(10))'",
        runtime_env=_runtime_env(str(tmp_path / "staged"), str(tmp_path / "job.yaml")))
    assert wait_job(ray_head.address, submission_id, timeout_s=120, poll_s=0.5) == "SUCCEEDED"
    logs = client.get_job_logs(submission_id)
    for package in ("jobs", "pipelines", "cluster", "schemas"):
        assert re.search(rf"^/.*/runtime_resources/py_modules_files/_ray_pkg_[0-9a-f]+/qwen_batch/{package}$", logs,
                         re.MULTILINE), logs


def test_list_shows_the_qwen_batch_jobs_and_status_exits_with_their_state(ray_head: RayHead,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`list` shows the jobs with qwen-batch's metadata, not the cluster's others; `status` exits 0 or 1 for them."""
    client = _client(ray_head.address)
    ours = client.submit_job(entrypoint="echo listed", metadata={METADATA_KEY: "listed"})
    failed = client.submit_job(entrypoint="exit 7", metadata={METADATA_KEY: "failing"})
    other = client.submit_job(entrypoint="echo not ours")
    assert [wait_job(ray_head.address, job, timeout_s=120, poll_s=0.5) for job in (ours, failed, other)] == [
        "SUCCEEDED", "FAILED", "SUCCEEDED"]

    listed = {job["submission_id"]: job for job in json.loads(cli(capsys, "list", "--address", ray_head.address,
                                                                  "--json"))}
    assert other not in listed
    assert (listed[ours]["name"], listed[ours]["status"]) == ("listed", "SUCCEEDED")
    assert (listed[failed]["name"], listed[failed]["status"]) == ("failing", "FAILED")
    assert listed[ours]["start_time"] <= listed[ours]["end_time"]
    table = cli(capsys, "list", "--address", ray_head.address)
    assert re.search(rf"^{ours}\s+listed\s+SUCCEEDED\s+\d{{4}}-\d\d-\d\dT", table, re.MULTILINE), table
    assert other not in table

    assert json.loads(cli(capsys, "status", ours, "--address", ray_head.address, "--json"))["status"] == "SUCCEEDED"
    assert main(["status", failed, "--address", ray_head.address]) == 1
    assert capsys.readouterr().out == "FAILED\n"


def test_a_retried_submit_with_its_submission_id_submits_nothing(ray_head: RayHead, tmp_path: Path) -> None:
    """A retried Airflow task: the first try's job exists under the id, so the retry prints it and submits nothing."""
    spec = write_job(tmp_path, "retried", 2)
    submission_id = f"retried-{secrets.token_hex(4)}"
    client = _client(ray_head.address)
    client.submit_job(entrypoint="echo first try", submission_id=submission_id, metadata={METADATA_KEY: "retried"})
    jobs_before = len(client.list_jobs())

    retried = subprocess.run([str(VENV_BIN / "qwen-batch"), "submit", str(spec), "--address", ray_head.address,
                              "--submission-id", submission_id], capture_output=True, text=True, timeout=120)

    assert retried.returncode == 0, retried.stderr
    assert retried.stdout == f"{submission_id}\n"
    assert f"job {submission_id} (retried) is on the cluster already" in retried.stderr
    assert "not submitting it again" in retried.stderr
    assert len(client.list_jobs()) == jobs_before
    assert wait_job(ray_head.address, submission_id, timeout_s=120, poll_s=0.5) == "SUCCEEDED"
    assert "first try" in next(job_logs(ray_head.address, submission_id))


@pytest.mark.engine
def test_submitted_job_succeeds_with_logs_and_output(ray_head: RayHead, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`qwen-batch submit --wait` as a user runs it, the token in RAY_AUTH_TOKEN; then status, logs, output."""
    spec = write_job(tmp_path, "submitted", 20)
    token = ray_head.token_file.read_text()
    env = {**os.environ, "RAY_AUTH_TOKEN": token}
    env.pop("RAY_AUTH_TOKEN_PATH")
    started = time.monotonic()
    submitted = subprocess.run([str(VENV_BIN / "qwen-batch"), "submit", str(spec), "--address", ray_head.address,
                                "--wait"], env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    print(f"submitted job: exit {submitted.returncode} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    assert submitted.returncode == 0, submitted.stderr[-5000:]
    submission_id = submitted.stdout.strip()
    assert re.fullmatch(r"raysubmit_\w+", submission_id), submitted.stdout
    assert re.search(r"^job submitted-[0-9a-f]+: 20 rows", submitted.stderr, re.MULTILINE), submitted.stderr[-3000:]
    assert submitted.stderr.rstrip().endswith(f"job {submission_id}: SUCCEEDED")
    assert token not in submitted.stdout + submitted.stderr

    assert cli(capsys, "status", submission_id, "--address", ray_head.address).strip() == "SUCCEEDED"
    logs = cli(capsys, "logs", submission_id, "--address", ray_head.address)
    assert re.search(r"^job submitted-[0-9a-f]+: 20 rows", logs, re.MULTILINE), logs[-3000:]
    assert cli(capsys, "logs", submission_id, "--address", ray_head.address, "--follow") == logs
    assert _client(ray_head.address).get_job_info(submission_id).metadata["qwen_batch_job"] == "submitted"
    table = pq.read_table(tmp_path / "output")
    assert table.num_rows == 20
    assert sorted(table.column("id").to_pylist()) == [f"r{i:05d}" for i in range(20)]
    assert set(table.column("finish_reason").to_pylist()) <= {"length", "stop"}
    assert "had already ended" in cli(capsys, "stop", submission_id, "--address", ray_head.address)


# What names a process of a job on the head: its driver (the entrypoint) and the pipeline's stage workers.
JOB_PROCESS_NAMES = ("qwen_batch.jobs.cli run", "qwen-batch run", "ReadShard", "PromptStage", "EngineStage",
                     "WriteStage")


def job_processes(head: RayHead) -> list[str]:
    """Command lines of the head's processes still running a job's driver or one of its stages."""
    found = []
    for process in head.processes():
        try:
            command = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if any(name in command for name in JOB_PROCESS_NAMES):
            found.append(command)
    return found


def commit_records(output: Path) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted((output / "_commits").rglob("*.json"))]


@pytest.mark.engine
def test_plain_ray_job_submit_runs_the_console_script_and_a_stop_leaves_no_shard_half_written(
        ray_head: RayHead, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ray job submit --working-dir DIR -- qwen-batch run job.yaml` on a cluster that has qwen-batch installed, then
    `qwen-batch stop` once shards commit: every committed shard is whole."""
    spec = write_job(tmp_path, "plain-ray", 400, input={"rows_per_shard": 8}, sampling={"max_tokens": 32})
    working_dir = tmp_path / "job"
    working_dir.mkdir()
    shutil.copyfile(spec, working_dir / "job.yaml")
    submission_id = f"plain-ray-{secrets.token_hex(4)}"
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # the Ray CLI sends the token (RAY_AUTH_TOKEN_PATH) only then
    submitted = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head.address, "--submission-id", submission_id,
         "--working-dir", str(working_dir), "--no-wait", "--", "qwen-batch", "run", "job.yaml"],
        env=env, capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    output = tmp_path / "output"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not commit_records(output):
        status = job_status(ray_head.address, submission_id)
        assert status in ("PENDING", "RUNNING"), next(job_logs(ray_head.address, submission_id))[-3000:]
        assert time.monotonic() < deadline, "no shard committed in time"
        time.sleep(0.2)
    # Shards commit: the console script ran the job; its own lines are in the job's logs.
    assert _client(ray_head.address).get_job_info(submission_id).entrypoint == "qwen-batch run job.yaml"
    assert "Ray and vLLM output of this run: " in next(job_logs(ray_head.address, submission_id))
    assert "stopping" in cli(capsys, "stop", submission_id, "--address", ray_head.address)
    assert wait_job(ray_head.address, submission_id, timeout_s=120, poll_s=0.5) == "STOPPED"
    # The stopped job's driver and stage workers may still be winding down: wait until none is left to write.
    quiet_deadline = time.monotonic() + 60
    while running := job_processes(ray_head):
        assert time.monotonic() < quiet_deadline, f"the job's processes outlived its stop: {running}"
        time.sleep(0.2)

    records = commit_records(output)
    shards = 400 // 8
    assert 0 < len(records) < shards, f"{len(records)} of {shards} shards committed: the stop came too late"
    for record in records:
        if record["data_file"] is None:  # a shard none of whose rows this model answers
            assert record["row_count"] == 0
            continue
        data_file = output / record["data_file"]
        assert data_file.is_file(), f"commit {record['shard_id']} names {data_file}, which does not exist"
        assert pq.read_metadata(data_file).num_rows == record["row_count"]
        assert pq.read_table(data_file).num_rows == record["row_count"]
    data_files = {path for path in output.rglob("part-*.parquet")}
    print(f"stopped job: {len(records)} of {shards} shards committed, "
          f"{len(data_files) - len(records)} uncommitted data file(s) left", file=sys.stderr)
    assert not (output / "_manifest.json").exists()
