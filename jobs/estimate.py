"""`qwen-batch plan`: tensor parallelism, replicas, KV capacity, time and cost of a job before anything runs."""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import fmean
from typing import Any

from qwen_batch.cluster.planner import (GPU_TYPES, MAX_TENSOR_PARALLEL, GpuType, RunEstimate, VariantPlan,
                                        estimate_run, plan_variant)
from qwen_batch.cluster.resources import NodeShape, plan_models
from qwen_batch.jobs.driver import JobPlan, ModelPlan, model_dir, plan_job, stage_configs
from qwen_batch.pipelines.prompts import PromptStage
from qwen_batch.pipelines.read import read_shard
from qwen_batch.schemas.errors import SpecError
from qwen_batch.schemas.spec import JobSpec

SAMPLE_ROWS = 512


@dataclass(frozen=True)
class ModelEstimate:
    """One model of the job: how it sits on the GPUs, the prompts it was estimated from, and its roofline run."""

    name: str
    shards_to_run: int
    gpu_plan: VariantPlan
    prompt_tokens_per_row: float  # mean over the sample
    rows_sampled: int
    tokenized_with: str  # which tokenizer counted the sample, and why
    max_tokens: int  # output tokens per row the run is estimated at
    run: RunEstimate


@dataclass(frozen=True)
class JobEstimate:
    """`qwen-batch plan`'s answer: every model of the job on `gpus` GPUs of one type."""

    job_id: str
    rows: int
    shards: int
    gpu: GpuType
    gpus: int
    models: list[ModelEstimate]

    def text(self) -> str:
        """The estimate for people, a few lines per model."""
        lines = [f"job {self.job_id}: {self.rows:,} rows in {self.shards:,} shards"]
        for model in self.models:
            plan, run = model.gpu_plan, model.run
            lines += [
                f"{model.name}: {model.shards_to_run:,} shards to run",
                plan.summary(),
                f"prompt tokens: {model.prompt_tokens_per_row:.1f} per row over a sample of {model.rows_sampled} rows "
                f"({model.tokenized_with}); output tokens: at most {model.max_tokens} per row",
                f"estimate (roofline, output at max_tokens): {run.output_tokens_per_s:,.0f} output tok/s over "
                f"{plan.replicas} replica(s), {run.hours:.2f} h wall, {run.gpu_hours:.2f} GPU-hours",
                f"cost: ${run.compute_cost_usd:,.2f} compute at ${self.gpu.usd_per_hour}/GPU-hour vs "
                f"${run.list_price_cost_usd:,.2f} at {plan.variant.name} list prices",
            ]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """Every field, for `plan --json`; a GPU plan's catalog variant is given by its name."""
        document = asdict(self)
        for model, shown in zip(self.models, document["models"]):
            shown["gpu_plan"]["variant"] = model.gpu_plan.variant.name
        return document


def estimate_job(spec: JobSpec, gpu_type: str, gpus: int) -> JobEstimate:
    """Plan and estimate every model of the job on `gpus` GPUs of `gpu_type`."""
    gpu = GPU_TYPES.get(gpu_type)
    if gpu is None:
        close = difflib.get_close_matches(gpu_type, GPU_TYPES, n=1)
        raise SpecError(f"--gpu-type: found {gpu_type!r}; expected one of {', '.join(GPU_TYPES)}"
                        + (f"; did you mean {close[0]!r}?" if close else ""))
    plan = plan_job(spec)
    explicit = spec.resources.tensor_parallel_size
    shares = side_by_side_replicas(spec, plan, gpu_type, gpus)
    models = []
    for index, model in enumerate(plan.models):
        tokenizer, tokenized_with = sample_tokenizer(model)
        prompt_tokens = sample_prompt_tokens(plan, model, tokenizer)
        mean_prompt = fmean(prompt_tokens) if prompt_tokens else 0.0
        gpu_plan = plan_variant(model.variant, gpu, gpus, model.max_model_len, spec.engine.gpu_memory_utilization,
                                tensor_parallel_size=None if explicit == "auto" else explicit,
                                lora_slots=model.lora_slots(spec.engine.max_loras))
        if shares is not None:
            gpu_plan = replace(gpu_plan, replicas=shares[index])
        models.append(ModelEstimate(
            name=model.name, shards_to_run=len(plan.todo(model)), gpu_plan=gpu_plan,
            prompt_tokens_per_row=mean_prompt, rows_sampled=len(prompt_tokens), tokenized_with=tokenized_with,
            max_tokens=spec.sampling.max_tokens,
            run=estimate_run(gpu_plan, gpu, plan.rows, mean_prompt, spec.sampling.max_tokens)))
    return JobEstimate(job_id=plan.job_id, rows=plan.rows, shards=len(plan.shards), gpu=gpu, gpus=gpus, models=models)


def side_by_side_replicas(spec: JobSpec, plan: JobPlan, gpu_type: str, gpus: int) -> list[int] | None:
    """Each model's replicas when the job's models share `gpus` GPUs of nodes of MAX_TENSOR_PARALLEL, as `run` splits
    a cluster (cluster.resources.plan_models); None for one model, or for models that run in turns."""
    if len(plan.models) < 2:
        return None
    shared = spec.model_copy(update={"resources": spec.resources.model_copy(update={"gpu_type": gpu_type})})
    nodes = [NodeShape(cpus=64, gpus=min(MAX_TENSOR_PARALLEL, gpus - first))
             for first in range(0, gpus, MAX_TENSOR_PARALLEL)]
    turns = plan_models(shared, [(m.name, m.spec, m.variant, m.max_model_len) for m in plan.models], nodes)
    return [replicas.replicas for replicas in turns[0]] if len(turns) == 1 else None


def sample_tokenizer(model: ModelPlan) -> tuple[str, str]:
    """The variant's tokenizer if it is local, else the tiny test model of its family (same BPE, same template)."""
    if Path(model.model).is_dir():
        return model.model, f"tokenized with {model.model}"
    from qwen_batch.jobs.tiny_model import make_tiny_model

    arch = "qwen3" if model.variant.architecture.startswith("Qwen3") else "qwen2"
    folder = model_dir() / "qwen-batch" / f"tiny-{arch}"
    if not (folder / "tokenizer.json").exists():
        make_tiny_model(arch, folder)
    return str(folder), f"{model.variant.hf_id} is not local: tokenized with tiny-{arch}, the same Qwen BPE and template"


def sample_prompt_tokens(plan: JobPlan, model: ModelPlan, tokenizer: str) -> list[int]:
    """Prompt token counts of the first rows of the input, through the job's own read and prompt stages."""
    read, prompt, _, _ = stage_configs(plan, model, run_id="plan", llm_kwargs={})
    stage = PromptStage(replace(prompt, tokenizer=tokenizer))
    counts: list[int] = []
    for shard in plan.shards:
        block = stage(read_shard(shard, read))
        counts.extend(len(ids) for ids in block.column("prompt_token_ids").to_pylist() if ids is not None)
        if len(counts) >= SAMPLE_ROWS:
            break
    return counts[:SAMPLE_ROWS]
