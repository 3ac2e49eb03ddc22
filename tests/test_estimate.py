"""Tests for jobs.estimate (`qwen-batch plan`): the prompt tokens it samples, the tokenizer it names, the run it
estimates from them, for catalog variants that are not downloaded and for a local checkpoint."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from statistics import fmean
from typing import Any

import pytest

from qwen_batch.cluster.planner import GPU_TYPES, estimate_run, plan_variant
from qwen_batch.jobs.estimate import SAMPLE_ROWS, estimate_job
from qwen_batch.schemas.spec import load_spec

TEXTS = tuple(f"review {i}: " + "good " * (i % 7) for i in range(SAMPLE_ROWS + 40))


def spec(folder: Path, **model: Any) -> dict[str, Any]:
    """More rows than the sample, in shards of 100, for a model of the catalog or a local path."""
    (folder / "input").mkdir(exist_ok=True)
    (folder / "input" / "reviews.jsonl").write_text(
        "".join(json.dumps({"rid": f"r{i}", "text": text}) + "\n" for i, text in enumerate(TEXTS)))
    return {"name": "reviews", "input": {"path": str(folder / "input"), "format": "jsonl", "id_column": "rid",
                                         "rows_per_shard": 100},
            "prompt": {"system": "Label the review.", "template": "{text}"}, "model": model,
            "sampling": {"max_tokens": 64}, "output": {"path": str(folder / "output")}}


@functools.cache
def independent_counts(model_dir: Path, texts: tuple[str, ...]) -> list[int]:
    """Each text's prompt tokens: the checkpoint's own chat template (thinking off, the spec's default: Qwen3's
    template then adds an empty think block), rendered and tokenized by transformers."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    counts = []
    for text in texts:
        rendered = tokenizer.apply_chat_template([{"role": "system", "content": "Label the review."},
                                                  {"role": "user", "content": text}],
                                                 tokenize=False, add_generation_prompt=True, enable_thinking=False)
        counts.append(len(tokenizer(rendered, add_special_tokens=False)["input_ids"]))
    return counts


@pytest.mark.parametrize(("variant", "arch"), [("qwen2.5-7b-instruct", "qwen2"), ("qwen3-8b", "qwen3")])
def test_a_variant_not_downloaded_is_sampled_with_the_tiny_model_of_its_family(
        tmp_path: Path, tiny_models: dict[str, Path], variant: str, arch: str) -> None:
    job = load_spec(spec(tmp_path, variant=variant, max_model_len=4096))

    estimate = estimate_job(job, "h100-80gb", 4)

    [model] = estimate.models
    assert (estimate.rows, estimate.shards, model.shards_to_run) == (len(TEXTS), 6, 6)
    assert model.tokenized_with.endswith(f"is not local: tokenized with tiny-{arch}, the same Qwen BPE and template")
    expected = independent_counts(tiny_models[arch], TEXTS[:SAMPLE_ROWS])
    assert model.rows_sampled == SAMPLE_ROWS and model.prompt_tokens_per_row == pytest.approx(fmean(expected))
    gpu = GPU_TYPES["h100-80gb"]
    plan = plan_variant(model.gpu_plan.variant, gpu, 4, 4096, job.engine.gpu_memory_utilization)
    assert model.gpu_plan == plan
    assert model.run == estimate_run(plan, gpu, len(TEXTS), fmean(expected), 64)
    assert f"{model.prompt_tokens_per_row:.1f} per row over a sample of {SAMPLE_ROWS} rows" in estimate.text()


def test_a_local_checkpoint_is_sampled_with_its_own_tokenizer(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    job = load_spec(spec(tmp_path, path=str(tiny_models["qwen3"]), like="qwen3-8b", max_model_len=1024))

    [model] = estimate_job(job, "h100-80gb", 1).models

    assert model.tokenized_with == f"tokenized with {tiny_models['qwen3']}"
    assert model.prompt_tokens_per_row == pytest.approx(fmean(independent_counts(tiny_models["qwen3"],
                                                                                 TEXTS[:SAMPLE_ROWS])))


def test_models_side_by_side_are_planned_on_their_share_of_the_gpus_as_run_splits_them(
        tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    job = spec(tmp_path, variant="qwen2.5-7b-instruct")
    del job["model"]
    job["models"] = [{"variant": "qwen2.5-7b-instruct", "max_model_len": 8192},
                     {"variant": "qwen2.5-72b-instruct", "max_model_len": 8192}]

    small, big = estimate_job(load_spec(job), "h100-80gb", 8).models

    # The 72B replica takes 4 GPUs of the 8-GPU node, the 7B replicas the other 4; each model's run is estimated on
    # its own replicas, not on all 8 GPUs.
    assert (big.gpu_plan.tensor_parallel_size, big.gpu_plan.replicas) == (4, 1)
    assert (small.gpu_plan.tensor_parallel_size, small.gpu_plan.replicas) == (1, 4)
    assert big.run.gpu_hours == pytest.approx(big.run.hours * 4)
