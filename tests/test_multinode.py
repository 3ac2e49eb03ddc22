"""Several real Ray nodes on this machine (ray.cluster_utils.Cluster): replicas spread over nodes, node loss, paths.

The head keeps no CPUs for tasks, as production heads often do; each worker node has 2 logical CPUs, room for one CPU
engine replica. Jobs run in a driver subprocess (`qwen-batch run --address`), since this pytest process may hold a
Ray connection of its own.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from clusters import local_cluster  # tests/ is on sys.path, as pytest puts conftest folders there
from qwen_batch.pipelines import storage

pytestmark = [pytest.mark.engine, pytest.mark.s3, pytest.mark.cluster]

ROWS, ROWS_PER_SHARD = 96, 8
WORKER = {"num_cpus": 2, "object_store_memory": 200 << 20}


@pytest.fixture(scope="module")
def cluster(s3: Any, tiny_models: dict[str, Path]) -> Iterator[Any]:
    """A head with no task CPUs and a dashboard (for the state API), plus two worker nodes."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dashboard_port = probe.getsockname()[1]
    head = {"num_cpus": 0, "object_store_memory": 200 << 20, "include_dashboard": True, "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard_port}
    with local_cluster("qb-mn-", head, [WORKER, WORKER]) as cluster:
        yield cluster


def write_job(s3: Any, folder: Path, name: str, rows: int = ROWS, max_tokens: int = 16,
              engine: dict[str, Any] | None = None, **resources: Any) -> tuple[Path, str]:
    """A JSONL job on the S3 server, output there too; the spec file path and the output URL."""
    root = f"s3://{s3.bucket}/{name}-{uuid.uuid4().hex[:8]}"
    lines = "".join(json.dumps({"rid": f"q{i:04d}", "text": f"question {i} about item {i % 7}"}) + "\n"
                    for i in range(rows))
    storage.write_bytes(f"{root}/input/questions.jsonl", lines.encode())
    spec = {"name": name, "input": {"path": f"{root}/input", "format": "jsonl", "id_column": "rid",
                                    "rows_per_shard": ROWS_PER_SHARD},
            "prompt": {"template": "Answer briefly: {text}"}, "model": {"variant": "tiny-qwen2", "max_model_len": 256},
            "sampling": {"max_tokens": max_tokens, "temperature": 0}, "output": {"path": f"{root}/output"},
            "resources": resources, "engine": engine or {}}
    spec_file = folder / f"{name}.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    return spec_file, f"{root}/output"


def run_driver(cluster: Any, spec_file: Path, timeout_s: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen_batch.jobs.cli", "run", str(spec_file), "--address",
                           cluster.address], capture_output=True, text=True, timeout=timeout_s)


