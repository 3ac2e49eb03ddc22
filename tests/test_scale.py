"""End to end at the shapes users run: more shards than Ray's default read parallelism, very different output lengths."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from qwen_batch.jobs.driver import run_job
from qwen_batch.schemas.catalog import get_variant
from qwen_batch.schemas.spec import load_spec

pytestmark = pytest.mark.engine

FILES = 1001


def long_tail_lines(count: int, seed: int = 7) -> list[dict]:
    """OpenAI batch requests whose max_tokens follow a lognormal (median 6, capped at 48), as real batches do."""
    draw = random.Random(seed)
    return [{"custom_id": f"req-{i:05d}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "tiny-qwen2", "messages": [{"role": "user", "content": f"Summarise item {i}."}],
                      "max_tokens": min(48, max(1, round(draw.lognormvariate(1.8, 1.0)))), "temperature": 0}}
            for i in range(count)]


def test_a_job_over_1001_files_with_long_tail_lengths_commits_every_row_exactly_once(tmp_path: Path, ray_local) -> None:
    """The last file repeats the custom_id of file 500: the id check across shards (on for openai-batch) makes it a
    duplicate_id row and answers the first."""
    lines = long_tail_lines(FILES)
    lines[-1]["custom_id"] = lines[500]["custom_id"]
    folder = tmp_path / "input"
    folder.mkdir()
    for index, line in enumerate(lines):
        (folder / f"part-{index:05d}.jsonl").write_text(json.dumps(line) + "\n")
    spec = load_spec({"name": "many-files", "input": {"path": str(folder), "format": "openai-batch"},
                      "model": {"variant": "tiny-qwen2", "max_model_len": 256}, "sampling": {"max_tokens": 48},
                      "output": {"path": str(tmp_path / "output")}})

    manifest = run_job(spec)

    assert manifest.complete and manifest.shards == FILES
    table = pq.read_table(tmp_path / "output" / "tiny-qwen2")
    rows = {row["id"]: row for row in table.to_pylist() if row["error_type"] != "duplicate_id"}
    assert table.num_rows == FILES and len(rows) == FILES - 1
    [repeat] = [row for row in table.to_pylist() if row["error_type"] == "duplicate_id"]
    assert repeat["source_file"] == str(folder / f"part-{FILES - 1:05d}.jsonl") and repeat["completion_tokens"] == 0
    assert f"id 'req-00500' was already used by row 0 of {folder}/part-00500.jsonl, which is answered" in repeat["error"]
    assert manifest.totals.errors_by_type == {"duplicate_id": 1}
    variant = get_variant("tiny-qwen2")
    for line in lines[:-1]:
        row, max_tokens = rows[line["custom_id"]], line["body"]["max_tokens"]
        assert row["error_type"] is None, row["error"]
        assert 0 < row["completion_tokens"] <= max_tokens
        assert (row["finish_reason"] == "length") == (row["completion_tokens"] == max_tokens)
        assert row["cost_usd"] == row["input_cost_usd"] + row["output_cost_usd"]
        assert row["output_cost_usd"] == row["completion_tokens"] * variant.output_per_mtok / 1e6
    assert manifest.totals.completion_tokens == sum(row["completion_tokens"] for row in rows.values())
    assert len({line["body"]["max_tokens"] for line in lines}) > 20
    commits = list((tmp_path / "output" / "_commits" / "tiny-qwen2").iterdir())
    assert len(commits) == FILES
