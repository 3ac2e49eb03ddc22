"""Resource planning: how many accelerators each engine replica gets and how its vLLM engine is configured."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from qwen_batch.cluster.planner import GPU_TYPES, VariantPlan, plan_variant, weight_bytes
from qwen_batch.schemas.catalog import ModelVariant
from qwen_batch.schemas.errors import SpecError
from qwen_batch.schemas.spec import JobSpec, ModelSpec, ReplicaRange

log = logging.getLogger(__name__)

# vLLM's own default max_num_seqs for offline (`LLM`) use: 1,024 on GPUs of 70 GB or more other than A100s, 256 on
# other GPUs, 256 per tensor-parallel rank on CPUs (vllm/engine/arg_utils.py get_batch_defaults). We pass the figure
# to the engine ourselves, so the rows kept in flight per replica are sized from the number the engine really uses.
LARGE_GPU_GIB = 70
LARGE_GPU_MAX_NUM_SEQS = 1024
MAX_NUM_SEQS = 256


@dataclass(frozen=True)
class NodeShape:
    """What one alive Ray node offers engine replicas."""

    cpus: float
    gpus: int
    node_id: str = ""

    @classmethod
    def of_ray(cls, node: dict[str, Any]) -> NodeShape:
        """From an entry of `ray.nodes()`."""
        resources = node.get("Resources", {})
        return cls(float(resources.get("CPU", 0)), int(resources.get("GPU", 0)), node.get("NodeID", ""))


@dataclass(frozen=True)
class ReplicaPlan:
    """How one engine replica is placed and configured, and how many of them run."""

    accelerator: Literal["gpu", "cpu"]
    tensor_parallel_size: int
    replicas: int  # replicas at the start; an autoscaling pool grows to max_replicas
    llm_kwargs: dict[str, Any]
    env: dict[str, str]
    num_cpus: float
    num_gpus: int = 0
    max_replicas: int | None = None  # None: a fixed pool of `replicas`
    pipeline_parallel_size: int = 1
    nodes: tuple[str, ...] = ()  # where the planner put each replica when models share the cluster (Ray node ids)

    @property
    def accelerators_per_replica(self) -> int:
        """Accelerators one replica holds, every pipeline stage's (a CPU engine counts one)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size if self.accelerator == "gpu" else 1

    def asks(self) -> dict[str, float]:
        """What one replica asks the cluster for: its actor's CPUs and its accelerators."""
        return {"CPU": self.num_cpus, **({"GPU": self.accelerators_per_replica} if self.accelerator == "gpu" else {})}

    @property
    def accelerators(self) -> int:
        """Accelerators all replicas hold together at the start."""
        return self.accelerators_per_replica * self.replicas

    @property
    def max_num_seqs(self) -> int:
        """Sequences each engine decodes at once."""
        return self.llm_kwargs["max_num_seqs"]


    def placement(self) -> Placement:
        """How Ray places this plan's engine actors."""
        return Placement(self)


class Placement:
    """Where Ray puts each engine actor of one model, as `map_batches` arguments.

    With vLLM's `ray` executor each replica gets a placement group of tensor x pipeline parallel bundles of one GPU
    (the first also holds the actor's CPUs), STRICT_PACK on one node when there is one stage, PACK over nodes when
    there are several; the actor runs inside it and captures its children, so vLLM's workers use those bundles (as
    Ray Data LLM's vLLM stage does). Otherwise the actor holds its GPUs itself, and where models share the cluster,
    each replica prefers the node the planner gave it (soft: a lost node's replica restarts elsewhere).
    Ray Data calls the placement once per actor it starts (`ray_remote_args_fn`); `release()` frees the groups.
    """

    def __init__(self, plan: ReplicaPlan):
        self.plan = plan
        self.groups: list[Any] = []
        self.started = 0

    @property
    def uses_groups(self) -> bool:
        return self.plan.accelerator == "gpu" and self.plan.llm_kwargs["distributed_executor_backend"] == "ray"

    def map_batches_args(self) -> dict[str, Any]:
        """num_gpus and, where actors are placed one by one, ray_remote_args_fn."""
        args: dict[str, Any] = {"num_gpus": self.plan.num_gpus} if self.plan.num_gpus else {}
        if self.uses_groups or self.plan.nodes:
            args["ray_remote_args_fn"] = self
        return args

    def __call__(self) -> dict[str, Any]:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

        index, self.started = self.started, self.started + 1
        plan = self.plan
        if self.uses_groups:
            # Ray Data also calls this to read the arguments (its memory issue detector, periodically): past the
            # pool's size, calls get the groups made already, so no call reserves GPUs no replica uses.
            if len(self.groups) < (plan.max_replicas or plan.replicas):
                bundles = [{"GPU": 1} for _ in range(plan.accelerators_per_replica)]
                bundles[0]["CPU"] = plan.num_cpus
                self.groups.append(ray.util.placement_group(
                    bundles, strategy="STRICT_PACK" if plan.pipeline_parallel_size == 1 else "PACK"))
            group = self.groups[index % len(self.groups)]
            return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
                group, placement_group_capture_child_tasks=True)}
        if index < len(plan.nodes) and plan.nodes[index]:
            return {"scheduling_strategy": NodeAffinitySchedulingStrategy(plan.nodes[index], soft=True)}
        return {}

    def release(self) -> None:
        """Remove the placement groups made for this model's replicas (their actors are gone with the job)."""
        import ray

        for group in self.groups:
            ray.util.remove_placement_group(group)
        self.groups.clear()


