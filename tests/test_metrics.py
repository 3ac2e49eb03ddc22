"""Tests for pipelines.metrics: what a shard's commit counts, and the counters on a real Ray node's metrics endpoint."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from clusters import local_cluster  # tests/ is on sys.path
from test_write import ERROR_ROWS, ROWS, engine_block, write_config

from qwen_batch.pipelines import metrics
from qwen_batch.pipelines.write import WriteStage
from qwen_batch.schemas.results import Totals


class Counted:
    """Stands in for ray.util.metrics.Counter: keeps every increment as (name, tags, value)."""

    increments: list[tuple[str, dict[str, str], float]] = []

    def __init__(self, name: str, description: str, tag_keys: tuple[str, ...]):
        self.name, self.tag_keys = name, tag_keys

    def inc(self, value: float, tags: dict[str, str]) -> None:
        assert set(tags) == set(self.tag_keys)
        self.increments.append((self.name, tags, value))


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, str], float]]:
    monkeypatch.setattr(metrics, "Counter", Counted)
    monkeypatch.setattr(Counted, "increments", [])
    metrics._counter.cache_clear()
    yield Counted.increments
    metrics._counter.cache_clear()


def test_a_commit_counts_rows_tokens_cost_errors_and_the_shard_by_job_and_model(counted) -> None:
    totals = Totals(rows=5, rows_ok=3, rows_failed=2, prompt_tokens=1216, completion_tokens=81, cost_usd=0.0012,
                    errors_by_type={"invalid_json": 1, "prompt_too_long": 1})
    metrics.record_commit("reviews-0123", "tiny-qwen2", totals)

    job = {"job": "reviews-0123", "model": "tiny-qwen2"}
    assert counted == [
        ("qwen_batch_rows", job, 5), ("qwen_batch_prompt_tokens", job, 1216),
        ("qwen_batch_completion_tokens", job, 81), ("qwen_batch_cost_usd", job, 0.0012),
        ("qwen_batch_shards_committed", job, 1),
        ("qwen_batch_row_errors", {**job, "error_type": "invalid_json"}, 1),
        ("qwen_batch_row_errors", {**job, "error_type": "prompt_too_long"}, 1),
    ]


def test_a_shard_of_error_rows_only_counts_no_zeros(counted) -> None:
    metrics.record_commit("j", "m", Totals(rows=2, rows_failed=2, errors_by_type={"empty_prompt": 2}))
    assert [(name, value) for name, _, value in counted] == [
        ("qwen_batch_rows", 2), ("qwen_batch_shards_committed", 1), ("qwen_batch_row_errors", 2)]


def test_the_write_stage_counts_a_shard_when_it_commits_and_never_on_a_retry(counted, tmp_path: Path) -> None:
    stage = WriteStage(write_config(tmp_path / "out"))
    first = stage(engine_block())
    retried = stage(engine_block())

    assert first.column("committed").to_pylist() == [True] and retried.column("committed").to_pylist() == [False]
    counts = {name: value for name, _, value in counted if name != "qwen_batch_row_errors"}
    assert counts["qwen_batch_shards_committed"] == 1
    assert counts["qwen_batch_rows"] == len(ROWS)
    assert sorted(tags["error_type"] for name, tags, _ in counted if name == "qwen_batch_row_errors") == sorted(
        ROWS[i]["error"][0] for i in ERROR_ROWS)


# On a real Ray node: the job's driver runs in a subprocess against a head started with a metrics export port.

SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(url: str, by: tuple[str, ...] = ("job", "model", "error_type"),
           prefixes: tuple[str, ...] = ("ray_qwen_batch_", "ray_vllm_")) -> dict[tuple[str, ...], float]:
    """The endpoint's samples of these metric families, summed over the labels not in `by` (one series per worker)."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    sums: dict[tuple[str, ...], float] = defaultdict(float)
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match and match["name"].startswith(prefixes):
            labels = dict(LABEL.findall(match["labels"] or ""))
            sums[(match["name"], *(labels.get(key, "") for key in by))] += float(match["value"])
    return dict(sums)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.engine
def test_a_jobs_counters_reach_the_ray_nodes_metrics_endpoint(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    input_dir = tmp_path / "input"
    input_dir.mkdir()
    rows = [{"rid": f"r{i:03d}", "text": f"review {i} of the kettle"} for i in range(23)] + [{"rid": "r999", "text": "   "}]
    (input_dir / "reviews.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = {"name": "metrics-job", "input": {"path": str(input_dir), "format": "jsonl", "id_column": "rid",
                                             "rows_per_shard": 8},
            "prompt": {"template": "Review: {text}"}, "model": {"variant": "tiny-qwen2", "max_model_len": 256},
            "sampling": {"max_tokens": 4, "temperature": 0}, "output": {"path": str(tmp_path / "output")}}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))

    metrics_port = free_port()
    with local_cluster("qb-metrics-", {"num_cpus": 2, "object_store_memory": 200 << 20, "include_dashboard": False,
                                       "metrics_export_port": metrics_port}, []) as cluster:
        done = subprocess.run([sys.executable, "-m", "qwen_batch.jobs.cli", "run", str(spec_file), "--json",
                               "--address", cluster.address], capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr
        manifest: dict[str, Any] = json.loads(done.stdout)
        totals, job = manifest["totals"], manifest["job_id"]
        expected = {
            ("ray_qwen_batch_rows_total", job, "tiny-qwen2", ""): 24,
            ("ray_qwen_batch_prompt_tokens_total", job, "tiny-qwen2", ""): totals["prompt_tokens"],
            ("ray_qwen_batch_completion_tokens_total", job, "tiny-qwen2", ""): totals["completion_tokens"],
            ("ray_qwen_batch_shards_committed_total", job, "tiny-qwen2", ""): 3,
            ("ray_qwen_batch_row_errors_total", job, "tiny-qwen2", "empty_prompt"): 1,
        }
        url = f"http://{cluster.head_node.node_ip_address}:{metrics_port}/metrics"
        deadline, seen = time.monotonic() + 90, {}
        model = str(tiny_models["qwen2"])
        # vLLM's own engine metrics, through the same agent: every prompt and generated token of the answered rows.
        engine_expected = {("ray_vllm_prompt_tokens_total", model): totals["prompt_tokens"],
                           ("ray_vllm_generation_tokens_total", model): totals["completion_tokens"]}
        while time.monotonic() < deadline:  # Ray's agent exports every few seconds
            seen, engine = scrape(url), scrape(url, by=("model_name",))
            if (all(seen.get(key) == value for key, value in expected.items())
                    and all(engine.get(key) == value for key, value in engine_expected.items())):
                break
            time.sleep(2)
        assert {key: seen.get(key) for key in expected} == expected
        assert seen[("ray_qwen_batch_cost_usd_total", job, "tiny-qwen2", "")] == pytest.approx(totals["cost_usd"])
        assert {key: engine.get(key) for key in engine_expected} == engine_expected
        assert engine[("ray_vllm_time_to_first_token_seconds_count", model)] == 23  # the rows the engine answered
        assert totals["errors_by_type"] == {"empty_prompt": 1}
