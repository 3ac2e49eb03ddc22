"""The `qwen-batch` command line as scripts use it."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from qwen_batch.jobs.cli import main


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
    assert "output.bucket: unknown field; the fields here are path, format, storage_options; remove it" in \
        run_cli(capsys, "validate", str(job))[2]
