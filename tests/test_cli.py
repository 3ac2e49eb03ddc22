"""The `qwen-batch` command line as scripts use it: --version, -q/-v, --json, exit statuses, `| head`, help, schema.

The Jobs API commands run here against a stand-in client; tests/test_submit.py runs them on a real Ray head node.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata, resources
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest
import yaml
from ray.job_submission import JobDetails, JobStatus, JobType

from qwen_batch.cluster.planner import GPU_TYPES
from qwen_batch.jobs import submit
from qwen_batch.jobs.cli import STATUS_EXIT_CODES, _parser, main
from qwen_batch.schemas.catalog import CATALOG

VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
ADDRESS = "http://head:8265"
NIGHT_MS = 1_764_295_200_000  # 2025-11-28T02:00:00Z


@pytest.fixture(autouse=True)
def root_log_level() -> Iterator[None]:
    """main() sets the root logger's level; put it back for the other tests."""
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)


def write_job(folder: Path, **model: Any) -> Path:
    """Ten JSONL reviews in two shards and a spec for a catalog variant (not downloaded: nothing here runs it)."""
    (folder / "input").mkdir()
    (folder / "input" / "reviews.jsonl").write_text(
        "".join(json.dumps({"review_id": f"r{i}", "text": f"review {i}"}) + "\n" for i in range(10)))
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump({
        "name": "reviews",
        "input": {"path": str(folder / "input"), "format": "jsonl", "id_column": "review_id", "rows_per_shard": 5},
        "prompt": {"template": "Review: {text}"},
        "model": {"variant": "qwen2.5-0.5b-instruct", "max_model_len": 512, **model},
        "sampling": {"max_tokens": 8},
        "output": {"path": str(folder / "output")},
    }))
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`qwen-batch ARGV` in-process: exit status, stdout, stderr (a SystemExit, as from --help, gives its code)."""
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def command_names() -> list[str]:
    subcommands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(subcommands.choices)


# --version, -q and -v


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "--version") == (0, f"qwen-batch {metadata.version('qwen-batch')}\n", "")


@pytest.mark.parametrize(("argv", "level"), [
    (["models"], logging.INFO),
    (["-q", "models"], logging.WARNING), (["models", "-q"], logging.WARNING), (["models", "--quiet"], logging.WARNING),
    (["-v", "models"], logging.DEBUG), (["models", "-v"], logging.DEBUG), (["--verbose", "models"], logging.DEBUG),
])
def test_quiet_and_verbose_set_the_log_level_before_or_after_the_command(
        capsys: pytest.CaptureFixture[str], argv: list[str], level: int) -> None:
    assert run_cli(capsys, *argv)[0] == 0
    assert logging.getLogger().level == level


@pytest.mark.parametrize("name", command_names())
def test_every_command_takes_quiet_and_verbose(capsys: pytest.CaptureFixture[str], name: str) -> None:
    for flag in ("-q", "-v"):
        code, out, _ = run_cli(capsys, name, flag, "--help")
        assert code == 0 and "-q, --quiet" in out and "-v, --verbose" in out


# Help


def test_help_shows_defaults_and_the_gpu_types(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "plan", "--help")
    text = " ".join(out.split())
    assert code == 0
    for name in GPU_TYPES:
        assert name in text
    assert "(default: h100-80gb)" in text and "(default: 8)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_help_imports_neither_ray_nor_vllm() -> None:
    script = ("import sys\nfrom qwen_batch.jobs.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
              "    pass\nprint(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'vllm', 'torch')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


def test_status_help_documents_each_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "status", "--help")
    text = " ".join(out.split())
    assert code == 0
    for status, exit_code in STATUS_EXIT_CODES.items():
        assert f"{exit_code} {status}" in text or f"{exit_code} PENDING or {status}" in text, status


# --json


def test_models_json_is_the_catalog(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "models", "--json")
    assert code == 0
    assert [variant["name"] for variant in json.loads(out)] == list(CATALOG)
    assert run_cli(capsys, "models")[1].splitlines()[1].startswith(next(iter(CATALOG)))


def test_validate_shows_the_plan_as_text_or_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = write_job(tmp_path)
    code, out, _ = run_cli(capsys, "validate", str(job))
    assert code == 0
    assert out.startswith("job reviews-") and "10 rows in 2 shards from 1 input file(s)" in out
    assert "qwen2.5-0.5b-instruct: qwen2.5-0.5b-instruct from Qwen/Qwen2.5-0.5B-Instruct" in out

    code, out, _ = run_cli(capsys, "validate", str(job), "--json")
    shown = json.loads(out)
    assert code == 0
    assert shown["rows"] == 10 and shown["shards"] == 2 and shown["output"] == str(tmp_path / "output")
    assert shown["models"][0]["shards_to_run"] == 2


def test_plan_json_holds_the_gpu_plan_and_the_estimate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = write_job(tmp_path)
    code, out, err = run_cli(capsys, "plan", str(job), "--gpu-type", "l4-24gb", "--gpus", "2", "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert shown["gpu"]["name"] == "l4-24gb" and shown["gpus"] == 2 and shown["rows"] == 10
    [model] = shown["models"]
    assert model["gpu_plan"]["variant"] == "qwen2.5-0.5b-instruct"
    assert model["gpu_plan"]["tensor_parallel_size"] * model["gpu_plan"]["replicas"] <= 2
    assert model["rows_sampled"] == 10 and model["prompt_tokens_per_row"] > 0
    assert model["run"]["hours"] > 0 and model["max_tokens"] == 8

    code, out, _ = run_cli(capsys, "plan", str(job), "--gpu-type", "l4-24gb", "--gpus", "2")
    assert code == 0 and "tensor_parallel_size" in out and "cost: $" in out


def test_plan_names_the_gpu_type_meant(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "plan", str(write_job(tmp_path)), "--gpu-type", "h100-80g", "--json")
    assert (code, out) == (2, "")
    assert "--gpu-type: found 'h100-80g'; expected one of h100-80gb, " in err and "did you mean 'h100-80gb'?" in err


def test_run_json_prints_only_the_manifest(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the run prints, from Python or straight to file descriptor 1 (as Ray's workers do), goes to stderr."""
    def run_job(spec: Any, address: str | None, overwrite: bool, verbose: bool) -> Any:
        print("a line printed by the run")
        os.write(1, b"a line written to fd 1\n")
        return SimpleNamespace(
            complete=False, model_dump=lambda mode: {"job_id": spec.name, "complete": False}, job_id=spec.name,
            rows_in=10, rows_ok=5, rows_failed=0, shards=1, output_path="out", wall_seconds=1.0,
            output_tokens_per_s=1.0, list_price_cost_usd=0.0, compute_cost_usd=0.0, accelerator_seconds=1.0,
            accelerator_hour_usd=2.5, totals=SimpleNamespace(prompt_tokens=1, completion_tokens=1),
            error_limit_exceeded=False, error_rate=0.0, stopped=None)

    monkeypatch.setattr("qwen_batch.jobs.driver.run_job", run_job)
    capfd.readouterr()
    assert main(["run", str(write_job(tmp_path)), "--json"]) == 1
    out, err = capfd.readouterr()
    assert json.loads(out) == {"job_id": "reviews", "complete": False}
    assert "a line printed by the run\n" in err and "a line written to fd 1\n" in err


