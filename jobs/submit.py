"""Run jobs on a Ray cluster through the Ray Jobs API: ship the spec and this project's code, follow, stop.

The job runs `python -m qwen_batch.jobs.cli run job.yaml` on the head node, in a `runtime_env` whose `working_dir` holds only the
spec (as `job.yaml`) and whose one `py_modules` entry is this project's `qwen_batch` namespace (`jobs`, `pipelines`,
`cluster`, `schemas`),
so the cluster runs the code of the machine that submits, whether or not it has qwen-batch installed. The cluster
must already have Ray (same version) and vLLM with qwen-batch's dependencies; nothing is pip-installed per job.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwen_batch.schemas.errors import SpecError

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

    from qwen_batch.schemas.spec import JobSpec

__all__ = ["SubmittedJob", "job_info", "job_logs", "job_status", "list_jobs", "stop_job", "submit_job", "wait_job"]

log = logging.getLogger(__name__)

NAMESPACE = "qwen_batch"
PROJECT_PACKAGES = ("jobs", "pipelines", "cluster", "schemas")
SPEC_NAME = "job.yaml"
METADATA_KEY = "qwen_batch_job"
TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


@dataclass(frozen=True)
class SubmittedJob:
    """A job on the cluster, as the Jobs API reports it."""

    submission_id: str
    name: str | None  # the spec's name, from the metadata `submit_job` sets; None for jobs submitted otherwise
    status: str  # PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED
    message: str | None  # Ray's account of the status, e.g. why it failed
    start_time: str | None  # ISO 8601, UTC
    end_time: str | None  # when it reached STOPPED, SUCCEEDED or FAILED

    @classmethod
    def of(cls, details: JobDetails) -> SubmittedJob:
        """From the Jobs API's JobDetails."""
        return cls(submission_id=str(details.submission_id), name=(details.metadata or {}).get(METADATA_KEY),
                   status=str(details.status.value), message=details.message, start_time=_utc(details.start_time),
                   end_time=_utc(details.end_time))


def _utc(epoch_ms: int | None) -> str | None:
    """A Jobs API time, milliseconds since the epoch, as ISO 8601 in UTC."""
    if epoch_ms is None:
        return None
    return datetime.fromtimestamp(epoch_ms / 1000, timezone.utc).isoformat(timespec="seconds")


def submit_job(spec_path: str, address: str, *, extra_args: list[str] | None = None, wait: bool = False,
               python: str = "python", logical_date: datetime | None = None, submission_id: str | None = None) -> str:
    """Submit a spec to the cluster whose dashboard is at `address` (`http://HEAD:8265`); return the submission id.

    `extra_args` are appended to `qwen-batch run` (e.g. `["--overwrite"]`). `python` is the interpreter the
    entrypoint runs with on the head node: the default `python` must resolve, on the PATH the cluster was started
    with, to the environment that has Ray and vLLM (true in Ray's images and KubeRay); else give its full path.
    With `wait`, return only when the job has ended, raising RuntimeError unless it SUCCEEDED. The logical date
    (`logical_date`, else QWEN_BATCH_LOGICAL_DATE here) goes to `run` as `--logical-date`, since the cluster does
    not share this machine's environment.

    With `submission_id`, submitting is idempotent: when the cluster already has a job of that id and spec name (a
    retried scheduler task), nothing is submitted and that job's id is returned; an id taken by another job is a
    SpecError.
    """
    from qwen_batch.schemas.spec import load_spec, logical_date_from_env

    logical_date = logical_date or logical_date_from_env()
    spec = load_spec(spec_path, logical_date)
    _check_reachable_paths(spec_path, {"input.path": spec.input.path, "output.path": spec.output.path})
    _check_no_secrets(spec)
    dated = ["--logical-date", logical_date.isoformat()] if logical_date else []
    entrypoint = shlex.join([python, "-m", "qwen_batch.jobs.cli", "run", SPEC_NAME, *dated, *(extra_args or [])])
    client = _client(address)
    if submission_id is None or not _already_submitted(client, submission_id, spec.name):
        with tempfile.TemporaryDirectory(prefix="qwen-batch-submit-") as folder:
            submission_id = client.submit_job(entrypoint=entrypoint, runtime_env=_runtime_env(folder, spec_path),
                                              metadata={METADATA_KEY: spec.name}, submission_id=submission_id)
    if wait:
        status = wait_job(address, submission_id)
        if status != "SUCCEEDED":
            raise RuntimeError(f"job {submission_id} ended {status}; its logs: qwen-batch logs {submission_id} "
                               f"--address {address}")
    return submission_id


def wait_job(address: str, submission_id: str, *, timeout_s: float | None = None, poll_s: float = 2.0) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED and return that status; TimeoutError after `timeout_s`."""
    client = _client(address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while (status := str(client.get_job_status(submission_id).value)) not in TERMINAL_STATUSES:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {submission_id} is still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)
    return status


def job_status(address: str, submission_id: str) -> str:
    """The job's status: PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED."""
    return str(_client(address).get_job_status(submission_id).value)


def job_info(address: str, submission_id: str) -> SubmittedJob:
    """The job's name, status, message and times."""
    return SubmittedJob.of(_client(address).get_job_info(submission_id))


