"""Kubernetes manifests for a job spec: a ConfigMap holding the spec and a KubeRay RayJob sized to it."""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any

import yaml

from qwen_batch.cluster.planner import PIPELINE_STAGES
from qwen_batch.cluster.resources import NodeShape, gpu_plan, plan_models
from qwen_batch.pipelines.storage import secret_fields
from qwen_batch.schemas.catalog import ModelVariant, get_variant
from qwen_batch.schemas.errors import SpecError
from qwen_batch.schemas.spec import JobSpec, ModelSpec, ReplicaRange, load_spec

__all__ = ["rayjob_name", "render_command", "render_configmap", "render_rayjob", "render_yaml"]

RAY_VERSION = "2.60.0"
SPEC_MOUNT = "/specs"
SPEC_KEY = "job.yaml"
# KubeRay names the job's RayCluster `<rayjob>-<5 chars>` and caps RayCluster names at 53 characters.
MAX_RAYJOB_NAME = 47
CPUS_PER_GPU = 8
MEMORY_GIB_PER_GPU = 40
HEAD_CPUS = 4
HEAD_MEMORY_GIB = 16


def rayjob_name(spec_name: str) -> str:
    """The spec's name as a RayJob name: a DNS-1035 label (lowercase, starts with a letter) of at most 47 chars."""
    name = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", spec_name.lower())).strip("-")
    if not name[:1].isalpha():
        name = f"job-{name}"
    return name[:MAX_RAYJOB_NAME].rstrip("-")


def render_configmap(spec: JobSpec, *, name: str, namespace: str = "default") -> dict[str, Any]:
    """A ConfigMap holding the spec as `job.yaml`; refuses specs that carry credentials."""
    fields = spec.model_dump(mode="json", exclude_unset=True)
    secrets = secret_fields(fields)
    if secrets:
        raise SpecError(f"{', '.join(secrets)}: a ConfigMap is readable by anyone who can read the namespace; move "
                        "credentials to the Secret `qwen-batch-env` (e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                        "HF_TOKEN), which the Ray pods load as environment variables")
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": _labels(spec)},
        "data": {SPEC_KEY: yaml.dump(fields, Dumper=_BlockDumper, sort_keys=False)},
    }


def render_rayjob(spec: JobSpec, *, image: str, gpus_per_worker: int, workers: int, namespace: str = "default",
                  spec_configmap: str | None = None) -> dict[str, Any]:
    """A RayJob running `qwen-batch run` on the spec, with enough GPU workers for its replicas.

    Each worker pod holds whole replicas (tensor_parallel_size GPUs each), at most `gpus_per_worker` GPUs (one GPU
    node); `workers` of 0 starts as many pods as the replicas need. `spec_configmap` names the ConfigMap holding the
    spec (default `<name>-spec`).
    """
    name = rayjob_name(spec.name)
    replicas = spec.resources.replicas
    layouts = _replica_layouts(spec, gpus_per_worker)
    autoscaling = isinstance(replicas, ReplicaRange)
    if replicas == "auto" and not workers:
        raise SpecError("resources.replicas: found 'auto', which fills the cluster the RayJob starts: give "
                        "--workers N (each worker then runs its GPUs // tensor_parallel_size replicas), or pin "
                        "resources.replicas, or give it as {min, max} for an autoscaling cluster")
    if len(layouts) > 1:
        pods, worker_gpus = _pods_side_by_side(spec, gpus_per_worker, workers)
    else:
        pods, worker_gpus = _pods(replicas, *layouts[0], gpus_per_worker, workers)
    configmap = spec_configmap or f"{name}-spec"
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": namespace, "labels": _labels(spec)},
        "spec": {
            "entrypoint": f"qwen-batch run {SPEC_MOUNT}/{SPEC_KEY}",
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "activeDeadlineSeconds": 6 * 3600,
            "backoffLimit": 1,
            "submitterConfig": {"backoffLimit": 2},
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": autoscaling,
                "headGroupSpec": _head_group(image, configmap, _labels(spec)),
                "workerGroupSpecs": [_worker_group(image, pods, worker_gpus, _labels(spec))],
            },
        },
    }


