"""Jobs on a separate Ray cluster (`ray start --head`, token auth on) driven only through the Jobs API and the CLI:
`qwen-batch submit/status/logs/stop`, the plain `ray job submit` path, and a stop that leaves no shard half-written."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from qwen_batch.jobs.cli import main
from qwen_batch.jobs.submit import METADATA_KEY, _client, _runtime_env, job_logs, job_status, submit_job, wait_job
from qwen_batch.schemas.errors import SpecError

VENV_BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 300


@dataclass(frozen=True)
class Cluster:
    """A running head node: its Jobs API address and the file holding its auth token."""

    address: str
    token_file: Path


def free_ports(count: int) -> list[int]:
    """Ports free on loopback right now, all different."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def processes_of(session_id: int, temp_dir: str) -> set[psutil.Process]:
    """Every process the head node started: its session (`ray start` ran in a new one), whatever runs in or names
    its temp dir, and all their descendants (job drivers run in sessions of their own)."""
    found: set[psutil.Process] = set()
    for process in psutil.process_iter(["cmdline"]):
        try:
            if (os.getsid(process.pid) == session_id or temp_dir in " ".join(process.info["cmdline"] or [])
                    or process.cwd().startswith(temp_dir)):
                found.add(process)
        except (psutil.Error, OSError):
            continue
    for process in list(found):
        try:
            found.update(process.children(recursive=True))
        except psutil.Error:
            continue
    found.discard(psutil.Process())
    return found


def stop_processes(processes: set[psutil.Process]) -> None:
    for process in processes:
        try:
            process.terminate()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(processes, timeout=5)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture(scope="module")
