"""Tests for cluster.local.ray_output: Ray's and vLLM's output goes to the run's log file, the terminal keeps ours.

Each test runs a small driver in a subprocess, so that what reaches the real file descriptors 1 and 2 is what is
checked, the way a terminal would show it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qwen_batch.cluster.local import job_log_file

# A driver set up like the CLI's (a root handler on stderr at INFO), with Ray's printer of worker lines registered
# as ray.init(log_to_driver=True) registers it, writing every kind of output there is during a job.
FAKE_JOB = """
import functools, logging, os, sys, warnings
from pathlib import Path

from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
from ray._private.worker import print_to_stdstream

from qwen_batch.cluster.local import ray_output

logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
logging.getLogger().setLevel(logging.INFO)
dispatcher.add_handler("ray_print_logs", functools.partial(print_to_stdstream, ignore_prefix=False))
engine_line = {"ip": "10.0.0.1", "localhost": "10.0.0.1", "pid": 42, "job": "01", "is_err": False,
               "actor_name": "MapWorker(MapBatches(EngineStage))", "task_name": None,
               "lines": ["\\x1b[32mINFO\\x1b[0m 12-01 10:02:47 [core.py:133] Initializing a V1 LLM engine"]}
with ray_output(Path(sys.argv[1]), verbose=sys.argv[2] == "verbose"):
    logging.getLogger("qwen_batch.jobs.progress").info("tiny-qwen2  64/200 rows (32%)")
    logging.getLogger("qwen_batch.jobs.driver").warning("--overwrite: deleting 3 file(s)")
    logging.getLogger("ray").warning("Token authentication is enabled for this Ray cluster.")
    logging.getLogger("ray.data._internal.progress").warning("Progress bars disabled.")
    logging.getLogger("botocore.credentials").info("Found credentials in environment variables.")
    logging.getLogger("botocore.endpoint").error("a library's error")
    warnings.warn("`concurrency` is deprecated", DeprecationWarning)
    os.write(2, b"[2026-12-01 10:02:10,935 E 28800 28800] core_worker.cc:2465: Actor with class name\\n")
    dispatcher.emit(engine_line)
    print("printed to sys.stderr by Python code", file=sys.stderr)
logging.getLogger("qwen_batch.jobs.cli").info("logged after the job")
os.write(2, b"native output after the job\\n")
"""

OURS = ["INFO qwen_batch.jobs.progress: tiny-qwen2  64/200 rows (32%)",
        "WARNING qwen_batch.jobs.driver: --overwrite: deleting 3 file(s)",
        "ERROR botocore.endpoint: a library's error",
        "printed to sys.stderr by Python code"]
RAYS_AND_VLLMS = ["Token authentication is enabled for this Ray cluster.", "Progress bars disabled.",
                  "Found credentials in environment variables.", "`concurrency` is deprecated",
                  "core_worker.cc:2465: Actor with class name", "Initializing a V1 LLM engine"]


def run_driver(script: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return done


def test_ray_and_vllm_output_goes_to_the_log_file_and_the_terminal_keeps_ours(tmp_path: Path) -> None:
    log_file = tmp_path / "run.log"
    done = run_driver(FAKE_JOB, str(log_file), "quiet", tmp_path=tmp_path)

    terminal = done.stderr.splitlines()
    assert terminal == [f"INFO qwen_batch.cluster.local: Ray and vLLM output of this run: {log_file}", *OURS,
                        "INFO qwen_batch.jobs.cli: logged after the job", "native output after the job"]
    assert done.stdout == ""
    logged = log_file.read_text()
    for line in RAYS_AND_VLLMS + [f"Ray and vLLM output of this run: {log_file}", "64/200 rows"]:
        assert line in logged
    # Worker lines carry Ray's prefix, without the terminal colour codes.
    assert ("(MapWorker(MapBatches(EngineStage)) pid=42) INFO 12-01 10:02:47 [core.py:133] Initializing a V1 LLM "
            "engine\n") in logged
    assert "\x1b" not in logged
    assert "after the job" not in logged


def test_verbose_shows_ray_and_vllm_on_the_terminal_and_still_logs_them(tmp_path: Path) -> None:
    log_file = tmp_path / "run.log"
    done = run_driver(FAKE_JOB, str(log_file), "verbose", tmp_path=tmp_path)

    shown = done.stdout + done.stderr
    for line in OURS + RAYS_AND_VLLMS:
        assert line in shown
    assert "(MapWorker(MapBatches(EngineStage)) pid=42)" in done.stdout  # Ray's own printer, as without us
    logged = log_file.read_text()
    for line in ["Token authentication is enabled", "Progress bars disabled.", "Initializing a V1 LLM engine",
                 "64/200 rows"]:
        assert line in logged


NOTEBOOK = """
import io, logging, os, sys
from pathlib import Path