def render_yaml(spec: JobSpec, *, image: str, gpus_per_worker: int, workers: int, namespace: str = "default",
                spec_configmap: str | None = None) -> str:
    """The ConfigMap and the RayJob for the spec as one multi-document YAML, for `kubectl apply -f -`."""
    rayjob = render_rayjob(spec, image=image, gpus_per_worker=gpus_per_worker, workers=workers, namespace=namespace,
                           spec_configmap=spec_configmap)
    configmap = render_configmap(spec, name=spec_configmap or f"{rayjob['metadata']['name']}-spec",
                                 namespace=namespace)
    return yaml.dump_all([configmap, rayjob], Dumper=_BlockDumper, sort_keys=False)


def render_command(spec_path: str, image: str, gpus_per_worker: int, workers: int, namespace: str, *,
                   logical_date: datetime | None = None) -> str:
    """`qwen-batch render k8s SPEC --image IMG`: the manifests for the spec file, as YAML text.

    A `logical_date` is filled into the spec's name and paths, so the RayJob runs that one slot (a backfill);
    for a schedule, see cluster/kuberay/nightly.yaml.
    """
    return render_yaml(load_spec(spec_path, logical_date), image=image, gpus_per_worker=gpus_per_worker,
                       workers=workers, namespace=namespace)


def _replica_layouts(spec: JobSpec, gpus_per_worker: int) -> list[tuple[int, int]]:
    """(tensor_parallel_size, pipeline_parallel_size) of each model's replicas as the driver's planner lays them out
    on workers of `gpus_per_worker` GPUs, `auto` resolved; a tensor-parallel group must fit on one worker."""
    if spec.resources.accelerator == "cpu":
        raise SpecError("resources.accelerator: found 'cpu'; `render k8s` writes GPU workers. Use `auto` or `gpu`")
    layouts = []
    for _, model, variant, max_model_len in _models(spec):
        # As many workers as the largest pipeline needs: the layout depends on the GPUs of one node, not their sum.
        plan = gpu_plan(spec, variant, max_model_len, gpus_per_worker * max(PIPELINE_STAGES), gpus_per_worker)
        if gpus_per_worker < plan.tensor_parallel_size:
            raise SpecError(f"resources.tensor_parallel_size: {plan.tensor_parallel_size} GPUs per replica of "
                            f"{model.output_name} do not fit on a worker of {gpus_per_worker} GPUs; a replica's "
                            "tensor-parallel group must sit on one node. Raise --gpus-per-worker")
        layouts.append((plan.tensor_parallel_size, plan.pipeline_parallel_size))
    return layouts


def _models(spec: JobSpec) -> list[tuple[str, ModelSpec, ModelVariant, int]]:
    """Each model of the spec as the planner takes it: output name, spec, catalog entry and max_model_len."""
    models = []
    for model in spec.variants:
        variant = get_variant(model.catalog_name)
        models.append((model.output_name, model, variant, model.max_model_len or variant.context_length))
    return models


def _pods(replicas: int | str | ReplicaRange, tensor_parallel: int, stages: int, gpus_per_worker: int,
          workers: int) -> tuple[tuple[int, int], int]:
    """(min, max) worker pods for one model's replicas of `stages` pipeline stages of `tensor_parallel` GPUs, and
    GPUs per pod: whole stages each, no more GPUs than they use (a small job gets a small pod, not a whole node)."""
    fit = gpus_per_worker // tensor_parallel
    if isinstance(replicas, ReplicaRange):
        # KubeRay's autoscaler adds GPU workers while the job's autoscaling actor pool waits for them.
        return (math.ceil(replicas.min * stages / fit), math.ceil(replicas.max * stages / fit)), fit * tensor_parallel
    if replicas == "auto":
        return (workers, workers), fit * tensor_parallel
    per_worker = min(replicas * stages, fit)
    needed = math.ceil(replicas * stages / per_worker)
    if workers and workers < needed:
        each = f"{tensor_parallel} GPU(s)" + (f" in each of {stages} pipeline stages" if stages > 1 else "")
        raise SpecError(f"resources.replicas: {replicas} replicas of {each} need {needed} workers of "
                        f"{gpus_per_worker} GPUs; --workers is {workers}. Raise --workers or lower replicas")
    return (workers or needed,) * 2, per_worker * tensor_parallel


