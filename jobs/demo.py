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


def sample_reviews(rows: int, seed: int = 0) -> list[dict[str, str]]:
    """Deterministic review rows; the last one is empty, to show an error row."""
    rng = random.Random(seed)
    reviews = [{"review_id": f"r{i:05d}",
                "text": f"The {rng.choice(PRODUCTS)} {rng.choice(OPINIONS)}. {rng.choice(OPINIONS).capitalize()}."}
               for i in range(rows - 1)]
    return [*reviews, {"review_id": f"r{rows - 1:05d}", "text": "   "}]


def run_demo(folder: Path, rows: int) -> int:
    """Write the sample input and spec under `folder`, run the job, print the manifest summary and a few rows."""
    from qwen_batch.jobs.cli import _summary

    folder = folder.resolve()
    checkpoint = model_dir() / get_variant("tiny-qwen2").hf_id
    if not (checkpoint / "config.json").exists():
        make_tiny_model("qwen2", checkpoint)
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
    manifest = run_job(load_spec(spec_file), overwrite=True)
    print(f"\nspec: {spec_file}\n{_summary(manifest)}\nmanifest: {folder / 'output' / '_manifest.json'}")
    table = pq.read_table(folder / "output")
    shown = ["id", "finish_reason", "prompt_tokens", "completion_tokens", "cost_usd", "error_type", "generated_text"]
    print(f"\n{table.num_rows} rows in {folder / 'output'}; a few of them (random weights, so the text is gibberish):")
    for row in table.select(shown).sort_by("id").slice(table.num_rows - 3).to_pylist():
        print(json.dumps(row, ensure_ascii=False))
    return 0 if manifest.complete else 1