from qwen_batch.cluster.local import ray_output

cell = io.StringIO()  # a notebook's sys.stderr: a stream of its own, not file descriptor 2
sys.stderr = cell
logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, level=logging.INFO)
with ray_output(Path(sys.argv[1])):
    logging.getLogger("qwen_batch.jobs.progress").info("tiny-qwen2  64/200 rows (32%)")
    logging.getLogger("ray").info("Started a local Ray instance.")
    os.write(2, b"core_worker.cc:2465: a native line\\n")
print(cell.getvalue(), end="")
"""


def test_a_notebooks_own_stderr_keeps_our_lines_and_the_native_ones_still_go_to_the_file(tmp_path: Path) -> None:
    log_file = tmp_path / "run.log"
    done = run_driver(NOTEBOOK, str(log_file), tmp_path=tmp_path)

    assert done.stdout.splitlines() == [f"INFO qwen_batch.cluster.local: Ray and vLLM output of this run: {log_file}",
                                        "INFO qwen_batch.jobs.progress: tiny-qwen2  64/200 rows (32%)"]
    assert done.stderr == ""
    logged = log_file.read_text()
    assert "Started a local Ray instance." in logged and "core_worker.cc:2465: a native line\n" in logged


def test_the_log_file_of_a_run_lies_under_the_log_dir_else_the_temp_folder_by_job_and_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("QWEN_BATCH_LOG_DIR", str(tmp_path / "logs"))
    assert job_log_file("demo-1234", "20261201T100151-abc123") == (
        tmp_path / "logs" / "demo-1234" / "20261201T100151-abc123.log")
    monkeypatch.delenv("QWEN_BATCH_LOG_DIR")
    assert job_log_file("demo-1234", "20261201T100151-abc123") == (
        tmp_path / "qwen-batch" / "demo-1234" / "20261201T100151-abc123.log")


# With a real Ray: a job on a connection that was open already.
EXISTING_CONNECTION = """
import logging, sys, time
from pathlib import Path

import ray

from qwen_batch.cluster.local import ray_cluster, ray_output

logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
logging.getLogger().setLevel(logging.INFO)
ray.init(address="local", num_cpus=1, include_dashboard=False, object_store_memory=100 << 20,
         log_to_driver=True)


@ray.remote
class Engine:
    def say(self, text):
        print(text, flush=True)
        print(text + " on stderr", file=sys.stderr, flush=True)
        return text


def say(engine, text):
    ray.get(engine.say.remote(text))
    time.sleep(3)  # Ray forwards worker lines every second or so


engine = Engine.remote()
with ray_output(Path(sys.argv[1])), ray_cluster():
    say(engine, "during the job")
print("still connected:", ray.is_initialized(), file=sys.stderr, flush=True)
say(engine, "after the job")
"""


@pytest.mark.cluster  # a Ray of its own, with a plain actor: no vLLM
def test_a_job_on_an_existing_connection_leaves_it_open_and_its_worker_lines_shown_again(tmp_path: Path) -> None:
    log_file = tmp_path / "run.log"
    done = run_driver(EXISTING_CONNECTION, str(log_file), tmp_path=tmp_path)

    assert "still connected: True" in done.stderr
    assert "during the job" not in done.stdout + done.stderr
    assert "after the job" in done.stdout and "after the job on stderr" in done.stderr
    logged = log_file.read_text()
    assert "(Engine pid=" in logged and ") during the job\n" in logged and ") during the job on stderr\n" in logged
    assert "after the job" not in logged
