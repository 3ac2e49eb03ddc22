"""Engine placement and settings come from the spec and the cluster, never from assuming a CPU."""

from __future__ import annotations

import pytest

from qwen_batch.cluster.resources import plan_replicas
from qwen_batch.schemas.catalog import get_variant
from qwen_batch.schemas.errors import SpecError
from qwen_batch.schemas.spec import load_spec

BASE = {"name": "j", "input": {"path": "x", "format": "jsonl"}, "prompt": {"template": "{t}"},
        "output": {"path": "y"}}


def spec(variant: str = "qwen2.5-7b-instruct", **sections):
    return load_spec({**BASE, "model": {"variant": variant}, **sections})


def replicas(job, max_model_len: int, gpus: int):
    model = job.variants[0]
    return plan_replicas(job, model, get_variant(model.catalog_name), max_model_len, gpus)


def test_cpu_cluster_runs_one_in_process_engine_per_replica_with_all_cores():
    plan = replicas(spec("tiny-qwen2", resources={"replicas": 2}), 512, 0)
    assert (plan.accelerator, plan.tensor_parallel_size, plan.replicas, plan.accelerators) == ("cpu", 1, 2, 2)
    assert plan.llm_kwargs["distributed_executor_backend"] == "uni" and plan.llm_kwargs["enforce_eager"] is True
    assert plan.llm_kwargs["dtype"] == "float32"
    assert plan.env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and int(plan.env["OMP_NUM_THREADS"]) >= 1
    assert plan.num_gpus == 0 and plan.num_cpus == 1.0
    assert plan.max_num_seqs == plan.llm_kwargs["max_num_seqs"] == 256


def test_cpu_tensor_parallel_uses_mp_workers_bound_to_separate_cores():
    plan = replicas(spec("tiny-qwen2", resources={"tensor_parallel_size": 2}), 512, 0)
    assert plan.llm_kwargs["distributed_executor_backend"] == "mp"
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in plan.env
    assert len(plan.env["VLLM_CPU_OMP_THREADS_BIND"].split("|")) == 2


def test_gpu_cluster_plans_tensor_parallelism_from_the_catalog():
    plan = replicas(spec(model={"variant": "qwen2.5-72b-instruct", "max_model_len": 8192}), 8192, 8)
    assert plan.accelerator == "gpu" and plan.tensor_parallel_size == 4
    assert plan.llm_kwargs["distributed_executor_backend"] == "mp" and plan.llm_kwargs["enforce_eager"] is False
    assert plan.llm_kwargs["dtype"] == "bfloat16" and plan.num_gpus == 4
    assert plan.max_num_seqs == 1024  # vLLM's offline default on an 80 GB H100
    assert "VLLM_CPU_KVCACHE_SPACE" not in plan.env and "OMP_NUM_THREADS" not in plan.env


def test_ray_backend_leaves_the_gpus_to_vllms_placement_group():
    plan = replicas(spec(engine={"executor_backend": "ray"}, resources={"tensor_parallel_size": 2}), 4096, 2)
    assert plan.llm_kwargs["distributed_executor_backend"] == "ray" and plan.num_gpus == 0


def test_more_replicas_than_gpus_is_a_spec_error():
    with pytest.raises(SpecError, match="need 4 GPUs; the Ray cluster has 2"):
        replicas(spec(resources={"replicas": 4}), 4096, 2)


def test_tensor_parallel_size_must_divide_attention_heads():
    with pytest.raises(SpecError, match="tensor_parallel_size"):
        replicas(spec("tiny-qwen2", resources={"tensor_parallel_size": 3}), 512, 0)


def test_engine_settings_from_the_spec_override_the_defaults():
    plan = replicas(spec(engine={"enforce_eager": True, "extra_args": {"enable_prefix_caching": False},
                                      "env": {"VLLM_LOGGING_LEVEL": "WARNING"}}), 4096, 1)
    assert plan.llm_kwargs["enforce_eager"] is True and plan.llm_kwargs["enable_prefix_caching"] is False
    assert plan.env["VLLM_LOGGING_LEVEL"] == "WARNING"


def test_max_num_seqs_follows_vllms_defaults_for_the_hardware_unless_the_spec_sets_it():
    assert replicas(spec("tiny-qwen2", resources={"tensor_parallel_size": 2}), 512, 0).max_num_seqs == 512
    assert replicas(spec(resources={"gpu_type": "a100-80gb"}), 4096, 1).max_num_seqs == 256
    assert replicas(spec("qwen2.5-0.5b-instruct", resources={"gpu_type": "l4-24gb"}), 4096, 1).max_num_seqs == 256
    assert replicas(spec(engine={"max_num_seqs": 48}), 4096, 1).max_num_seqs == 48