def assert_exactly_once(output: str, rows: int = ROWS) -> dict[str, Any]:
    fs, path = storage.filesystem(output)
    ids = pq.read_table(path, filesystem=fs, columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == [f"q{i:04d}" for i in range(rows)]
    manifest = json.loads(storage.read_bytes(f"{output}/_manifest.json"))
    assert manifest["complete"] and manifest["rows_in"] == manifest["rows_ok"] == rows
    return manifest


def engine_actors(cluster: Any) -> list[Any]:
    """The engine actors the cluster ran, alive or dead, from Ray's state API."""
    from ray.util.state import list_actors

    actors = list_actors(address=f"http://{cluster.webui_url}", limit=10_000, detail=True,
                         raise_on_missing_output=False)
    return [actor for actor in actors if "EngineStage" in (actor.class_name or "")]


def engine_actor_nodes(cluster: Any, alive_only: bool = False) -> set[str]:
    """Node ids of the engine actors the cluster ran (alive ones, or all)."""
    return {actor.node_id for actor in engine_actors(cluster) if actor.state == "ALIVE" or not alive_only}


def test_replicas_auto_run_one_engine_per_worker_node(cluster: Any, s3: Any, tmp_path: Path) -> None:
    spec_file, output = write_job(s3, tmp_path, "two-nodes")

    done = run_driver(cluster, spec_file)

    assert done.returncode == 0, done.stderr[-3000:]
    manifest = assert_exactly_once(output)
    assert manifest["runs"][-1]["accelerators"] == 2  # two CPU engines, one per worker node
    workers = {node.node_id for node in cluster.worker_nodes}
    assert engine_actor_nodes(cluster) == workers


def engine_lifetimes(cluster: Any, actor_ids: set[str]) -> dict[str, tuple[int, int]]:
    """(creation start, end of last finished call) in ms of each of these engine actors, from Ray's state API."""
    from ray.util.state import list_tasks

    tasks = list_tasks(address=f"http://{cluster.webui_url}", limit=10_000, detail=True,
                       raise_on_missing_output=False)
    created = {t.actor_id: t.start_time_ms for t in tasks
               if t.type == "ACTOR_CREATION_TASK" and t.actor_id in actor_ids and t.start_time_ms}
    last_call: dict[str, int] = {}
    for t in tasks:
        if t.type == "ACTOR_TASK" and t.actor_id in actor_ids and t.state == "FINISHED" and t.end_time_ms:
            last_call[t.actor_id] = max(last_call.get(t.actor_id, 0), t.end_time_ms)
    return {actor: (created[actor], last_call[actor]) for actor in created.keys() & last_call.keys()}


def test_two_models_run_side_by_side_on_their_own_nodes_from_one_read(cluster: Any, s3: Any, tmp_path: Path) -> None:
    from ray.util.state import list_tasks

    # Long enough that each engine still has work once the other is up (engine starts share this machine's cores).
    rows = 320
    spec_file, output = write_job(s3, tmp_path, "side-by-side", rows=rows, max_tokens=32)
    spec = yaml.safe_load(spec_file.read_text())
    del spec["model"]
    spec["models"] = [{"variant": "tiny-qwen2", "max_model_len": 256}, {"variant": "tiny-qwen3", "max_model_len": 256}]
    spec_file.write_text(yaml.safe_dump(spec))
    before = {actor.actor_id for actor in engine_actors(cluster)}

    done = run_driver(cluster, spec_file)

    assert done.returncode == 0, done.stderr[-3000:]
    fs, path = storage.filesystem(output)
    table = pq.read_table(path, filesystem=fs, columns=["id", "variant"]).to_pylist()
    assert sorted((r["variant"], r["id"]) for r in table) == sorted(
        (variant, f"q{i:04d}") for variant in ("tiny-qwen2", "tiny-qwen3") for i in range(rows))
    manifest = json.loads(storage.read_bytes(f"{output}/_manifest.json"))
    assert manifest["complete"] and {name: totals["rows"] for name, totals in manifest["per_variant"].items()} == {
        "tiny-qwen2": rows, "tiny-qwen3": rows}
    run = manifest["runs"][-1]
    assert run["accelerators"] == 2 and run["shards_committed"] == 2 * rows // ROWS_PER_SHARD
    # One engine per model, each on a worker node of its own, as the planner placed them.
    engines = [actor for actor in engine_actors(cluster) if actor.actor_id not in before]
    assert len(engines) == 2 and {actor.node_id for actor in engines} == {n.node_id for n in cluster.worker_nodes}
    # Both pools ran in one execution: each engine was being created before the other had finished its last call.
    # (Busy spans need not overlap: on two cores one engine can answer all its rows while the other still compiles.)
    lifetimes = engine_lifetimes(cluster, {actor.actor_id for actor in engines})
    assert len(lifetimes) == 2, lifetimes
    (created_a, done_a), (created_b, done_b) = lifetimes.values()
    print(f"engine lifetimes {[(c, d) for c, d in lifetimes.values()]}")
    assert created_a < done_b and created_b < done_a, lifetimes
    # The input was read once: one read task per shard, not one per model.
    job = engines[0].job_id
    reads = [t for t in list_tasks(address=f"http://{cluster.webui_url}", filters=[("job_id", "=", job)],
                                   limit=10_000, detail=True, raise_on_missing_output=False)
             if t.name.startswith("ReadShard") and t.state == "FINISHED"]
    assert len(reads) == rows // ROWS_PER_SHARD, [t.name for t in reads]


def test_a_local_output_path_is_refused_on_a_multi_node_cluster(cluster: Any, s3: Any, tmp_path: Path) -> None:
    spec_file, _ = write_job(s3, tmp_path, "local-output")
    spec = yaml.safe_load(spec_file.read_text())
    spec["output"] = {"path": str(tmp_path / "out")}
    spec_file.write_text(yaml.safe_dump(spec))

    done = run_driver(cluster, spec_file, timeout_s=300)

    assert done.returncode == 2
    assert "output.path: found the local path" in done.stderr and "output.shared: true" in done.stderr
    assert not list((tmp_path / "out").glob("*/part-*.parquet"))


def test_losing_the_node_of_an_engine_mid_job_is_survived(cluster: Any, s3: Any, tmp_path: Path) -> None:
    # Long enough to interrupt: 16 rows decode at a time, so shards commit one after another for about a minute.
    rows = 480
    spec_file, output = write_job(s3, tmp_path, "node-loss", rows=rows, max_tokens=48, engine={"max_num_seqs": 16},
                                  replicas=1)
    commits: list[str] = []
    driver = subprocess.Popen([sys.executable, "-m", "qwen_batch.jobs.cli", "run", str(spec_file), "--address",
                               cluster.address], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.append(driver.stderr.read()))
    reader.start()
    try:
        deadline = time.monotonic() + 600
        while not commits:
            assert time.monotonic() < deadline and driver.poll() is None, "no shard committed"
            commits = storage.list_names(f"{output}/_commits")
            time.sleep(0.5)
        deadline = time.monotonic() + 60
        while not (alive := engine_actor_nodes(cluster, alive_only=True)):
            assert time.monotonic() < deadline, f"no live engine actor in Ray's state API: {engine_actors(cluster)}"
            time.sleep(0.5)
        (victim,) = [node for node in cluster.worker_nodes if node.node_id in alive]
        committed_at_loss = len(storage.list_names(f"{output}/_commits"))
        cluster.remove_node(victim, allow_graceful=False)
        time.sleep(5)
        cluster.add_node(**WORKER)
        code = driver.wait(timeout=900)
    finally:
        if driver.poll() is None:
            driver.kill()
        reader.join()
    assert code == 0, stderr[0][-4000:] if stderr else "no stderr"
    assert committed_at_loss < rows // ROWS_PER_SHARD, "the job finished before the node was lost"
    manifest = assert_exactly_once(output, rows)
    assert manifest["runs"][-1]["engine_restarts"] >= 1, stderr
