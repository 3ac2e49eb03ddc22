"""The sample job: a tiny Qwen model, a generated review dataset in local files, one real run, a look at the rows."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from qwen_batch.jobs.driver import model_dir, run_job
from qwen_batch.jobs.tiny_model import make_tiny_model
from qwen_batch.schemas.catalog import get_variant
from qwen_batch.schemas.spec import load_spec

PRODUCTS = ["kettle", "backpack", "headphones", "desk lamp", "running shoes", "blender", "phone case", "tent"]
OPINIONS = ["works perfectly", "broke after a week", "is exactly as described", "arrived scratched",
            "exceeded my expectations", "is too loud", "feels cheap", "is worth every cent"]
# What the demo prints of its last rows: the input, the answer and its accounting.
SHOWN_COLUMNS = ["id", "text", "generated_text", "finish_reason", "prompt_tokens", "completion_tokens", "cost_usd",
                 "error_type"]
SHOWN_ROWS = 3


def sample_reviews(rows: int, seed: int = 0) -> list[dict[str, str]]:
    """Deterministic review rows; the last one is empty, to show an error row."""
    rng = random.Random(seed)
    reviews = [{"review_id": f"r{i:05d}",
                "text": f"The {rng.choice(PRODUCTS)} {rng.choice(OPINIONS)}. {rng.choice(OPINIONS).capitalize()}."}
               for i in range(rows - 1)]
    return [*reviews, {"review_id": f"r{rows - 1:05d}", "text": "   "}]


def run_demo(folder: Path, rows: int, *, verbose: bool = False) -> int:
    """Write the sample input and spec under `folder`, run the job, print the manifest summary and a few rows;
    `verbose` shows Ray's and vLLM's output too (see run_job)."""
    from qwen_batch.jobs.cli import _summary

    folder = folder.resolve()
    checkpoint = model_dir() / get_variant("tiny-qwen2").hf_id
    if not (checkpoint / "config.json").exists():
        build_quietly(checkpoint)
    input_file = folder / "input" / "reviews.jsonl"
    input_file.parent.mkdir(parents=True, exist_ok=True)
    input_file.write_text("".join(json.dumps(r) + "\n" for r in sample_reviews(rows)))
    spec = {
        "name": "demo-review-sentiment",
        "input": {"path": str(input_file.parent), "format": "jsonl", "id_column": "review_id",
                  "carry_columns": ["text"], "rows_per_shard": 64},
        "prompt": {"system": "You label customer reviews.",
                   "template": "Review: {text}\nIs this review positive or negative?"},
        "model": {"variant": "tiny-qwen2", "max_model_len": 1024},
        "sampling": {"max_tokens": 16, "temperature": 0, "seed": 0},
        "output": {"path": str(folder / "output")},
    }
    spec_file = folder / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    manifest = run_job(load_spec(spec_file), overwrite=True, verbose=verbose)
    print(f"{_summary(manifest)}\nspec: {spec_file}\nmanifest: {folder / 'output' / '_manifest.json'}")
    table = pq.read_table(folder / "output")
    print(f"\nthe last {SHOWN_ROWS} of the {table.num_rows} output rows (random weights, so the answers are gibberish):")
    for row in table.select(SHOWN_COLUMNS).sort_by("id").slice(table.num_rows - SHOWN_ROWS).to_pylist():
        print(json.dumps(row, ensure_ascii=False))
    return 0 if manifest.complete else 1


def build_quietly(checkpoint: Path) -> None:
    """Build the tiny Qwen2 checkpoint without transformers' progress bar on the terminal."""
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        make_tiny_model("qwen2", checkpoint)
    finally:
        if shown:
            transformers_logging.enable_progress_bar()
