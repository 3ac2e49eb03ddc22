"""The Qwen family end to end: several models in one job, routing, Qwen3 thinking, structured output, TP=2.

Engine starts are the cost here, so each job checks several things (named in its docstring)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from jsonschema import Draft202012Validator

from conftest import FAMILY_MODELS
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


def test_fanout_runs_every_row_on_every_model_with_per_variant_totals_and_thinking_split(family_job):
    manifest, out = family_job.manifest, pq.read_table(family_job.output).to_pylist()
    good = [f"r{i:03d}" for i in range(7)]
    assert sorted((r["variant"], r["id"]) for r in out if r["error_type"] is None) == sorted(
        (name, rid) for name in FAMILY_MODELS for rid in good)
    assert set(manifest.per_variant) == set(FAMILY_MODELS)
    for name, totals in manifest.per_variant.items():
        mine = [r for r in out if r["variant"] == name]
        assert totals.rows == 9 and totals.completion_tokens == sum(r["completion_tokens"] for r in mine)
        assert totals.reasoning_tokens == sum(r["reasoning_tokens"] for r in mine)
        # A row that fails before the engine fails once for each model, with no tokens.
        assert sorted(r["error_type"] for r in mine if r["error_type"]) == ["empty_prompt", "invalid_json"]
        assert all(r["completion_tokens"] == 0 for r in mine if r["error_type"])
    for row in (r for r in out if r["error_type"] is None):
        if row["variant"] == "tiny-qwen2":
            assert row["reasoning_tokens"] == 0 and row["reasoning_text"] is None
        elif row["variant"] == "qwen3-think":
            # The budget closes the <think> block after 4 tokens: 3 reasoning tokens + </think>, then the answer.
            assert row["reasoning_tokens"] == 4 and "</think>" not in row["reasoning_text"]
            assert row["completion_tokens"] == 12 and row["generated_text"] is not None
        else:
            # Without a budget the random model never closes <think>: every token is reasoning, up to max_tokens.
            assert row["finish_reason"] == "length" and row["reasoning_tokens"] == row["completion_tokens"] == 12
            assert row["generated_text"] == "" and row["reasoning_text"] is not None
    assert manifest.rows_in == 27 and manifest.rows_failed == 6 and manifest.complete
    # Run again, it recomputed nothing.
    assert [run.shards_committed for run in manifest.runs] == [6, 0] and manifest.runs[1].shards_skipped == 6


def test_route_column_sends_each_row_to_its_model_and_unknown_names_become_error_rows(tmp_path, ray_local):
    """Also holds every answer to labels: a response format reaches each model's engine."""
    data = [{"rid": f"r{i}", "text": f"text {i}", "model": ["tiny-qwen2", "small3", "gpt-4o"][i % 3]}
            for i in range(9)]
    models = [{"variant": "tiny-qwen2"}, {"variant": "tiny-qwen3", "name": "small3"}]
    manifest = run_job(load_spec(spec(tmp_path, data, models=models, route_column="model",
                                      response_format={"labels": LABELS})))
    out = {r["id"]: r for r in output(tmp_path)}
    assert len(out) == 9 and manifest.rows_in == 9
    for original in data:
        row = out[original["rid"]]
        if original["model"] == "gpt-4o":
            assert row["error_type"] == "unknown_variant" and "'gpt-4o'" in row["error"]
            assert row["variant"] == "tiny-qwen2" and row["completion_tokens"] == 0 and row["parsed"] is None
        else:
            assert row["variant"] == original["model"] and row["error_type"] is None
            assert row["parsed"] in LABELS
    assert manifest.per_variant["small3"].rows == 3 and manifest.per_variant["tiny-qwen2"].rows == 6
    assert manifest.structured_validity_rate == 1.0


def test_json_from_the_random_model_is_valid_against_its_schema(tmp_path, ray_local):
    """Labels are held in the routing job, a regex in the TP=2 job, a JSON cut off by max_tokens in the early stop."""
    schema = {"type": "object", "properties": {"label": {"enum": LABELS}, "sure": {"type": "boolean"}},
              "required": ["label", "sure"], "additionalProperties": False}
    job = spec(tmp_path, rows(6), model={"variant": "tiny-qwen2"}, response_format={"json_schema": schema},
               sampling={"max_tokens": 24, "temperature": 0})
    manifest = run_job(load_spec(job))
    for row in output(tmp_path):
        assert row["error_type"] is None, row["error"]
        assert not list(Draft202012Validator(schema).iter_errors(json.loads(row["parsed"])))
    assert manifest.structured_validity_rate == 1.0


def test_tensor_parallel_two_runs_on_the_cpu_with_mp_workers(tmp_path, ray_local):
    """Its answers are held to a regex, which the engine's grammar enforces across both ranks."""
    job = spec(tmp_path, rows(6), model={"variant": "tiny-qwen2"}, resources={"tensor_parallel_size": 2},
               response_format={"regex": "[a-z]{3}-[0-9]{2}"})
    manifest = run_job(load_spec(job))
    out = output(tmp_path)
    assert len(out) == 6 and manifest.complete and manifest.structured_validity_rate == 1.0
    for row in out:
        assert row["error_type"] is None, row["error"]
        assert re.fullmatch("[a-z]{3}-[0-9]{2}", row["parsed"]) and 0 < row["completion_tokens"] <= 12


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
    # A JSON answer cut off by max_tokens is an error row, not kept; its tokens are still counted and paid for.
    committed = output(tmp_path)
    assert committed and manifest["rows_failed"] == manifest["rows_in"] and manifest["structured_validity_rate"] == 0.0
    for row in committed:
        assert row["error_type"] == "invalid_structured_output" and row["parsed"] is None
        assert row["finish_reason"] == "length" and row["completion_tokens"] == 4 and row["cost_usd"] > 0