def cluster_nodes() -> list[NodeShape]:
    """The alive nodes of the connected Ray cluster."""
    import ray

    return [NodeShape.of_ray(node) for node in ray.nodes() if node.get("Alive")]


def check_node_paths(spec: JobSpec, model_paths: Sequence[str]) -> None:
    """On a cluster of several nodes, refuse local paths that not every node can reach, before any engine starts:
    the output unless `output.shared`, and input or checkpoint folders missing on some node (checked on each)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) < 2:
        return
    problems = []
    if _is_local(spec.output.path) and not spec.output.shared:
        problems.append(f"output.path: found the local path {spec.output.path!r} on a Ray cluster of {len(nodes)} "
                        "nodes, where each node would write its shards to its own disk. Use object storage (s3://, "
                        "gs://), or set output.shared: true if every node mounts that path")
    local = {f"model.path {path!r}" if path in model_paths else f"input.path {path!r}": path.removeprefix("file://")
             for path in [spec.input.path, *model_paths] if _is_local(path)}
    if local:
        exists = ray.remote(num_cpus=0)(lambda paths: [os.path.exists(path) for path in paths])
        found = ray.get([exists.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                         .remote(list(local.values())) for node in nodes])
        for index, what in enumerate(local):
            missing = [f"{node['NodeManagerAddress']} (node {node['NodeID'][:8]})"
                       for node, seen in zip(nodes, found) if not seen[index]]
            # Missing everywhere is a hub id, or a problem planning has already named.
            if missing and len(missing) < len(nodes):
                problems.append(f"{what} exists on some nodes of the Ray cluster but not on {missing}. Put it on "
                                "object storage (s3://, gs://) or on a filesystem every node mounts")
    if problems:
        raise SpecError(problems)


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def plan_replicas(spec: JobSpec, model: ModelSpec, variant: ModelVariant, max_model_len: int,
                  nodes: Sequence[NodeShape], lora_slots: tuple[int, int] = (0, 0)) -> ReplicaPlan:
    """Accelerator, tensor parallelism, executor backend, engine settings and replica count for one model;
    `lora_slots` (max_loras, max_lora_rank) is what its LoRA adapters take of each GPU."""
    resources, engine = spec.resources, spec.engine
    largest_node = max((node.gpus for node in nodes), default=0)
    all_gpus = sum(node.gpus for node in nodes)
    accelerator = resources.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if largest_node else "cpu"
    tp = resources.tensor_parallel_size
    if accelerator == "gpu":
        # A tensor-parallel group never spans nodes: its all-reduces need NVLink or PCIe, not the network.
        if largest_node and tp != "auto" and tp > largest_node:
            raise SpecError(f"resources.tensor_parallel_size: found {tp}; a replica's GPUs must sit on one node and "
                            f"the largest node of the Ray cluster has {largest_node}. Use nodes with {tp} GPUs, or a "
                            "smaller or quantized variant that fits fewer GPUs")
        layout = gpu_plan(spec, variant, max_model_len, max(all_gpus, 1), max(largest_node, 1), lora_slots)
        tp, pp = layout.tensor_parallel_size, layout.pipeline_parallel_size
    else:
        if resources.pipeline_parallel_size not in ("auto", 1):
            raise SpecError("resources.pipeline_parallel_size: pipeline parallelism spans GPU nodes; CPU engines run "
                            "one stage. Remove it or set resources.accelerator: gpu")
        tp, pp = (1 if tp == "auto" else tp), 1
    replicas, max_replicas = replica_count(resources.replicas, accelerator, tp, resources.cpus_per_replica, nodes, pp)
    if variant.num_attention_heads % tp:
        raise SpecError(f"resources.tensor_parallel_size: found {tp}; it must divide {variant.name}'s "
                        f"{variant.num_attention_heads} attention heads")
    backend = engine.executor_backend
    if backend == "auto":
        # Pipeline stages on other nodes need vLLM's Ray executor; within one node its own processes do.
        backend = "ray" if pp > 1 else "uni" if tp == 1 else "mp"
    if pp > 1 and backend != "ray":
        raise SpecError(f"engine.executor_backend: found {backend!r}; pipeline_parallel_size {pp} spans nodes, which "
                        "only vLLM's `ray` executor does. Use `ray` or `auto`")
    llm_kwargs: dict[str, Any] = {
        "tensor_parallel_size": tp,
        "pipeline_parallel_size": pp,
        "enable_expert_parallel": engine.enable_expert_parallel,
        "distributed_executor_backend": backend,
        "max_model_len": max_model_len,
        "dtype": variant.dtype if model.dtype == "auto" else model.dtype,
        "enforce_eager": engine.enforce_eager if engine.enforce_eager is not None else accelerator == "cpu",
        "seed": spec.sampling.seed or 0,
    }
    if model.thinking_budget is not None:
        llm_kwargs["reasoning_config"] = {"reasoning_parser": "qwen3"}
    if spec.response_format is not None or spec.input.format == "openai-batch":
        # JSON from a weak or random model pads whitespace until max_tokens unless the grammar forbids it; the
        # per-request flag is ignored, so it is set for the engine.
        llm_kwargs["structured_outputs_config"] = {"backend": "xgrammar", "disable_any_whitespace": True}
    if variant.vision_params_b is not None:
        # Images only: with no video input vLLM profiles no video at start-up.
        llm_kwargs["limit_mm_per_prompt"] = {"image": spec.images.max_per_row, "video": 0}
    llm_kwargs["max_num_seqs"] = engine.max_num_seqs or default_max_num_seqs(spec, accelerator, tp)
    env: dict[str, str] = {}
    num_gpus = 0
    if accelerator == "gpu":
        llm_kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
        # With the `ray` backend vLLM places its workers in a placement group of `tp` GPU bundles it creates itself;
        # otherwise the actor holds the GPUs and `mp` workers inherit them.
        num_gpus = 0 if backend == "ray" else tp
    else:
        env.update(cpu_engine_env(tp, engine.cpu_kv_cache_gib))
        if backend == "uni":
            # In-process engine core: 7 s to start instead of 22 s, and 2 GiB less memory, on the CPU.
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env.update(engine.env)
    llm_kwargs.update(engine.extra_args)
    return ReplicaPlan(accelerator, tp, replicas, llm_kwargs, env, resources.cpus_per_replica, num_gpus, max_replicas,
                       pp)


def plan_models(spec: JobSpec, models: Sequence[tuple[str, ModelSpec, ModelVariant, int]],
                nodes: Sequence[NodeShape], lora_slots: Mapping[str, tuple[int, int]] | None = None
                ) -> list[list[ReplicaPlan]]:
    """Each model's plan (name, spec, variant, max_model_len in; its LoRA slots by name), in turns of models that run
    side by side.

    Models run side by side when the cluster has room for one replica of each at once (or the pinned replicas of
    each); the planner then splits the accelerators: every model one replica, then one more at a time to the model
    holding the least per byte of weights (a decode step's cost), until none fits. With no such room, each model
    runs alone on the whole cluster, one after another."""
    plans = [plan_replicas(spec, model, variant, max_model_len, nodes, (lora_slots or {}).get(name, (0, 0)))
             for name, model, variant, max_model_len in models]
    if len(plans) == 1:
        return [plans]
    shared = _share(spec.resources.replicas, plans, [weight_bytes(variant) for _, _, variant, _ in models], nodes)
    if shared is None:
        log.warning("the Ray cluster has no room for a replica of each of the models %s at once: they run one after "
                    "another, each on the whole cluster", [name for name, *_ in models])
        return [[plan] for plan in plans]
    return [shared]


def _share(wanted: int | str | ReplicaRange, plans: list[ReplicaPlan], weights: list[float],
           nodes: Sequence[NodeShape]) -> list[ReplicaPlan] | None:
    """The plans with their replicas placed on the nodes together, or None when not every model fits at once."""
    cpu = plans[0].accelerator == "cpu"
    # What each node offers: its GPUs, or on CPU clusters room for one engine (which uses all its cores).
    free = [int(node.cpus >= plans[0].num_cpus) if cpu else node.gpus for node in nodes]
    placed: list[list[int]] = [[] for _ in plans]

    def place(index: int) -> bool:
        """One more replica of plans[index], each pipeline stage on the fullest node with room (best fit)."""
        plan = plans[index]
        need = 1 if cpu else plan.tensor_parallel_size
        taken: list[int] = []
        for _ in range(plan.pipeline_parallel_size):
            room = [n for n in range(len(free)) if free[n] >= need]
            if not room:
                for n in taken:
                    free[n] += need
                return False
            best = min(room, key=lambda n: free[n])
            free[best] -= need
            taken.append(best)
        placed[index].append(taken[0])
        return True

    first = wanted if isinstance(wanted, int) else wanted.min if isinstance(wanted, ReplicaRange) else 1
    biggest_first = sorted(range(len(plans)), key=lambda i: -plans[i].accelerators_per_replica)
    if not all(place(i) for i in biggest_first for _ in range(first)):
        return None
    while wanted == "auto":
        growing = sorted(range(len(plans)), key=lambda i: len(placed[i]) * plans[i].accelerators_per_replica
                         / weights[i])
        if not any(place(i) for i in growing):
            break
    return [replace(plan, replicas=len(where), nodes=tuple(nodes[n].node_id for n in where))
            for plan, where in zip(plans, placed)]


def replica_count(wanted: int | str | ReplicaRange, accelerator: str, tensor_parallel_size: int,
                  cpus_per_replica: float, nodes: Sequence[NodeShape],
                  pipeline_parallel_size: int = 1) -> tuple[int, int | None]:
    """(replicas to start, the autoscaling pool's maximum or None) for `resources.replicas` on these nodes.

    What fits: on each node, its GPUs // tensor_parallel_size stages, and a replica takes pipeline_parallel_size of
    them; for CPU engines, which use every core of their node, one per node with at least `cpus_per_replica` CPUs.
    """
    if accelerator == "gpu":
        fits = sum(node.gpus // tensor_parallel_size for node in nodes) // pipeline_parallel_size
        unit = f"{tensor_parallel_size} GPU(s) on one node" + (
            f" for each of {pipeline_parallel_size} pipeline stages" if pipeline_parallel_size > 1 else "")
    else:
        fits = sum(1 for node in nodes if node.cpus >= cpus_per_replica)
        unit = f"a node with {cpus_per_replica:g} CPU(s) to itself"
    if isinstance(wanted, ReplicaRange):
        return wanted.min, wanted.max
    if wanted == "auto":
        if not fits:
            raise SpecError(f"resources.replicas: found 'auto', but no node of the Ray cluster has {unit} for a "
                            "replica. Give resources.replicas as {min, max} so an autoscaling cluster adds nodes, or "
                            "connect to a cluster with accelerators")
        return fits, None
    if wanted > fits:
        raise SpecError(f"resources.replicas: found {wanted}; each replica needs {unit} and the Ray cluster has room "
                        f"for {fits}. Lower replicas, use `auto`, or give {{min, max}} for an autoscaling cluster")
    return wanted, None


def default_max_num_seqs(spec: JobSpec, accelerator: str, tensor_parallel_size: int) -> int:
    """vLLM's offline default for the replica's hardware (see MAX_NUM_SEQS)."""
    if accelerator == "cpu":
        return MAX_NUM_SEQS * tensor_parallel_size
    gpu = GPU_TYPES[spec.resources.gpu_type]
    large = gpu.memory_gib >= LARGE_GPU_GIB and not spec.resources.gpu_type.startswith("a100")
    return LARGE_GPU_MAX_NUM_SEQS if large else MAX_NUM_SEQS


def gpu_plan(spec: JobSpec, variant: ModelVariant, max_model_len: int, gpus: int,
             node_gpus: int | None = None, lora_slots: tuple[int, int] = (0, 0)) -> VariantPlan:
    """The planner's tensor and pipeline parallelism and KV capacity for the spec's GPU type, on `gpus` GPUs of which
    one node has at most `node_gpus`, with `lora_slots` for LoRA adapters; warns when an explicit size won't fit."""
    gpu = GPU_TYPES.get(spec.resources.gpu_type)
    if gpu is None:
        raise SpecError(f"resources.gpu_type: found {spec.resources.gpu_type!r}; expected one of {sorted(GPU_TYPES)}")
    explicit, stages = spec.resources.tensor_parallel_size, spec.resources.pipeline_parallel_size
    plan = plan_variant(variant, gpu, max(gpus, 1), max_model_len, spec.engine.gpu_memory_utilization,
                        tensor_parallel_size=None if explicit == "auto" else explicit,
                        pipeline_parallel_size=None if stages == "auto" else stages,
                        node_gpus=node_gpus or max(gpus, 1), lora_slots=lora_slots)
    if plan.warning:
        log.warning("resources.tensor_parallel_size %s: %s", explicit, plan.warning)
    return plan


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
