"""Engine placement and settings come from the spec and the cluster, never from assuming a CPU."""

from __future__ import annotations

import pytest

from qwen_batch.cluster.resources import NodeShape, plan_models, plan_replicas
from qwen_batch.schemas.catalog import get_variant
from qwen_batch.schemas.errors import SpecError
from qwen_batch.schemas.spec import load_spec

BASE = {"name": "j", "input": {"path": "x", "format": "jsonl"}, "prompt": {"template": "{t}"},
        "output": {"path": "y"}}


def spec(variant: str = "qwen2.5-7b-instruct", **sections):
    return load_spec({**BASE, "model": {"variant": variant}, **sections})


def nodes(count: int, gpus: int, cpus: float = 16) -> list[NodeShape]:
    return [NodeShape(cpus, gpus) for _ in range(count)]


def replicas(job, max_model_len: int, gpus: int, cluster: list[NodeShape] | None = None):
    """The plan on `cluster`, by default one node with `gpus` GPUs (and 2 CPUs when it has none, as here)."""
    model = job.variants[0]
    cluster = cluster if cluster is not None else nodes(1, gpus, cpus=16 if gpus else 2)
    return plan_replicas(job, model, get_variant(model.catalog_name), max_model_len, cluster)


def test_cpu_cluster_runs_one_in_process_engine_per_replica_with_all_cores():
    plan = replicas(spec("tiny-qwen2", resources={"replicas": 2}), 512, 0, nodes(2, 0, cpus=2))
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
    with pytest.raises(SpecError, match="found 4; each replica needs 1 GPU.s. on one node and the Ray cluster has "
                                        "room for 2"):
        replicas(spec(resources={"replicas": 4}), 4096, 2)


@pytest.mark.parametrize("node_count", [1, 2, 4])
@pytest.mark.parametrize("gpus_per_node", [4, 8])
def test_replicas_auto_fill_every_node(node_count: int, gpus_per_node: int):
    small = replicas(spec(), 4096, 0, nodes(node_count, gpus_per_node))
    assert small.tensor_parallel_size == 1 and small.replicas == node_count * gpus_per_node
    big = replicas(spec("qwen2.5-72b-instruct", model={"variant": "qwen2.5-72b-instruct", "max_model_len": 8192}),
                   8192, 0, nodes(node_count, gpus_per_node))
    assert big.tensor_parallel_size == 4 and big.replicas == node_count * gpus_per_node // 4
    assert big.accelerators == node_count * gpus_per_node and big.max_replicas is None


def test_replicas_auto_skip_nodes_without_accelerators_and_leftover_gpus():
    cluster = [NodeShape(8, 0), NodeShape(32, 6), NodeShape(32, 8)]  # a CPU-only head, then GPU workers
    plan = replicas(spec(resources={"tensor_parallel_size": 4}), 4096, 0, cluster)
    assert plan.replicas == 1 + 2 and plan.accelerators == 12


def test_cpu_replicas_auto_give_one_engine_per_node_with_cpus():
    cluster = [NodeShape(0, 0), NodeShape(2, 0), NodeShape(2, 0)]  # a head kept free of tasks, two workers
    assert replicas(spec("tiny-qwen2"), 512, 0, cluster).replicas == 2


def test_tensor_parallelism_larger_than_a_node_is_refused():
    with pytest.raises(SpecError, match="found 8; a replica's GPUs must sit on one node and the largest node of the "
                                        "Ray cluster has 4"):
        replicas(spec("qwen2.5-72b-instruct", resources={"tensor_parallel_size": 8}), 4096, 0, nodes(4, 4))


def test_a_replica_range_is_an_autoscaling_pool_that_may_outgrow_the_cluster():
    plan = replicas(spec(resources={"replicas": {"min": 1, "max": 16}}), 4096, 0, nodes(1, 8))
    assert (plan.replicas, plan.max_replicas) == (1, 16)


def test_replicas_auto_on_a_cluster_without_room_says_how_to_autoscale():
    with pytest.raises(SpecError, match=r"Give resources.replicas as \{min, max\}"):
        replicas(spec(resources={"accelerator": "gpu"}), 4096, 0, [NodeShape(4, 0)])


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


