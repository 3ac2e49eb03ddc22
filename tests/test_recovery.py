"""Crashes for real: a killed engine actor, a SIGKILLed driver, an S3 server restart, each mid-job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from qwen_batch.jobs.driver import run_job
from qwen_batch.pipelines import storage
from qwen_batch.schemas.spec import load_spec

pytestmark = [pytest.mark.engine, pytest.mark.s3]

ROWS, ROWS_PER_SHARD = 240, 8
# Until the first shards commit: an engine start and a few shards, minutes when other work shares the CPUs.
FIRST_COMMITS_S = 600


def make_job(root: str, output: str) -> dict[str, Any]:
    """A job slow enough to interrupt: 30 shards of 8 rows, 24 greedy tokens each."""
    lines = "".join(json.dumps({"rid": f"q{i:04d}", "text": f"question number {i} about item {i % 13}"}) + "\n"
                    for i in range(ROWS))
    storage.write_bytes(f"{root}/input/questions.jsonl", lines.encode())
    return {
        "name": "recovery", "input": {"path": f"{root}/input", "format": "jsonl", "id_column": "rid",
                                      "rows_per_shard": ROWS_PER_SHARD},
        "prompt": {"template": "Answer briefly: {text}"}, "model": {"variant": "tiny-qwen2", "max_model_len": 256},
        "sampling": {"max_tokens": 24, "temperature": 0}, "output": {"path": output},
    }


def commits(output: str) -> dict[str, dict[str, Any]]:
    """Commit records by shard id."""
    return {url.rsplit("/", 1)[-1]: json.loads(storage.read_bytes(url))
            for url in storage.list_names(f"{output}/_commits") if url.endswith(".json")}


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s} s for {what}")
        time.sleep(0.2)


def assert_exactly_once(output: str) -> None:
    fs, path = storage.filesystem(output)
    ids = pq.read_table(path, filesystem=fs, columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == [f"q{i:04d}" for i in range(ROWS)]
    manifest = json.loads(storage.read_bytes(f"{output}/_manifest.json"))
    assert manifest["complete"] and manifest["rows_in"] == manifest["rows_ok"] == ROWS
    assert manifest["shards"] == ROWS // ROWS_PER_SHARD


def engine_actor_pids() -> list[int]:
    """Pids of live engine actor processes of this Ray session (the process title names the actor class)."""
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any("EngineStage" in part for part in (p.info["cmdline"] or []))]


def test_killed_engine_actor_is_restarted_and_its_shards_retried(tmp_path, ray_local):
    output = str(tmp_path / "out")
    spec = load_spec(make_job(str(tmp_path), output))
    result: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.update(manifest=run_job(spec)))
    runner.start()
    wait_for(lambda: len(commits(output)) >= 2, FIRST_COMMITS_S, "the first committed shards")
    victims = engine_actor_pids()
    assert victims, "no engine actor process found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    killed_at = len(commits(output))
    runner.join(timeout=600)
    assert not runner.is_alive() and "manifest" in result
    # Every shard not yet committed was in flight at the engine (it runs many at once): all of them are retried.
    assert killed_at <= ROWS // ROWS_PER_SHARD - 2, "fewer than two shards were in flight when the engine was killed"
    assert_exactly_once(output)


def commits_when_driver_killed(spec_file: Path, output: str, commits_first: int) -> dict[str, dict[str, Any]]:
    """Run the job in a driver process on this session's Ray, SIGKILL it once `commits_first` shards committed, and
    return the commit records then."""
    import ray

    address = ray.get_runtime_context().gcs_address
    driver = subprocess.Popen([sys.executable, "-m", "qwen_batch.jobs.cli", "run", str(spec_file), "--address", address],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: len(commits(output)) >= commits_first, FIRST_COMMITS_S, "the first committed shards")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    return commits(output)


def long_first_shard_job(root: str, output: str) -> dict[str, Any]:
    """OpenAI batch requests whose first shard decodes 160 tokens a row and the others 4: with continuous feeding the
    later shards commit while the first is still running."""
    lines = "".join(json.dumps({"custom_id": f"q{i:04d}", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "tiny-qwen2", "messages": [{"role": "user", "content": f"question number {i}"}],
        "max_tokens": 160 if i < ROWS_PER_SHARD else 4, "temperature": 0}}) + "\n" for i in range(ROWS))
    storage.write_bytes(f"{root}/input/requests.jsonl", lines.encode())
    return {"name": "out-of-order", "input": {"path": f"{root}/input", "format": "openai-batch",
                                              "rows_per_shard": ROWS_PER_SHARD},
            "model": {"variant": "tiny-qwen2", "max_model_len": 256}, "sampling": {"max_tokens": 160},
            "output": {"path": output}}


def test_a_sigkilled_driver_resumes_its_out_of_order_commits_then_reruns_nothing_and_refuses_a_changed_spec(
        tmp_path, ray_local):
    """One job, SIGKILLed with later shards committed before its long first shard, then run again three ways."""
    from qwen_batch.jobs.driver import plan_job
    from qwen_batch.schemas.errors import SpecError

    output = str(tmp_path / "out")
    job = long_first_shard_job(str(tmp_path), output)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(job))
    first_shard = f"{plan_job(load_spec(job)).shards[0].shard_id}.json"  # commits() keys are commit file names
    before = commits_when_driver_killed(spec_file, output, 3)
    assert 3 <= len(before) < ROWS // ROWS_PER_SHARD
    assert first_shard not in before, "the long first shard committed before the short ones: no out-of-order commits"
    # What a writer killed between its data and its commit leaves: an attempt's file no commit record names.
    orphan = Path(output, "tiny-qwen2", f"part-{first_shard.removesuffix('.json')}-0123456789ab.parquet")
    orphan.write_bytes(Path(output, next(iter(before.values()))["data_file"]).read_bytes())

    manifest = run_job(load_spec(spec_file))  # resumes: only the shards not committed before the kill
    after = commits(output)
    assert not orphan.exists(), "the resumed run left a data file that no commit record names"
    assert_exactly_once(output)
    assert first_shard in after and manifest.runs[-1].shards_skipped >= len(before)
    assert manifest.runs[-1].shards_committed == len(after) - manifest.runs[-1].shards_skipped
    for shard, record in before.items():
        assert after[shard]["run_id"] == record["run_id"], "a committed shard was recomputed"
    rows = pq.read_table(output + "/tiny-qwen2").to_pylist()
    assert sorted(r["completion_tokens"] for r in rows if r["id"] < f"q{ROWS_PER_SHARD:04d}") == [160] * ROWS_PER_SHARD

    again = run_job(load_spec(spec_file))  # finished: recomputes nothing
    assert again.runs[-1].shards_committed == 0 and again.runs[-1].shards_skipped == again.shards == len(after)
    assert again.totals == manifest.totals and commits(output) == after
    assert_exactly_once(output)

    changed = load_spec({**job, "sampling": {"max_tokens": 160, "seed": 7}})
    with pytest.raises(SpecError, match="holds job 'out-of-order-.*--overwrite"):
        run_job(changed)
    assert commits(output) == after, "a refused run changed the output"
    overwritten = run_job(changed, overwrite=True)
    records = commits(output)
    assert len(records) == ROWS // ROWS_PER_SHARD and overwritten.job_id != manifest.job_id
    assert {record["run_id"] for record in records.values()} == {overwritten.runs[-1].run_id}, "an old commit survived"
    assert [run.run_id for run in overwritten.runs] == [overwritten.runs[-1].run_id]
    assert len(list(Path(output, "_runs").iterdir())) == 1
    assert_exactly_once(output)


def test_s3_server_restart_mid_job_is_survived(tmp_path, s3, ray_local):
    root = f"s3://{s3.bucket}/restart-{os.getpid()}"
    output = f"{root}/out"
    spec = load_spec(make_job(root, output))
    result: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.update(manifest=run_job(spec)))
    runner.start()
    wait_for(lambda: len(commits(output)) >= 2, FIRST_COMMITS_S, "the first committed shards")
    s3.restart()
    runner.join(timeout=600)
    assert not runner.is_alive() and "manifest" in result
    assert_exactly_once(output)