def list_jobs(address: str) -> list[SubmittedJob]:
    """The cluster's qwen-batch jobs (those `submit_job` submitted), oldest first."""
    jobs = [SubmittedJob.of(details) for details in _client(address).list_jobs()
            if details.submission_id and METADATA_KEY in (details.metadata or {})]
    return sorted(jobs, key=lambda job: job.start_time or "")


def job_logs(address: str, submission_id: str, follow: bool = False) -> Iterator[str]:
    """The job's driver output: all of it so far, or with `follow` chunk by chunk until the job ends."""
    client = _client(address)
    if not follow:
        yield client.get_job_logs(submission_id)
        return
    chunks = client.tail_job_logs(submission_id)
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(chunks.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(chunks.aclose())
        loop.close()


def stop_job(address: str, submission_id: str) -> bool:
    """Ask the cluster to stop the job (SIGTERM, then SIGKILL); False if it had already ended.

    Safe at any moment: a shard is committed only after its Parquet is fully written, so a stop leaves at most an
    uncommitted data file, which the next run of the spec overwrites.
    """
    return bool(_client(address).stop_job(submission_id))


def _already_submitted(client: JobSubmissionClient, submission_id: str, name: str) -> bool:
    """Whether the cluster has the job `submission_id` of spec `name` already; SpecError if another job has that id."""
    for details in client.list_jobs():
        if details.submission_id != submission_id:
            continue
        job = SubmittedJob.of(details)
        if job.name != name:
            submitted = f"job {job.name!r}" if job.name else "a job qwen-batch did not submit"
            raise SpecError(f"submission id {submission_id!r} is taken on the cluster by {submitted}, not by this "
                            f"spec's {name!r}; give this job an id of its own (e.g. its name and logical date)")
        log.info("job %s (%s) is on the cluster already, %s; not submitting it again", submission_id, name, job.status)
        return True
    return False


def _client(address: str) -> JobSubmissionClient:
    """A Jobs API client that sends the Ray auth token when one is configured here."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    headers = _auth_headers()
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError:
        found = "the token sent was refused" if headers else "no token was found here"
        raise ConnectionError(f"the Ray Jobs API at {address} requires token authentication and {found}. Set "
                              "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or put the cluster's token in "
                              "~/.ray/auth_token (`ray get-auth-token` on the head node prints it)") from None
    except ConnectionError as error:
        raise ConnectionError(f"cannot reach the Ray Jobs API at {address} ({error}); pass the dashboard address, "
                              "http://HEAD:8265, with --address or RAY_ADDRESS") from None


def _auth_headers() -> dict[str, str]:
    """`Authorization: Bearer <token>` from RAY_AUTH_TOKEN, the file at RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token.

    The same sources in the same order as Ray's own token loader. Ray's client sends that token only when
    RAY_AUTH_MODE=token is set in this process; an explicit header works without it and changes nothing global.
    """
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        try:
            token = path.read_text().strip()
        except OSError:
            if os.environ.get("RAY_AUTH_TOKEN_PATH"):
                raise ConnectionError(f"RAY_AUTH_TOKEN_PATH is {path}, which cannot be read; point it at the "
                                      "file holding the cluster's token") from None
    return {"Authorization": f"Bearer {token}"} if token else {}


def _runtime_env(folder: str, spec_path: str) -> dict[str, Any]:
    """The spec (copied into `folder/spec`) as working_dir; this project's packages (found wherever they are imported
    from: a checkout, an editable install or site-packages) copied into `folder/qwen_batch` and shipped as that one
    py_module, so the cluster imports them under the same names as here."""
    spec_folder, namespace = Path(folder) / "spec", Path(folder) / NAMESPACE
    spec_folder.mkdir()
    shutil.copyfile(spec_path, spec_folder / SPEC_NAME)
    for name in PROJECT_PACKAGES:
        shutil.copytree(importlib.import_module(f"{NAMESPACE}.{name}").__path__[0], namespace / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return {"working_dir": str(spec_folder), "py_modules": [str(namespace)], "excludes": ["__pycache__", "*.pyc"]}


def _check_no_secrets(spec: JobSpec) -> None:
    """The spec travels as the job's working_dir, which anyone who can reach the cluster's dashboard can download."""
    from qwen_batch.pipelines.storage import secret_fields

    secrets = secret_fields(spec.model_dump(mode="json", exclude_unset=True))
    if secrets:
        raise SpecError(f"{', '.join(secrets)}: `submit` uploads the spec to the cluster, where anyone who can reach "
                        "its dashboard can read it; give credentials (e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                        "HF_TOKEN) to the cluster's own environment instead (where `ray start` runs, or the Secret its "
                        "pods load), which the job inherits")


def _check_reachable_paths(spec_path: str, paths: dict[str, str]) -> None:
    """Relative local paths mean nothing on the cluster, where the job runs in a temporary working_dir."""
    relative = [f"{field}: found {path!r}, a relative local path" for field, path in paths.items()
                if "://" not in path and not Path(path).is_absolute()]
    if relative:
        raise SpecError([f"{problem}; on the cluster the job runs in a temporary folder, so give a location every "
                         f"node can reach (s3://, gs://, or an absolute path on a shared filesystem) in {spec_path}"
                         for problem in relative])