@pytest.mark.parametrize("node_count,replica_count", [(2, 1), (4, 2)])
def test_qwen3_235b_bf16_at_32k_runs_as_two_pipeline_stages_of_8_gpus(node_count: int, replica_count: int):
    job = spec("qwen3-235b-a22b", model={"variant": "qwen3-235b-a22b", "max_model_len": 32768},
               engine={"enable_expert_parallel": True})
    plan = replicas(job, 32768, 0, nodes(node_count, 8))
    assert (plan.tensor_parallel_size, plan.pipeline_parallel_size, plan.replicas) == (8, 2, replica_count)
    assert plan.llm_kwargs["pipeline_parallel_size"] == 2 and plan.llm_kwargs["enable_expert_parallel"] is True
    assert plan.llm_kwargs["distributed_executor_backend"] == "ray" and plan.num_gpus == 0
    assert plan.accelerators_per_replica == 16 and plan.accelerators == 16 * replica_count


def test_pipeline_parallelism_needs_the_ray_executor_and_gpus():
    job = spec("qwen3-235b-a22b", model={"variant": "qwen3-235b-a22b", "max_model_len": 32768},
               engine={"executor_backend": "mp"})
    with pytest.raises(SpecError, match="only vLLM's `ray` executor"):
        replicas(job, 32768, 0, nodes(2, 8))
    with pytest.raises(SpecError, match="pipeline parallelism spans GPU nodes"):
        replicas(spec("tiny-qwen2", resources={"pipeline_parallel_size": 2}), 512, 0)


def two_models(first: dict, second: dict, **sections):
    job = load_spec({**BASE, "models": [first, second], **sections})
    return job, [(m.output_name, m, get_variant(m.catalog_name), m.max_model_len or 4096) for m in job.variants]


def test_models_side_by_side_split_the_gpus_so_each_replica_has_a_node_with_room():
    job, models = two_models({"variant": "qwen2.5-7b-instruct"},
                             {"variant": "qwen2.5-72b-instruct", "max_model_len": 8192})
    cluster = [NodeShape(16, 4, "n0"), NodeShape(16, 4, "n1")]
    (turn,) = plan_models(job, models, cluster)
    small, big = turn
    # The 72B replica needs a whole 4-GPU node: it gets one, and the 7B replicas fill the other, not both halves.
    assert (big.tensor_parallel_size, big.replicas, big.nodes) == (4, 1, ("n0",))
    assert (small.tensor_parallel_size, small.replicas, small.nodes) == (1, 4, ("n1",) * 4)


def test_models_side_by_side_share_gpus_by_weight_bytes():
    job, models = two_models({"variant": "qwen2.5-7b-instruct"}, {"variant": "qwen2.5-14b-instruct"},
                             resources={"tensor_parallel_size": 1})
    small, big = plan_models(job, models, nodes(1, 8))[0]
    assert small.replicas + big.replicas == 8 and big.replicas > small.replicas


def test_cpu_models_side_by_side_get_a_worker_node_each():
    job, models = two_models({"variant": "tiny-qwen2"}, {"variant": "tiny-qwen3"})
    cluster = [NodeShape(0, 0, "head"), NodeShape(2, 0, "w1"), NodeShape(2, 0, "w2")]
    (turn,) = plan_models(job, models, cluster)
    assert [(p.replicas, p.nodes) for p in turn] == [(1, ("w1",)), (1, ("w2",))]


def test_models_without_room_together_run_in_turns_on_the_whole_cluster():
    job, models = two_models({"variant": "tiny-qwen2"}, {"variant": "tiny-qwen3"})
    turns = plan_models(job, models, [NodeShape(2, 0, "only")])
    assert [[p.replicas for p in turn] for turn in turns] == [[1], [1]]
    job, models = two_models({"variant": "qwen2.5-7b-instruct"}, {"variant": "qwen2.5-7b-instruct", "name": "again"},
                             resources={"replicas": 3})
    assert [[p.replicas for p in turn] for turn in plan_models(job, models, nodes(1, 4))] == [[3], [3]]
    assert [[p.replicas for p in turn] for turn in plan_models(job, models, nodes(1, 8))] == [[3, 3]]


def test_lora_slots_take_gpu_memory_and_can_widen_tensor_parallelism():
    """16 adapters of rank 128 on Qwen2.5-32B take 20 GiB of an H100 at tensor_parallel_size 2: too little is left
    for 16 sequences of 16k, so the replica spans 4 GPUs (cluster.planner.lora_bytes)."""
    job = spec("qwen2.5-32b-instruct")
    model, variant = job.variants[0], get_variant("qwen2.5-32b-instruct")
    plain = plan_replicas(job, model, variant, 16384, nodes(1, 8))
    tuned = plan_replicas(job, model, variant, 16384, nodes(1, 8), lora_slots=(16, 128))
    assert (plain.tensor_parallel_size, tuned.tensor_parallel_size) == (2, 4)
    [[by_name]] = plan_models(job, [("m", model, variant, 16384)], nodes(1, 8), {"m": (16, 128)})
    assert by_name.tensor_parallel_size == 4
