"""Resource planning: how many accelerators each engine replica gets and how its vLLM engine is configured."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from schemas.catalog import ModelVariant
from schemas.errors import SpecError
from schemas.spec import JobSpec

log = logging.getLogger(__name__)

# Ray restarts a dead engine actor this many times and resubmits the shards it held; a retried shard is rewritten
# under the same name before its commit record exists, so retries never duplicate output.
ENGINE_MAX_RESTARTS = 4
ENGINE_MAX_TASK_RETRIES = 4
# Bytes per weight for the dtype of the published checkpoint.
WEIGHT_BYTES = {None: 2.0, "fp8": 1.0, "gptq-int8": 1.0, "awq": 0.5, "gptq-int4": 0.5}
# Share of a GPU's usable memory the weights may take, leaving the rest for KV cache and activations.
WEIGHTS_SHARE = 0.6


@dataclass(frozen=True)
class ReplicaPlan:
    """How one engine replica is placed and configured."""

    accelerator: Literal["gpu", "cpu"]
    tensor_parallel_size: int
    replicas: int
    llm_kwargs: dict[str, Any]
    env: dict[str, str]
    ray_remote_args: dict[str, Any] = field(default_factory=dict)

    @property
    def accelerators(self) -> int:
        """Accelerators all replicas hold together (CPU engines count one each)."""
        per_replica = self.tensor_parallel_size if self.accelerator == "gpu" else 1
        return per_replica * self.replicas


def plan_replicas(spec: JobSpec, variant: ModelVariant, max_model_len: int, gpus_in_cluster: int) -> ReplicaPlan:
    """Accelerator, tensor parallelism, executor backend and engine settings for the job's variant."""
    resources, engine = spec.resources, spec.engine
    accelerator = resources.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if gpus_in_cluster else "cpu"
    tp = resources.tensor_parallel_size
    if tp == "auto":
        tp = 1 if accelerator == "cpu" else smallest_tensor_parallel(variant, resources.gpu_memory_gib,
                                                                       engine.gpu_memory_utilization)
    if variant.num_attention_heads % tp:
        raise SpecError(f"resources.tensor_parallel_size: found {tp}; it must divide {variant.name}'s "
                        f"{variant.num_attention_heads} attention heads")
    if accelerator == "gpu" and tp * resources.replicas > gpus_in_cluster:
        raise SpecError(f"resources: {resources.replicas} replicas x tensor_parallel_size {tp} need "
                        f"{tp * resources.replicas} GPUs; the Ray cluster has {gpus_in_cluster}. Lower replicas.")
    backend = engine.executor_backend
    if backend == "auto":
        backend = "uni" if tp == 1 else "mp"
    llm_kwargs: dict[str, Any] = {
        "tensor_parallel_size": tp,
        "distributed_executor_backend": backend,
        "max_model_len": max_model_len,
        "dtype": variant.dtype if spec.model.dtype == "auto" else spec.model.dtype,
        "enforce_eager": engine.enforce_eager if engine.enforce_eager is not None else accelerator == "cpu",
        "seed": spec.sampling.seed or 0,
    }
    if engine.max_num_seqs is not None:
        llm_kwargs["max_num_seqs"] = engine.max_num_seqs
    env: dict[str, str] = {}
    if accelerator == "gpu":
        llm_kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
        # With the `ray` backend vLLM places its workers in a placement group of `tp` GPU bundles it creates itself;
        # otherwise the actor holds the GPUs and `mp` workers inherit them.
        remote: dict[str, Any] = {"num_cpus": resources.cpus_per_replica, "num_gpus": 0 if backend == "ray" else tp}
    else:
        env.update(cpu_engine_env(tp, engine.cpu_kv_cache_gib))
        if backend == "uni":
            # In-process engine core: 7 s to start instead of 22 s, and 2 GiB less memory, on the CPU.
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        remote = {"num_cpus": resources.cpus_per_replica}
    env.update(engine.env)
    llm_kwargs.update(engine.extra_args)
    remote.update(max_restarts=ENGINE_MAX_RESTARTS, max_task_retries=ENGINE_MAX_TASK_RETRIES,
                  runtime_env={"env_vars": env})
    return ReplicaPlan(accelerator, tp, resources.replicas, llm_kwargs, env, remote)


def smallest_tensor_parallel(variant: ModelVariant, gpu_memory_gib: float, utilization: float) -> int:
    """Smallest power of two dividing the attention heads whose per-GPU weight share fits beside a KV cache."""
    weights_gib = variant.params_b * 1e9 * WEIGHT_BYTES[variant.quantization] / 2**30
    budget = gpu_memory_gib * utilization * WEIGHTS_SHARE
    tp = 1
    while tp <= 64:
        if variant.num_attention_heads % tp == 0 and weights_gib / tp <= budget:
            return tp
        tp *= 2
    raise SpecError(f"{variant.name} ({weights_gib:.0f} GiB of weights) does not fit on up to 64 GPUs of "
                    f"{gpu_memory_gib:g} GiB; set resources.gpu_memory_gib or pick a quantized variant")


def cpu_engine_env(tensor_parallel_size: int, kv_cache_gib: float) -> dict[str, str]:
    """vLLM CPU settings: a bounded KV cache, all cores for the engine, one core range per tensor-parallel rank."""
    cores = os.cpu_count() or 1
    # Ray sets OMP_NUM_THREADS to the actor's CPU request (1): that alone makes a CPU engine 2x slower.
    env = {"VLLM_CPU_KVCACHE_SPACE": f"{kv_cache_gib:g}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "OMP_NUM_THREADS": str(cores)}
    if tensor_parallel_size > 1:
        per_rank = max(1, cores // tensor_parallel_size)
        ranges = [f"{r * per_rank}-{r * per_rank + per_rank - 1}" if per_rank > 1 else str(r)
                  for r in range(tensor_parallel_size)]
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(ranges)
    return env
