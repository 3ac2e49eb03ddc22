"""The Qwen family end to end: several models in one job, routing, Qwen3 thinking, structured labels, TP=2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from jsonschema import Draft202012Validator

from qwen_batch.jobs.driver import run_job
from qwen_batch.schemas.spec import load_spec

pytestmark = pytest.mark.engine

LABELS = ["positive", "negative", "neutral"]


def write_rows(folder: Path, rows: list[dict[str, Any]]) -> str:
    (folder / "input").mkdir(parents=True, exist_ok=True)
    (folder / "input" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder / "input")


def spec(folder: Path, rows: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    base = {
        "name": "family", "input": {"path": write_rows(folder, rows), "format": "jsonl", "id_column": "rid",
                                    "rows_per_shard": 5},
        "prompt": {"template": "Label this review: {text}"},
        "sampling": {"max_tokens": 12, "temperature": 0},
        "output": {"path": str(folder / "out")},
    }
    return {**base, **fields}


def rows(count: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"rid": f"r{i:03d}", "text": f"review number {i} says the thing is fine", **extra} for i in range(count)]


def output(folder: Path) -> list[dict[str, Any]]:
    return pq.read_table(folder / "out").to_pylist()


def test_fanout_runs_every_row_on_every_model_with_per_variant_totals_and_thinking_split(tmp_path, ray_local):
    models = [{"variant": "tiny-qwen2"},
              {"variant": "tiny-qwen3", "name": "qwen3-think", "thinking": "on", "thinking_budget": 4}]
    manifest = run_job(load_spec(spec(tmp_path, rows(7), models=models)))
    out = output(tmp_path)
    assert sorted((r["variant"], r["id"]) for r in out) == sorted(
        (name, f"r{i:03d}") for name in ("tiny-qwen2", "qwen3-think") for i in range(7))
    assert set(manifest.per_variant) == {"tiny-qwen2", "qwen3-think"}
    for name, totals in manifest.per_variant.items():
        mine = [r for r in out if r["variant"] == name]
        assert totals.rows == 7 and totals.completion_tokens == sum(r["completion_tokens"] for r in mine)
        assert totals.reasoning_tokens == sum(r["reasoning_tokens"] for r in mine)
    for row in out:
        assert row["error_type"] is None, row["error"]
        if row["variant"] == "tiny-qwen2":
            assert row["reasoning_tokens"] == 0 and row["reasoning_text"] is None
        else:
            # The budget closes the <think> block after 4 tokens: 3 reasoning tokens + </think>, then the answer.
            assert row["reasoning_tokens"] == 4 and "</think>" not in row["reasoning_text"]
            assert row["completion_tokens"] == 12 and row["generated_text"] is not None
    assert manifest.rows_in == 14 and manifest.complete


def test_thinking_without_a_budget_counts_every_token_as_reasoning_until_max_tokens(tmp_path, ray_local):
    models = [{"variant": "tiny-qwen3", "thinking": "on"}]
    run_job(load_spec(spec(tmp_path, rows(3), models=models)))
    for row in output(tmp_path):
        assert row["finish_reason"] == "length" and row["reasoning_tokens"] == row["completion_tokens"] == 12
        assert row["generated_text"] == "" and row["reasoning_text"] is not None


def test_route_column_sends_each_row_to_its_model_and_unknown_names_become_error_rows(tmp_path, ray_local):
    data = [{"rid": f"r{i}", "text": f"text {i}", "model": ["tiny-qwen2", "small3", "gpt-4o"][i % 3]}
            for i in range(9)]
    models = [{"variant": "tiny-qwen2"}, {"variant": "tiny-qwen3", "name": "small3"}]
    manifest = run_job(load_spec(spec(tmp_path, data, models=models, route_column="model")))
    out = {r["id"]: r for r in output(tmp_path)}
    assert len(out) == 9 and manifest.rows_in == 9
    for original in data:
        row = out[original["rid"]]
        if original["model"] == "gpt-4o":
            assert row["error_type"] == "unknown_variant" and "'gpt-4o'" in row["error"]
            assert row["variant"] == "tiny-qwen2" and row["completion_tokens"] == 0
        else:
            assert row["variant"] == original["model"] and row["error_type"] is None
    assert manifest.per_variant["small3"].rows == 3 and manifest.per_variant["tiny-qwen2"].rows == 6


@pytest.mark.parametrize("response_format,max_tokens", [
    ({"labels": LABELS}, 8),
    ({"regex": "[a-z]{3}-[0-9]{2}"}, 12),
    ({"json_schema": {"type": "object", "properties": {"label": {"enum": LABELS}, "sure": {"type": "boolean"}},
                      "required": ["label", "sure"], "additionalProperties": False}}, 24),
])
def test_structured_output_from_the_random_model_is_valid(tmp_path, ray_local, response_format, max_tokens):
    job = spec(tmp_path, rows(6), model={"variant": "tiny-qwen2"}, response_format=response_format,
               sampling={"max_tokens": max_tokens, "temperature": 0})
    manifest = run_job(load_spec(job))
    for row in output(tmp_path):
        assert row["error_type"] is None, row["error"]
        if "labels" in response_format:
            assert row["parsed"] in LABELS
        elif "regex" in response_format:
            assert len(row["parsed"]) == 6 and row["parsed"][3] == "-"
        else:
            assert not list(Draft202012Validator(response_format["json_schema"]).iter_errors(json.loads(row["parsed"])))
    assert manifest.structured_validity_rate == 1.0


def test_json_cut_off_by_max_tokens_is_an_error_row_not_kept(tmp_path, ray_local):
    schema = {"type": "object", "properties": {"label": {"enum": LABELS}, "why": {"type": "string"}},
              "required": ["label", "why"]}
    job = spec(tmp_path, rows(4), model={"variant": "tiny-qwen2"}, response_format={"json_schema": schema},
               sampling={"max_tokens": 6, "temperature": 0})
    manifest = run_job(load_spec(job))
    for row in output(tmp_path):
        assert row["error_type"] == "invalid_structured_output" and row["parsed"] is None
        assert row["finish_reason"] == "length" and row["completion_tokens"] == 6 and row["cost_usd"] > 0
    assert manifest.structured_validity_rate == 0.0 and manifest.rows_failed == 4


def test_tensor_parallel_two_runs_on_the_cpu_with_mp_workers(tmp_path, ray_local):
    job = spec(tmp_path, rows(6), model={"variant": "tiny-qwen2"}, resources={"tensor_parallel_size": 2})
    manifest = run_job(load_spec(job))
    out = output(tmp_path)
    assert len(out) == 6 and all(r["error_type"] is None and r["completion_tokens"] == 12 for r in out)
    assert manifest.complete


def test_a_job_whose_rows_all_fail_stops_early_and_exits_non_zero(tmp_path, ray_local, capsys):
    import yaml

    from qwen_batch.jobs.cli import main

    schema = {"type": "object", "properties": {"why": {"type": "string"}}, "required": ["why"]}
    # Every answer is cut off by max_tokens: all error rows. Four rows decode at a time, so shards commit one after
    # another and the limit stops the job long before its 40 shards are done.
    job = spec(tmp_path, rows(200), model={"variant": "tiny-qwen2"}, response_format={"json_schema": schema},
               sampling={"max_tokens": 4, "temperature": 0}, engine={"max_num_seqs": 4},
               limits={"max_error_rate": 0.5, "min_rows_before_check": 10})
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(job))

    assert main(["run", str(spec_file), "--json"]) == 1

    manifest = json.loads(capsys.readouterr().out)
    assert manifest["error_limit_exceeded"] and not manifest["complete"] and manifest["error_rate"] == 1.0
    assert "over limits.max_error_rate 50.0%" in manifest["stopped"]
    assert 2 <= manifest["shards"] < 40
    assert manifest["runs"][-1]["outcome"] == "failed"