def cluster(s3: Any, tiny_models: dict[str, Path]) -> Iterator[Cluster]:
    """A head node of its own with token auth, started after the S3 variables, private caches and tiny models are
    in place (it inherits os.environ), with the venv first on PATH as if it were activated.

    Not `ray stop --force` at the end: that kills every Ray process on the machine, the session's `ray_local` and
    other users' clusters included. Only the processes this head node started are stopped.
    """
    temp_dir = tempfile.mkdtemp(prefix="qbr", dir="/tmp")  # short: Ray's unix socket paths must fit in 107 bytes
    token_file = Path(temp_dir) / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    gcs_port, dashboard_port, client_port, agent_port = free_ports(4)
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token_file)}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    start = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port), "--include-dashboard", "true",
         "--ray-client-server-port", str(client_port), "--dashboard-agent-listen-port", str(agent_port),
         "--num-cpus", "2", "--object-store-memory", str(256 << 20), "--temp-dir", temp_dir,
         "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = start.communicate(timeout=120)
        assert start.returncode == 0, f"ray start failed:\n{output}"
        address = f"http://127.0.0.1:{dashboard_port}"
        with pytest.MonkeyPatch.context() as environment:
            environment.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
            environment.delenv("RAY_AUTH_TOKEN", raising=False)
            environment.delenv("RAY_ADDRESS", raising=False)
            deadline = time.monotonic() + 60
            while True:
                try:
                    _client(address).list_jobs()
                    break
                except ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1)
            yield Cluster(address, token_file)
    finally:
        stop_processes(processes_of(start.pid, temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)


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


@pytest.mark.engine
@pytest.mark.s3
def test_jobs_api_names_the_token_sources_when_no_token_is_found(cluster: Cluster, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConnectionError, match="requires token authentication and no token was found here") as error:
        job_status(cluster.address, "raysubmit_none")
    assert cluster.token_file.read_text() not in str(error.value)


@pytest.mark.engine
@pytest.mark.s3
def test_submit_ships_the_project_packages_as_py_modules(cluster: Cluster, tmp_path: Path) -> None:
    """The job imports our packages from the uploaded copies, not from an install on the cluster."""
    (tmp_path / "job.yaml").write_text("{}")
    (tmp_path / "staged").mkdir()
    client = _client(cluster.address)
    submission_id = client.submit_job(
        entrypoint="python -c 'from qwen_batch import jobs, pipelines, cluster, schemas; "
                   "print(*(m.__path__[0] for m in (jobs, pipelines, cluster, schemas)), sep=chr(10))'",
        runtime_env=_runtime_env(str(tmp_path / "staged"), str(tmp_path / "job.yaml")))
    assert wait_job(cluster.address, submission_id, timeout_s=120, poll_s=0.5) == "SUCCEEDED"
    logs = client.get_job_logs(submission_id)
    for package in ("jobs", "pipelines", "cluster", "schemas"):
        assert re.search(rf"^/.*/runtime_resources/py_modules_files/_ray_pkg_[0-9a-f]+/qwen_batch/{package}$", logs,
                         re.MULTILINE), logs


@pytest.mark.engine
@pytest.mark.s3
def test_list_shows_the_qwen_batch_jobs_and_status_exits_with_their_state(cluster: Cluster,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`list` shows the jobs with qwen-batch's metadata, not the cluster's others; `status` exits 0 or 1 for them."""
    client = _client(cluster.address)
    ours = client.submit_job(entrypoint="echo listed", metadata={METADATA_KEY: "listed"})
    failed = client.submit_job(entrypoint="exit 7", metadata={METADATA_KEY: "failing"})
    other = client.submit_job(entrypoint="echo not ours")
    assert [wait_job(cluster.address, job, timeout_s=120, poll_s=0.5) for job in (ours, failed, other)] == [
        "SUCCEEDED", "FAILED", "SUCCEEDED"]

    listed = {job["submission_id"]: job for job in json.loads(cli(capsys, "list", "--address", cluster.address,
                                                                  "--json"))}
    assert other not in listed
    assert (listed[ours]["name"], listed[ours]["status"]) == ("listed", "SUCCEEDED")
    assert (listed[failed]["name"], listed[failed]["status"]) == ("failing", "FAILED")
    assert listed[ours]["start_time"] <= listed[ours]["end_time"]
    table = cli(capsys, "list", "--address", cluster.address)
    assert re.search(rf"^{ours}\s+listed\s+SUCCEEDED\s+\d{{4}}-\d\d-\d\dT", table, re.MULTILINE), table
    assert other not in table

    assert json.loads(cli(capsys, "status", ours, "--address", cluster.address, "--json"))["status"] == "SUCCEEDED"
    assert main(["status", failed, "--address", cluster.address]) == 1
    assert capsys.readouterr().out == "FAILED\n"


@pytest.mark.engine
@pytest.mark.s3
def test_a_retried_submit_with_its_submission_id_submits_nothing(cluster: Cluster, tmp_path: Path) -> None:
    """A retried Airflow task: the first try's job exists under the id, so the retry prints it and submits nothing."""
    spec = write_job(tmp_path, "retried", 2)
    submission_id = f"retried-{secrets.token_hex(4)}"
    client = _client(cluster.address)
    client.submit_job(entrypoint="echo first try", submission_id=submission_id, metadata={METADATA_KEY: "retried"})
    jobs_before = len(client.list_jobs())

    retried = subprocess.run([str(VENV_BIN / "qwen-batch"), "submit", str(spec), "--address", cluster.address,
                              "--submission-id", submission_id], capture_output=True, text=True, timeout=120)

    assert retried.returncode == 0, retried.stderr
    assert retried.stdout == f"{submission_id}\n"
    assert f"job {submission_id} (retried) is on the cluster already" in retried.stderr
    assert "not submitting it again" in retried.stderr
    assert len(client.list_jobs()) == jobs_before
    assert wait_job(cluster.address, submission_id, timeout_s=120, poll_s=0.5) == "SUCCEEDED"
    assert "first try" in next(job_logs(cluster.address, submission_id))


@pytest.mark.engine
@pytest.mark.s3
def test_submitted_job_succeeds_with_logs_and_output(cluster: Cluster, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`qwen-batch submit --wait` as a user runs it, the token in RAY_AUTH_TOKEN; then status, logs, output."""
    spec = write_job(tmp_path, "submitted", 20)
    token = cluster.token_file.read_text()
    env = {**os.environ, "RAY_AUTH_TOKEN": token}
    env.pop("RAY_AUTH_TOKEN_PATH")
    started = time.monotonic()
    submitted = subprocess.run([str(VENV_BIN / "qwen-batch"), "submit", str(spec), "--address", cluster.address,
                                "--wait"], env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    print(f"submitted job: exit {submitted.returncode} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    assert submitted.returncode == 0, submitted.stderr[-5000:]
    submission_id = submitted.stdout.strip()
    assert re.fullmatch(r"raysubmit_\w+", submission_id), submitted.stdout
    assert re.search(r"^job submitted-[0-9a-f]+: 20 rows", submitted.stderr, re.MULTILINE), submitted.stderr[-3000:]
    assert submitted.stderr.rstrip().endswith(f"job {submission_id}: SUCCEEDED")
    assert token not in submitted.stdout + submitted.stderr

    assert cli(capsys, "status", submission_id, "--address", cluster.address).strip() == "SUCCEEDED"
    logs = cli(capsys, "logs", submission_id, "--address", cluster.address)
    assert re.search(r"^job submitted-[0-9a-f]+: 20 rows", logs, re.MULTILINE), logs[-3000:]
    assert cli(capsys, "logs", submission_id, "--address", cluster.address, "--follow") == logs
    assert _client(cluster.address).get_job_info(submission_id).metadata["qwen_batch_job"] == "submitted"
    table = pq.read_table(tmp_path / "output")
    assert table.num_rows == 20
    assert sorted(table.column("id").to_pylist()) == [f"r{i:05d}" for i in range(20)]
    assert set(table.column("finish_reason").to_pylist()) <= {"length", "stop"}
    assert "had already ended" in cli(capsys, "stop", submission_id, "--address", cluster.address)


@pytest.mark.engine
@pytest.mark.s3
def test_plain_ray_job_submit_runs_the_console_script(cluster: Cluster, tmp_path: Path) -> None:
    """`ray job submit --working-dir DIR -- qwen-batch run job.yaml` on a cluster that has qwen-batch installed."""
    spec = write_job(tmp_path, "plain-ray", 20)
    working_dir = tmp_path / "job"
    working_dir.mkdir()
    shutil.copyfile(spec, working_dir / "job.yaml")
    submission_id = f"plain-ray-{secrets.token_hex(4)}"
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # the Ray CLI sends the token (RAY_AUTH_TOKEN_PATH) only then
    submitted = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.address, "--submission-id", submission_id,
         "--working-dir", str(working_dir), "--no-wait", "--", "qwen-batch", "run", "job.yaml"],
        env=env, capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert wait_job(cluster.address, submission_id, timeout_s=JOB_TIMEOUT_S) == "SUCCEEDED", \
        next(job_logs(cluster.address, submission_id))[-3000:]
    assert re.search(r"^job plain-ray-[0-9a-f]+: 20 rows", next(job_logs(cluster.address, submission_id)),
                     re.MULTILINE)
    assert pq.read_table(tmp_path / "output").num_rows == 20


def commit_records(output: Path) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted((output / "_commits").rglob("*.json"))]


def listing(output: Path) -> dict[str, int]:
    return {str(path): path.stat().st_size for path in output.rglob("*") if path.is_file()}


@pytest.mark.engine
@pytest.mark.s3
def test_stop_leaves_no_committed_shard_half_written(cluster: Cluster, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_job(tmp_path, "stopped", 400, input={"rows_per_shard": 8}, sampling={"max_tokens": 32})
    output = tmp_path / "output"
    submission_id = cli(capsys, "submit", str(spec), "--address", cluster.address).strip()
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not commit_records(output):
        status = job_status(cluster.address, submission_id)
        assert status in ("PENDING", "RUNNING"), next(job_logs(cluster.address, submission_id))[-3000:]
        assert time.monotonic() < deadline, "no shard committed in time"
        time.sleep(0.2)
    assert "stopping" in cli(capsys, "stop", submission_id, "--address", cluster.address)
    assert wait_job(cluster.address, submission_id, timeout_s=120, poll_s=0.5) == "STOPPED"
    quiet_deadline, before = time.monotonic() + 60, None
    while (now := listing(output)) != before:  # the job's workers may still be winding down
        assert time.monotonic() < quiet_deadline, "the output folder kept changing after the job stopped"
        before = now
        time.sleep(3)

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
