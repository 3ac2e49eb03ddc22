"""`qwen-batch plan`: tensor parallelism, replicas, KV capacity, time and cost of a job before anything runs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from statistics import fmean

from qwen_batch.cluster.planner import GPU_TYPES, estimate_run, plan_variant
from qwen_batch.jobs.driver import JobPlan, ModelPlan, model_dir, plan_job, stage_configs
from qwen_batch.pipelines.prompts import PromptStage
from qwen_batch.pipelines.read import read_shard
from qwen_batch.schemas.errors import SpecError
from qwen_batch.schemas.spec import JobSpec

SAMPLE_ROWS = 512


def estimate_job(spec: JobSpec, gpu_type: str, gpus: int) -> str:
    """A plan and estimate for the job's variant on `gpus` GPUs of `gpu_type`, as printable text."""
    gpu = GPU_TYPES.get(gpu_type)
    if gpu is None:
        raise SpecError(f"--gpu-type: found {gpu_type!r}; expected one of {sorted(GPU_TYPES)}")
    plan = plan_job(spec)
    lines = [f"job {plan.job_id}: {plan.rows:,} rows in {len(plan.shards):,} shards"]
    explicit = spec.resources.tensor_parallel_size
    for model in plan.models:
        tokenizer, note = sample_tokenizer(model)
        prompt_tokens = sample_prompt_tokens(plan, model, tokenizer)
        mean_prompt = fmean(prompt_tokens) if prompt_tokens else 0.0
        variant_plan = plan_variant(model.variant, gpu, gpus, model.max_model_len, spec.engine.gpu_memory_utilization,
                                    tensor_parallel_size=None if explicit == "auto" else explicit)
        run = estimate_run(variant_plan, gpu, plan.rows, mean_prompt, spec.sampling.max_tokens)
        lines += [
            f"{model.name}: {len(plan.todo(model)):,} shards to run",
            variant_plan.summary(),
            f"prompt tokens: {mean_prompt:.1f} per row over a sample of {len(prompt_tokens)} rows ({note}); output "
            f"tokens: at most {spec.sampling.max_tokens} per row",
            f"estimate (roofline, output at max_tokens): {run.output_tokens_per_s:,.0f} output tok/s over "
            f"{variant_plan.replicas} replica(s), {run.hours:.2f} h wall, {run.gpu_hours:.2f} GPU-hours",
            f"cost: ${run.compute_cost_usd:,.2f} compute at ${gpu.usd_per_hour}/GPU-hour vs "
            f"${run.list_price_cost_usd:,.2f} at {model.variant.name} list prices",
        ]
    return "\n".join(lines)


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