def _pods_side_by_side(spec: JobSpec, gpus_per_worker: int, workers: int) -> tuple[tuple[int, int], int]:
    """(min, max) whole-node worker pods for several models running side by side: the fewest on which the driver's
    own planner (cluster.resources.plan_models) places every model's replicas at once."""
    replicas = spec.resources.replicas
    if replicas == "auto":
        return (workers, workers), gpus_per_worker
    if isinstance(replicas, ReplicaRange):
        return (_fewest_pods(spec, replicas.min, gpus_per_worker),
                _fewest_pods(spec, replicas.max, gpus_per_worker)), gpus_per_worker
    needed = _fewest_pods(spec, replicas, gpus_per_worker)
    if workers and workers < needed:
        raise SpecError(f"resources.replicas: {replicas} replicas of each of {len(spec.variants)} models need {needed} "
                        f"workers of {gpus_per_worker} GPUs side by side; --workers is {workers}. Raise --workers or "
                        "lower replicas")
    return (workers or needed,) * 2, gpus_per_worker


def _fewest_pods(spec: JobSpec, replicas: int, gpus_per_worker: int) -> int:
    """The fewest pods of `gpus_per_worker` GPUs on which the planner runs `replicas` of every model at once."""
    pinned = spec.model_copy(update={"resources": spec.resources.model_copy(update={"replicas": replicas})})
    models = _models(spec)
    refused = None
    for count in range(1, replicas * len(models) + 1):
        nodes = [NodeShape(CPUS_PER_GPU * gpus_per_worker, gpus_per_worker, f"pod-{index}") for index in range(count)]
        try:
            if len(plan_models(pinned, models, nodes)) == 1:
                return count
        except SpecError as error:  # too few workers for one model's pinned replicas
            refused = error
    raise refused or SpecError(f"resources.replicas: {replicas} replicas of each model do not fit side by side on "
                               f"workers of {gpus_per_worker} GPUs. Raise --gpus-per-worker")


def _head_group(image: str, configmap: str, labels: dict[str, str]) -> dict[str, Any]:
    """The head: runs the driver only (no CPUs for tasks), with the spec mounted at /specs."""
    container = _container("ray-head", image, cpus=HEAD_CPUS, memory_gib=HEAD_MEMORY_GIB, gpus=0)
    container["ports"] = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                          {"containerPort": 10001, "name": "client"}]
    container["volumeMounts"].append({"name": "specs", "mountPath": SPEC_MOUNT, "readOnly": True})
    return {
        "rayStartParams": {"num-cpus": "0"},
        "template": {
            "metadata": {"labels": labels},
            "spec": {
                "containers": [container],
                "volumes": [_shm_volume(), {"name": "specs", "configMap": {"name": configmap}}],
            },
        },
    }


def _worker_group(image: str, pods: tuple[int, int], gpus: int, labels: dict[str, str]) -> dict[str, Any]:
    """A GPU worker group of (min, max) pods: fixed when they are equal, the driver then sizing the job to the GPUs
    present when it starts; else grown by KubeRay's autoscaler for the job's autoscaling pool."""
    container = _container("ray-worker", image, cpus=CPUS_PER_GPU * gpus, memory_gib=MEMORY_GIB_PER_GPU * gpus,
                           gpus=gpus)
    return {
        "groupName": "gpu",
        "replicas": pods[0],
        "minReplicas": pods[0],
        "maxReplicas": pods[1],
        "rayStartParams": {},
        "template": {
            "metadata": {"labels": labels},
            "spec": {
                "containers": [container],
                "volumes": [_shm_volume()],
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            },
        },
    }


def _container(name: str, image: str, *, cpus: int, memory_gib: int, gpus: int) -> dict[str, Any]:
    """A Ray container with equal requests and limits, the optional `qwen-batch-env` Secret and a large /dev/shm."""
    amounts: dict[str, str] = {"cpu": str(cpus), "memory": f"{memory_gib}Gi"}
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    return {
        "name": name,
        "image": image,
        "envFrom": [{"secretRef": {"name": "qwen-batch-env", "optional": True}}],
        "resources": {"requests": dict(amounts), "limits": dict(amounts)},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }


def _shm_volume() -> dict[str, Any]:
    return {"name": "dshm", "emptyDir": {"medium": "Memory"}}


def _labels(spec: JobSpec) -> dict[str, str]:
    return {"app.kubernetes.io/name": "qwen-batch", "app.kubernetes.io/instance": rayjob_name(spec.name)}


class _BlockDumper(yaml.SafeDumper):
    """Safe YAML with multi-line strings as `|` blocks, so the spec inside the ConfigMap reads as written."""


def _str_block(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_BlockDumper.add_representer(str, _str_block)