# `| head`: no BrokenPipeError traceback


@pytest.mark.parametrize("command", ["models", "validate"])
def test_a_closed_stdout_ends_quietly(tmp_path: Path, command: str) -> None:
    """As `qwen-batch validate job.yaml | head -1` once head has exited: stdout is a pipe nobody reads."""
    argv = [command] if command == "models" else [command, str(write_job(tmp_path))]
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([str(VENV_BIN / "qwen-batch"), *argv], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr
    assert "Exception ignored" not in done.stderr


# Spec problems, all in one pass


def test_validate_reports_every_spec_problem_at_once_with_what_was_meant(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    job = write_job(tmp_path, variant="qwen2.5-7b-instrct", dtpye="bfloat16")
    raw = yaml.safe_load(job.read_text())
    raw["input"]["format"] = "jsonlines"
    raw["promt"] = raw.pop("prompt")
    job.write_text(yaml.safe_dump(raw))

    code, out, err = run_cli(capsys, "validate", str(job))
    assert (code, out) == (2, "")
    problems = [line.removeprefix("- ") for line in err.splitlines()[1:]]
    assert sorted(problem.split(":")[0] for problem in problems) == [
        "input.format", "model.dtpye", "model.variant", "promt"]
    assert "input.format: found 'jsonlines'; Input should be 'parquet', 'jsonl', 'csv' or 'openai-batch'; did you " \
           "mean 'jsonl'?" in problems
    assert "model.dtpye: unknown field; did you mean `dtype`? Else remove it or check its spelling against the spec " \
           "reference in README.md" in problems
    assert any(problem.startswith("promt: unknown field; did you mean `prompt`?") for problem in problems)
    assert any(problem.startswith("model.variant: found 'qwen2.5-7b-instrct'; it is not in the catalog. Closest: "
                                  "qwen2.5-7b-instruct") for problem in problems)


def test_an_unknown_field_without_a_close_name_lists_the_fields(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    job = write_job(tmp_path)
    raw = yaml.safe_load(job.read_text())
    raw["output"]["bucket"] = "b"
    job.write_text(yaml.safe_dump(raw))
    assert "output.bucket: unknown field; the fields here are path, format, storage_options, shared; remove it" in \
        run_cli(capsys, "validate", str(job))[2]


# The JSON Schema


def test_the_committed_schema_is_the_spec_models(capsys: pytest.CaptureFixture[str]) -> None:
    committed = resources.files("qwen_batch.schemas").joinpath("job-spec.schema.json").read_text()
    code, out, _ = run_cli(capsys, "schema")
    assert code == 0
    assert out == committed, ("schemas/job-spec.schema.json is out of date with the spec models; regenerate it: "
                              "qwen-batch schema > schemas/job-spec.schema.json")


def test_the_schema_ships_with_the_package() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "job-spec.schema.json" in package_data["qwen_batch.schemas"]


def test_the_schema_accepts_a_spec_and_refuses_a_misspelt_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    schema = json.loads(run_cli(capsys, "schema")[1])
    raw = yaml.safe_load(write_job(tmp_path).read_text())
    jsonschema.validate(raw, schema)
    raw["model"]["varaint"] = raw["model"].pop("variant")
    with pytest.raises(jsonschema.ValidationError, match="'varaint' was unexpected"):
        jsonschema.validate(raw, schema)


# The Jobs API: status, list, submit --submission-id


class FakeJobsApi:
    """Stands in for Ray's JobSubmissionClient: the jobs it holds, and what was submitted to it."""

    def __init__(self, *jobs: JobDetails) -> None:
        self.jobs = {job.submission_id: job for job in jobs}
        self.submitted: list[dict[str, Any]] = []

    def get_job_info(self, submission_id: str) -> JobDetails:
        if submission_id not in self.jobs:
            raise RuntimeError(f"Request failed with status code 404: Job {submission_id} does not exist.")
        return self.jobs[submission_id]

    def list_jobs(self) -> list[JobDetails]:
        return list(self.jobs.values())

    def submit_job(self, **arguments: Any) -> str:
        self.submitted.append(arguments)
        return arguments["submission_id"] or "raysubmit_new"


def job_details(submission_id: str, status: str, name: str | None = "reviews") -> JobDetails:
    return JobDetails(type=JobType.SUBMISSION, submission_id=submission_id, status=JobStatus(status), entrypoint="x",
                      message=f"Job is {status.lower()}.", metadata={"qwen_batch_job": name} if name else {},
                      start_time=NIGHT_MS, end_time=NIGHT_MS + 90_000 if status in ("SUCCEEDED", "FAILED") else None)


@pytest.fixture
def jobs_api(monkeypatch: pytest.MonkeyPatch) -> FakeJobsApi:
    api = FakeJobsApi()
    monkeypatch.setattr(submit, "_client", lambda address: api)
    return api


@pytest.mark.parametrize(("status", "exit_code"), [("SUCCEEDED", 0), ("FAILED", 1), ("STOPPED", 3), ("PENDING", 4),
                                                   ("RUNNING", 4)])
def test_status_exits_with_the_jobs_status(jobs_api: FakeJobsApi, capsys: pytest.CaptureFixture[str], status: str,
                                           exit_code: int) -> None:
    jobs_api.jobs["raysubmit_1"] = job_details("raysubmit_1", status)
    assert run_cli(capsys, "status", "raysubmit_1", "--address", ADDRESS) == (exit_code, f"{status}\n", "")
    code, out, _ = run_cli(capsys, "status", "raysubmit_1", "--address", ADDRESS, "--json")
    assert code == exit_code
    assert json.loads(out) == {
        "submission_id": "raysubmit_1", "name": "reviews", "status": status, "message": f"Job is {status.lower()}.",
        "start_time": "2025-11-28T02:00:00+00:00",
        "end_time": "2025-11-28T02:01:30+00:00" if status in ("SUCCEEDED", "FAILED") else None}


def test_status_of_an_unknown_job_is_a_jobs_api_error(jobs_api: FakeJobsApi,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "status", "raysubmit_gone", "--address", ADDRESS, "--json")
    assert (code, out) == (5, "")
    assert err == "qwen-batch status: Request failed with status code 404: Job raysubmit_gone does not exist.\n"


def test_an_unreachable_cluster_is_exit_5_and_no_address_is_exit_2(capsys: pytest.CaptureFixture[str],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = run_cli(capsys, "status", "raysubmit_1", "--address", "http://127.0.0.1:9")
    assert (code, out) == (5, "") and "cannot reach the Ray Jobs API at http://127.0.0.1:9" in err
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, _, err = run_cli(capsys, "list")
    assert code == 2 and "no cluster address; pass --address http://HEAD:8265 or set RAY_ADDRESS" in err


def test_list_shows_only_qwen_batch_jobs_oldest_first(jobs_api: FakeJobsApi,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    later = job_details("raysubmit_2", "RUNNING", name="events-20251129")
    later.start_time = NIGHT_MS + 86_400_000
    for job in (later, job_details("raysubmit_1", "SUCCEEDED"), job_details("raysubmit_other", "RUNNING", name=None)):
        jobs_api.jobs[job.submission_id] = job

    code, out, _ = run_cli(capsys, "list", "--address", ADDRESS, "--json")
    assert code == 0
    assert [(job["submission_id"], job["name"], job["status"]) for job in json.loads(out)] == [
        ("raysubmit_1", "reviews", "SUCCEEDED"), ("raysubmit_2", "events-20251129", "RUNNING")]

    code, out, _ = run_cli(capsys, "list", "--address", ADDRESS)
    header, first, second = out.splitlines()
    assert code == 0 and header.split() == ["submission", "id", "job", "status", "started", "ended"]
    assert first.split() == ["raysubmit_1", "reviews", "SUCCEEDED", "2025-11-28T02:00:00+00:00",
                             "2025-11-28T02:01:30+00:00"]
    assert second.split() == ["raysubmit_2", "events-20251129", "RUNNING", "2025-11-29T02:00:00+00:00", "-"]


def test_submit_passes_the_submission_id(jobs_api: FakeJobsApi, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "submit", str(write_job(tmp_path)), "--address", ADDRESS, "--submission-id",
                   "reviews-20251128")[:2] == (0, "reviews-20251128\n")
    [submitted] = jobs_api.submitted
    assert submitted["submission_id"] == "reviews-20251128" and submitted["metadata"] == {"qwen_batch_job": "reviews"}


def test_a_retried_submit_submits_nothing(jobs_api: FakeJobsApi, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          caplog: pytest.LogCaptureFixture) -> None:
    jobs_api.jobs["reviews-20251128"] = job_details("reviews-20251128", "RUNNING")
    code, out, _ = run_cli(capsys, "submit", str(write_job(tmp_path)), "--address", ADDRESS, "--submission-id",
                           "reviews-20251128")
    assert (code, out) == (0, "reviews-20251128\n")
    assert "job reviews-20251128 (reviews) is on the cluster already, RUNNING; not submitting it again" in caplog.text
    assert jobs_api.submitted == []


def test_a_submission_id_taken_by_another_job_is_refused(jobs_api: FakeJobsApi, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    jobs_api.jobs["nightly"] = job_details("nightly", "SUCCEEDED", name="events")
    code, out, err = run_cli(capsys, "submit", str(write_job(tmp_path)), "--address", ADDRESS, "--submission-id",
                             "nightly")
    assert (code, out) == (2, "")
    assert ("submission id 'nightly' is taken on the cluster by job 'events', not by this spec's 'reviews'; give this "
            "job an id of its own") in err
    assert jobs_api.submitted == []


def test_run_on_an_address_where_nothing_listens_fails_at_once_naming_it(tmp_path: Path) -> None:
    """Not minutes of Ray's reconnecting: a probe of the address first. In a process of its own, since a run in one
    already connected to Ray (as this one may be, by other tests) uses that connection."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"  # closed again: nothing listens there
    done = subprocess.run([sys.executable, "-m", "qwen_batch.jobs.cli", "run", str(write_job(tmp_path)), "--address",
                           address], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (2, "")
    assert f"Ray at {address}: nothing answers there" in done.stderr
    assert "leave out --address and RAY_ADDRESS" in done.stderr
