"""Shared fixtures: a real S3 server (SeaweedFS) on loopback, private caches, tiny Qwen checkpoints, local Ray, and
a `ray start --head` with the Jobs API. Each is started once per session and stopped by pid at its end."""

from __future__ import annotations

import json
import os
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
import pytest

from processes import stop_processes  # tests/ is on sys.path: pytest puts conftest folders there
from s3server import S3Server

# Lines of the family job's input that fail before the engine: an empty text and a line that is not JSON.
FAMILY_BAD_LINES = ['{"rid": "bad-empty", "text": ""}', '{"rid": "bad-json", "text": ']
FAMILY_MODELS = ("tiny-qwen2", "qwen3-think", "qwen3-unbounded")

# What a fixture starts, as the marker a test using it (directly or through another fixture) gets.
FIXTURE_MARKERS = {"s3": "s3", "cluster": "cluster", "ray_head": "cluster", "reviews_job": "engine",
                   "family_job": "engine"}
VENV_BIN = Path(sys.executable).parent
HEAD_START_ATTEMPTS = 3


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by the services its fixtures start: the S3 server, a Ray cluster of its own (a module's
    `cluster` fixture, or the session's `ray_head`), the engines of the session's finished jobs."""
    for item in items:
        for marker in {FIXTURE_MARKERS[name] for name in getattr(item, "fixturenames", ()) if name in FIXTURE_MARKERS}:
            item.add_marker(marker)


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A running SeaweedFS S3 server with one bucket; the AWS_* client variables point at it for the session."""
    with S3Server(tmp_path_factory.mktemp("s3")) as server, pytest.MonkeyPatch.context() as environment:
        for name, value in server.env().items():
            environment.setenv(name, value)
        yield server


@pytest.fixture(scope="session", autouse=True)
def private_caches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep every cache (vLLM, torch, Hugging Face, our models and adapters) and the runs' log files inside the
    session's temp folder, offline; and every temp file the session's processes make (vLLM's IPC sockets and
    rendezvous files, the session folders of the Ray clusters that jobs start themselves) in a temp folder of its
    own, removed at the end. That one is short and under /tmp: Unix socket paths may not pass 107 bytes."""
    root = tmp_path_factory.mktemp("caches")
    temp = tempfile.mkdtemp(prefix="qb-tmp-", dir="/tmp")
    with pytest.MonkeyPatch.context() as environment:
        for name in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "XDG_CACHE_HOME", "HF_HOME", "QWEN_BATCH_MODEL_DIR",
                     "QWEN_BATCH_ADAPTER_CACHE", "QWEN_BATCH_LOG_DIR"):
            environment.setenv(name, str(root / name.lower()))
        environment.setenv("HF_HUB_OFFLINE", "1")
        environment.setenv("TMPDIR", temp)
        environment.setattr(tempfile, "tempdir", temp)  # this process read TMPDIR already
        yield
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_models(private_caches: None) -> dict[str, Path]:
    """The two tiny checkpoints, built where the catalog's `tiny-qwen2` / `tiny-qwen3` variants find them."""
    from qwen_batch.jobs.driver import model_dir
    from qwen_batch.jobs.tiny_model import make_tiny_model

    return {arch: make_tiny_model(arch, model_dir() / "qwen-batch" / f"tiny-{arch}") for arch in ("qwen2", "qwen3")}


@pytest.fixture(scope="session")
def ray_local(s3: S3Server, tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A local Ray cluster for the session (started after the S3 variables are set, so workers inherit them)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20,
             _temp_dir=str(tmp_path_factory.mktemp("ray")), log_to_driver=True)
    yield
    ray.shutdown()


@dataclass(frozen=True)
class FinishedJob:
    """A real job this session ran to its end: the spec it ran (a dict), its output folder, its manifest."""

    spec: dict[str, Any]
    output: Path
    manifest: Any  # qwen_batch.schemas.results.JobManifest


def run_finished_job(folder: Path, lines: list[str], rows_per_shard: int, **fields: Any) -> FinishedJob:
    """Run a tiny job over these JSONL lines (id column `rid`, template column `text`) in `folder`."""
    from qwen_batch.jobs.driver import run_job
    from qwen_batch.schemas.spec import load_spec

    (folder / "input").mkdir(parents=True)
    (folder / "input" / "rows.jsonl").write_text("".join(line + "\n" for line in lines))
    spec = {"input": {"path": str(folder / "input"), "format": "jsonl", "id_column": "rid",
                      "rows_per_shard": rows_per_shard}, "output": {"path": str(folder / "out")}, **fields}
    return FinishedJob(spec, folder / "out", run_job(load_spec(spec)))


@pytest.fixture(scope="session")
def reviews_job(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> FinishedJob:
    """One tiny-qwen2 job over 12 good rows in 3 shards, greedy, 8 tokens a row; for the tests that need a real
    job's output without errors (the report's, a stop string's rerun)."""
    words = ["great", "broken", "late", "perfect", "cheap", "solid", "noisy", "bright"]
    lines = [json.dumps({"rid": f"r{i:03d}", "text": " ".join(words[(i + k) % 8] for k in range(1 + i % 5))})
             for i in range(12)]
    return run_finished_job(
        tmp_path_factory.mktemp("reviews-job"), lines, 4, name="reviews",
        prompt={"system": "You label customer reviews.", "template": "Review: {text}\nIs it positive or negative?"},
        model={"variant": "tiny-qwen2", "max_model_len": 512}, sampling={"max_tokens": 8, "temperature": 0, "seed": 0})


@pytest.fixture(scope="session")
def family_job(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> FinishedJob:
    """One job of three models over every row (FAMILY_MODELS: Qwen2; Qwen3 thinking with a budget of 4 tokens;
    Qwen3 thinking without one), 7 good rows and FAMILY_BAD_LINES in shards of 5, 12 tokens a row; then run again,
    which recomputes nothing, so the manifest holds two runs. The fan-out tests and the report's read it."""
    lines = [json.dumps({"rid": f"r{i:03d}", "text": f"review number {i} says the thing is fine"}) for i in range(7)]
    models = [{"variant": "tiny-qwen2"},
              {"variant": "tiny-qwen3", "name": FAMILY_MODELS[1], "thinking": "on", "thinking_budget": 4},
              {"variant": "tiny-qwen3", "name": FAMILY_MODELS[2], "thinking": "on"}]
    job = run_finished_job(tmp_path_factory.mktemp("family-job"), [*lines, *FAMILY_BAD_LINES], 5, name="family",
                           prompt={"template": "Label this review: {text}"}, models=models,
                           sampling={"max_tokens": 12, "temperature": 0})
    from qwen_batch.jobs.driver import run_job
    from qwen_batch.schemas.spec import load_spec

    return FinishedJob(job.spec, job.output, run_job(load_spec(job.spec)))


@dataclass(frozen=True)
class RayHead:
    """A running `ray start --head`: its Jobs API address, the file holding its auth token, and what finds the
    processes it started (its session id and temp dir)."""

    address: str
    token_file: Path
    session_id: int
    temp_dir: str

    def processes(self) -> set[psutil.Process]:
        """Every process the head node started: its session (`ray start` ran in a new one), whatever runs in or
        names its temp dir, and all their descendants (job drivers run in sessions of their own)."""
        found: set[psutil.Process] = set()
        for process in psutil.process_iter(["cmdline"]):
            try:
                if (os.getsid(process.pid) == self.session_id or self.temp_dir in " ".join(process.info["cmdline"] or [])
                        or process.cwd().startswith(self.temp_dir)):
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


@pytest.fixture(scope="session")
def ray_head(s3: S3Server, tiny_models: dict[str, Path]) -> Iterator[RayHead]:
    """A head node of its own with token auth and the Jobs API, shared by the tests that submit to a cluster;
    started after the S3 variables, private caches and tiny models are in place (it inherits os.environ), with the
    venv first on PATH as if it were activated.

    Not `ray stop --force` at the end: that kills every Ray process on the machine, the session's `ray_local` and
    other users' clusters included. Only the processes this head node started are stopped.
    """
    from qwen_batch.jobs.submit import _client

    temp_dir = tempfile.mkdtemp(prefix="qbr", dir="/tmp")  # short: Ray's unix socket paths must fit in 107 bytes
    token_file = Path(temp_dir) / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token_file)}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    heads: list[RayHead] = []
    try:
        # `ray start` gives its raylet 30 s to register, which an overloaded machine can miss: a few tries.
        for attempt in range(HEAD_START_ATTEMPTS):
            gcs_port, dashboard_port, client_port, agent_port = free_ports(4)
            start = subprocess.Popen(
                [str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
                 "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port), "--include-dashboard",
                 "true", "--ray-client-server-port", str(client_port), "--dashboard-agent-listen-port",
                 str(agent_port), "--num-cpus", "2", "--object-store-memory", str(256 << 20), "--temp-dir", temp_dir,
                 "--disable-usage-stats"],
                env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            heads.append(head := RayHead(f"http://127.0.0.1:{dashboard_port}", token_file, start.pid, temp_dir))
            output, _ = start.communicate(timeout=120)
            if start.returncode == 0:
                break
            stop_processes(head.processes())
            assert attempt + 1 < HEAD_START_ATTEMPTS, f"ray start failed {HEAD_START_ATTEMPTS} times, the last:\n{output}"
        with pytest.MonkeyPatch.context() as environment:
            environment.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
            environment.delenv("RAY_AUTH_TOKEN", raising=False)
            environment.delenv("RAY_ADDRESS", raising=False)
            deadline = time.monotonic() + 60
            while True:
                try:
                    _client(head.address).list_jobs()
                    break
                except ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            yield head
    finally:
        for head in heads:
            stop_processes(head.processes())
        shutil.rmtree(temp_dir, ignore_errors=True)
