"""Tests for the deployable files under cluster/ and for cluster.render: field names against the published KubeRay
CRDs and Ray cluster-launcher keys, GPU sizing against the spec, and the nightly schedule."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from qwen_batch.cluster.render import render_command, render_configmap, render_rayjob, render_yaml, rayjob_name
from qwen_batch.cluster.resources import NodeShape, plan_models, plan_replicas
from qwen_batch.schemas.catalog import get_variant
from qwen_batch.schemas.errors import SpecError
from qwen_batch.schemas.spec import JobSpec, load_spec

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
@pytest.fixture(autouse=True)
def logical_date(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sample specs write to `{ds}` folders: rendering one needs the run's date, as the CLI's --logical-date gives."""
    monkeypatch.setenv("QWEN_BATCH_LOGICAL_DATE", "2026-11-28")


# Field names of the KubeRay v1.7.0 CRDs; the file says where they come from.
CRD = json.loads((Path(__file__).parent / "data" / "kuberay_fields.json").read_text())
# Top-level keys of a cluster-launcher config, from Ray's "Cluster YAML Configuration Options" reference.
LAUNCHER_KEYS = {
    "cluster_name", "max_workers", "upscaling_speed", "idle_timeout_minutes", "docker", "provider", "auth",
    "available_node_types", "head_node_type", "file_mounts", "cluster_synced_files", "file_mounts_sync_continuously",
    "rsync_exclude", "rsync_filter", "initialization_commands", "setup_commands", "head_setup_commands",
    "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
}
# Keys of one `available_node_types` entry, from python/ray/autoscaler/ray-schema.json in Ray 2.60.0.
LAUNCHER_NODE_TYPE_KEYS = {"node_config", "resources", "labels", "min_workers", "max_workers", "idle_timeout_s",
                           "priority", "initialization_commands", "worker_setup_commands", "docker"}
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
MAX_RAYJOB_NAME = 47  # KubeRay's ValidateRayJobMetadata: 53-character RayCluster names minus its 6-character suffix

SPEC: dict[str, Any] = {
    "name": "reviews-2024.v1",
    "input": {"path": "s3://bucket/reviews/{ds}/", "format": "jsonl"},
    "prompt": {"template": "Review: {text}\nSentiment?"},
    "model": {"variant": "qwen2.5-7b-instruct"},
    "output": {"path": "s3://bucket/out/{ds}/"},
}


def yaml_files() -> list[Path]:
    return sorted(CLUSTER.rglob("*.yaml"))


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kuberay_objects() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every RayCluster / RayJob / RayCronJob under cluster/, including templates held in ConfigMaps."""
    for path in yaml_files():
        for doc in documents(path):
            where = f"{path.relative_to(CLUSTER)}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
            if doc.get("apiVersion") == "ray.io/v1":
                yield where, doc
            if doc.get("kind") == "ConfigMap":
                for key, text in doc.get("data", {}).items():
                    held = yaml.safe_load(text)
                    if isinstance(held, dict) and held.get("apiVersion") == "ray.io/v1":
                        yield f"{where} [{key}]", held


KUBERAY_OBJECTS = list(kuberay_objects())


def unknown_fields(obj: dict[str, Any]) -> list[str]:
    """`path: field` for each key, at the levels KubeRay defines, that its CRD does not have."""
    problems = _unknown(obj, "object", obj.get("kind", "?"))
    kind, spec = obj.get("kind"), obj.get("spec", {})
    if kind == "RayCluster":
        problems += _cluster_spec(spec, "spec")
    elif kind == "RayJob":
        problems += _job_spec(spec, "spec")
    elif kind == "RayCronJob":
        problems += _unknown(spec, "RayCronJobSpec", "spec")
        problems += _job_spec(spec.get("jobTemplate", {}), "spec.jobTemplate")
    else:
        problems.append(f"kind: {kind} is not a KubeRay ray.io/v1 kind")
    return problems


def _unknown(mapping: dict[str, Any], crd_type: str, where: str) -> list[str]:
    return [f"{where}: {key} (not in {crd_type})" for key in mapping if key not in CRD[crd_type]]


def _job_spec(spec: dict[str, Any], where: str) -> list[str]:
    problems = _unknown(spec, "RayJobSpec", where)
    problems += _unknown(spec.get("submitterConfig", {}), "SubmitterConfig", f"{where}.submitterConfig")
    if spec.get("submissionMode", "K8sJobMode") not in CRD["JobSubmissionMode"]:
        problems.append(f"{where}.submissionMode: {spec['submissionMode']} (not a JobSubmissionMode)")
    return problems + _cluster_spec(spec.get("rayClusterSpec", {}), f"{where}.rayClusterSpec")


def _cluster_spec(spec: dict[str, Any], where: str) -> list[str]:
    problems = _unknown(spec, "RayClusterSpec", where)
    problems += _unknown(spec.get("headGroupSpec", {}), "HeadGroupSpec", f"{where}.headGroupSpec")
    for index, group in enumerate(spec.get("workerGroupSpecs", [])):
        problems += _unknown(group, "WorkerGroupSpec", f"{where}.workerGroupSpecs[{index}]")
    return problems


def cluster_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"] if obj["kind"] == "RayCluster" else obj["spec"]["rayClusterSpec"]


def worker_gpus(spec: dict[str, Any]) -> int:
    """GPUs all worker pods of a RayCluster spec hold together."""
    return sum(node.gpus for node in worker_nodes(spec))


def worker_nodes(spec: dict[str, Any]) -> list[NodeShape]:
    """The Ray nodes the worker pods of a RayCluster spec become, one per pod."""
    return [NodeShape(float(container["resources"]["limits"]["cpu"]),
                      int(container["resources"]["limits"].get("nvidia.com/gpu", 0)))
            for group in spec["workerGroupSpecs"] for container in group["template"]["spec"]["containers"]
            for _ in range(group["replicas"])]


def only(path: Path, kind: str) -> dict[str, Any]:
    (doc,) = [doc for doc in documents(path) if doc["kind"] == kind]
    return doc


def only_configmap_with(path: Path, key: str) -> dict[str, Any]:
    (doc,) = [doc for doc in documents(path) if doc["kind"] == "ConfigMap" and key in doc["data"]]
    return doc


def cron_is_valid(expression: str) -> bool:
    """A standard five-field cron expression of numbers, `*`, ranges, steps and lists."""
    fields = expression.split()
    bounds = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
    if len(fields) != len(bounds):
        return False
    for field, (low, high) in zip(fields, bounds):
        for part in field.split(","):
            match = re.fullmatch(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", part)
            if not match or (match[4] is not None and int(match[4]) == 0):
                return False
            if match[2] is not None and not low <= int(match[2]) <= int(match[3] or match[2]) <= high:
                return False
    return True


def test_every_yaml_under_cluster_parses():
    names = {str(path.relative_to(CLUSTER)) for path in yaml_files()}
    assert {"kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/nightly.yaml",
            "launcher/gpu-cluster.yaml"} <= names
    for path in yaml_files():
        docs = documents(path)
        assert docs and all(isinstance(doc, dict) for doc in docs), path


@pytest.mark.parametrize("where,obj", KUBERAY_OBJECTS, ids=[where for where, _ in KUBERAY_OBJECTS])
def test_kuberay_manifests_use_only_crd_fields(where: str, obj: dict[str, Any]):
    assert unknown_fields(obj) == [], where


def test_field_check_catches_fields_kuberay_does_not_have():
    rayjob = copy.deepcopy(only(CLUSTER / "kuberay" / "rayjob.yaml", "RayJob"))
    rayjob["spec"]["schedule"] = "0 2 * * *"  # merged to KubeRay master once, reverted before any release
    rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["gpus"] = 4
    rayjob["spec"]["submissionMode"] = "K8sMode"
    assert unknown_fields(rayjob) == [
        "spec: schedule (not in RayJobSpec)",
        "spec.submissionMode: K8sMode (not a JobSubmissionMode)",
        "spec.rayClusterSpec.workerGroupSpecs[0]: gpus (not in WorkerGroupSpec)",
    ]


def test_kuberay_names_are_valid_rayjob_names():
    for where, obj in KUBERAY_OBJECTS:
        metadata = obj["metadata"]
        name = metadata.get("name") or metadata["generateName"] + "x" * 5
        assert DNS_1035_LABEL.fullmatch(name) and len(name) <= MAX_RAYJOB_NAME, where


def test_rayjob_and_nightly_run_on_the_raycluster_groups():
    raycluster = cluster_spec(only(CLUSTER / "kuberay" / "raycluster.yaml", "RayCluster"))
    assert cluster_spec(only(CLUSTER / "kuberay" / "rayjob.yaml", "RayJob")) == raycluster
    (nightly,) = [obj for where, obj in KUBERAY_OBJECTS if where.startswith("kuberay/nightly.yaml")]
    nightly_cluster = copy.deepcopy(cluster_spec(nightly))
    for volume in nightly_cluster["headGroupSpec"]["template"]["spec"]["volumes"]:
        if "configMap" in volume:
            volume["configMap"]["name"] = "qwen-batch-specs"
    assert nightly_cluster == raycluster


def test_gpu_workers_get_gpus_shm_and_a_toleration():
    for where, obj in KUBERAY_OBJECTS:
        spec = cluster_spec(obj)
        head = spec["headGroupSpec"]["template"]["spec"]
        assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"], where
        for pod in [head] + [group["template"]["spec"] for group in spec["workerGroupSpecs"]]:
            shm = {volume["name"] for volume in pod["volumes"] if volume.get("emptyDir", {}).get("medium") == "Memory"}
            mounts = {mount["name"] for mount in pod["containers"][0]["volumeMounts"]
                      if mount["mountPath"] == "/dev/shm"}
            assert shm & mounts, where
        for group in spec["workerGroupSpecs"]:
            resources = group["template"]["spec"]["containers"][0]["resources"]
            assert int(resources["limits"]["nvidia.com/gpu"]) > 0, where
            assert resources["requests"] == resources["limits"], where
            assert group["replicas"] == group["minReplicas"] == group["maxReplicas"], where
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
                group["template"]["spec"]["tolerations"], where


def test_rayjob_runs_the_mounted_spec_and_cleans_up():
    path = CLUSTER / "kuberay" / "rayjob.yaml"
    job, configmap = only(path, "RayJob")["spec"], only(path, "ConfigMap")
    assert job["entrypoint"] == "qwen-batch run /specs/job.yaml"
    assert job["submissionMode"] == "K8sJobMode" and job["shutdownAfterJobFinishes"] is True
    assert job["ttlSecondsAfterFinished"] > 0 and job["activeDeadlineSeconds"] > 0 and job["backoffLimit"] >= 0
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (specs,) = [volume for volume in head["volumes"] if "configMap" in volume]
    assert specs["configMap"]["name"] == configmap["metadata"]["name"]
    assert {"name": specs["name"], "mountPath": "/specs", "readOnly": True} in head["containers"][0]["volumeMounts"]
    assert "job.yaml" in configmap["data"]


@pytest.mark.parametrize("name", ["rayjob.yaml", "nightly.yaml"])
def test_sample_specs_are_valid_and_fit_their_workers(name: str):
    path = CLUSTER / "kuberay" / name
    spec = load_spec(yaml.safe_load(only_configmap_with(path, "job.yaml")["data"]["job.yaml"]),
                     logical_date=datetime(2026, 11, 28, tzinfo=timezone.utc))  # nightly.yaml's paths hold {ds}
    (obj,) = [obj for where, obj in KUBERAY_OBJECTS if where.startswith(f"kuberay/{name}")]
    nodes = worker_nodes(cluster_spec(obj))
    plan = plan_replicas(spec, spec.variants[0], get_variant(spec.variants[0].catalog_name), 4096, nodes)
    assert plan.accelerator == "gpu" and plan.accelerators == worker_gpus(cluster_spec(obj))


def test_nightly_is_a_valid_cronjob_creating_a_rayjob_with_the_logical_date():
    path = CLUSTER / "kuberay" / "nightly.yaml"
    cronjob = only(path, "CronJob")
    assert cronjob["apiVersion"] == "batch/v1"
    assert cron_is_valid(cronjob["spec"]["schedule"])
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][:2] == ["create", "-f"]
    template_dir, template_key = container["args"][2].rsplit("/", 1)
    (mount,) = [mount for mount in container["volumeMounts"] if mount["mountPath"] == template_dir]
    (volume,) = [volume for volume in pod["volumes"] if volume["name"] == mount["name"]]
    held = [doc for doc in documents(path) if doc["kind"] == "ConfigMap"
            and doc["metadata"]["name"] == volume["configMap"]["name"]]
    rayjob = yaml.safe_load(held[0]["data"][template_key])
    assert rayjob["kind"] == "RayJob" and "generateName" in rayjob["metadata"]
    assert rayjob["spec"]["entrypoint"].endswith('--logical-date "$(date -u +%F)"')

    role, binding = only(path, "Role"), only(path, "RoleBinding")
    assert {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create"]} in role["rules"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert {"kind": "ServiceAccount", "name": pod["serviceAccountName"]} in binding["subjects"]
    assert only(path, "ServiceAccount")["metadata"]["name"] == pod["serviceAccountName"]

    spec = yaml.safe_load(only_configmap_with(path, "job.yaml")["data"]["job.yaml"])
    assert "{ds}" in spec["input"]["path"] and "{ds}" in spec["output"]["path"]


@pytest.mark.parametrize("expression,valid", [
    ("0 2 * * *", True), ("*/15 0-6 1,15 * 1-5", True), ("0 2 * *", False), ("61 * * * *", False),
    ("0 2 * * * *", False), ("*/0 * * * *", False), ("5-1 * * * *", False),
])
def test_cron_check(expression: str, valid: bool):
    assert cron_is_valid(expression) is valid


def test_launcher_config_uses_documented_keys_and_starts_ray_correctly():
    config = documents(CLUSTER / "launcher" / "gpu-cluster.yaml")[0]
    assert set(config) <= LAUNCHER_KEYS, set(config) - LAUNCHER_KEYS
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types
    for name, node_type in node_types.items():
        assert set(node_type) <= LAUNCHER_NODE_TYPE_KEYS, name
        assert node_type["node_config"]["InstanceType"], name
    head = node_types.pop(config["head_node_type"])
    assert head["resources"].get("GPU", 0) == 0
    (worker,) = node_types.values()
    assert worker["resources"]["GPU"] > 0 and worker["min_workers"] <= worker["max_workers"] <= config["max_workers"]
    assert any("qwen-batch[gpu]" in command for command in config["setup_commands"])
    head_start, worker_start = config["head_start_ray_commands"], config["worker_start_ray_commands"]
    assert head_start[0] == worker_start[0] == "ray stop"
    assert "ray start --head --port=6379" in head_start[1]
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start[1]
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker_start[1]


def test_launcher_config_passes_rays_own_validation():
    util = pytest.importorskip("ray.autoscaler._private.util")
    config = documents(CLUSTER / "launcher" / "gpu-cluster.yaml")[0]
    util.validate_config(util.prepare_config(config))  # Ray's ray-schema.json; no cloud calls


def spec(**resources: Any) -> JobSpec:
    return load_spec({**SPEC, "resources": resources})


def test_rendered_manifests_round_trip():
    job_spec = spec(replicas=2, tensor_parallel_size=2)
    options = {"image": "registry.example/qwen-batch:0.1.0", "gpus_per_worker": 8, "workers": 0, "namespace": "ml"}
    text = render_yaml(job_spec, **options)
    rayjob = render_rayjob(job_spec, **options)
    configmap = render_configmap(job_spec, name="reviews-2024-v1-spec", namespace="ml")
    assert list(yaml.safe_load_all(text)) == [configmap, rayjob]
    assert unknown_fields(rayjob) == []
    assert load_spec(yaml.safe_load(configmap["data"]["job.yaml"])) == job_spec
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert {"name": "specs", "configMap": {"name": "reviews-2024-v1-spec"}} in head["volumes"]
    assert rayjob["spec"]["entrypoint"] == "qwen-batch run /specs/job.yaml"
    assert rayjob["metadata"] == {"name": "reviews-2024-v1", "namespace": "ml",
                                  "labels": configmap["metadata"]["labels"]}


def test_render_command_reads_the_spec_file(tmp_path: Path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "resources": {"replicas": 3}}))
    configmap, rayjob = yaml.safe_load_all(render_command(str(path), "img:1", 4, 0, "default"))
    assert configmap["kind"] == "ConfigMap" and rayjob["kind"] == "RayJob"
    assert worker_gpus(rayjob["spec"]["rayClusterSpec"]) == 3


@pytest.mark.parametrize("replicas,tensor_parallel,gpus_per_worker,workers,pods,pod_gpus", [
    (1, 1, 8, 0, 1, 1),   # a small job gets a small pod, not a whole node
    (4, 1, 8, 0, 1, 4),
    (4, 2, 8, 0, 1, 8),
    (4, 4, 8, 0, 2, 8),
    (6, 1, 4, 0, 2, 4),
    (2, 4, 4, 3, 3, 4),   # more workers than needed: as asked
])
def test_rendered_gpus_follow_the_spec(replicas, tensor_parallel, gpus_per_worker, workers, pods, pod_gpus):
    job_spec = spec(replicas=replicas, tensor_parallel_size=tensor_parallel)
    rayjob = render_rayjob(job_spec, image="img:1", gpus_per_worker=gpus_per_worker, workers=workers)
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert (group["replicas"], int(limits["nvidia.com/gpu"])) == (pods, pod_gpus)
    gpus = worker_gpus(rayjob["spec"]["rayClusterSpec"])
    assert gpus >= replicas * tensor_parallel
    plan = plan_replicas(job_spec, job_spec.variants[0], get_variant(job_spec.variants[0].catalog_name), 4096,
                         worker_nodes(rayjob["spec"]["rayClusterSpec"]))
    assert plan.tensor_parallel_size * plan.replicas == replicas * tensor_parallel


def test_rendered_auto_tensor_parallel_matches_the_driver():
    job_spec = load_spec({**SPEC, "model": {"variant": "qwen2.5-72b-instruct"}, "resources": {"replicas": 2}})
    rayjob = render_rayjob(job_spec, image="img:1", gpus_per_worker=8, workers=0)
    gpus = worker_gpus(rayjob["spec"]["rayClusterSpec"])
    variant = get_variant("qwen2.5-72b-instruct")
    plan = plan_replicas(job_spec, job_spec.variants[0], variant, variant.context_length,
                         worker_nodes(rayjob["spec"]["rayClusterSpec"]))
    assert plan.tensor_parallel_size > 1 and gpus == plan.accelerators


@pytest.mark.parametrize("resources,gpus_per_worker,workers,message", [
    ({"tensor_parallel_size": 4}, 2, 0, "do not fit on a worker of 2 GPUs"),
    ({"tensor_parallel_size": 8}, 8, 0, "does not divide qwen2.5-7b-instruct's 28 attention heads"),
    ({"replicas": 4, "tensor_parallel_size": 2}, 4, 1, "need 2 workers"),
    ({"accelerator": "cpu"}, 4, 0, "resources.accelerator"),
    ({"replicas": "auto"}, 8, 0, "give --workers N"),
])
def test_render_rejects_clusters_the_job_cannot_use(resources, gpus_per_worker, workers, message):
    with pytest.raises(SpecError, match=message):
        render_rayjob(spec(**resources), image="img:1", gpus_per_worker=gpus_per_worker, workers=workers)


def test_rendered_auto_replicas_are_what_the_driver_finds_on_the_workers():
    job_spec = spec(replicas="auto", tensor_parallel_size=2)
    rayjob = render_rayjob(job_spec, image="img:1", gpus_per_worker=8, workers=3)
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"]) == (3, 3)
    plan = plan_replicas(job_spec, job_spec.variants[0], get_variant(job_spec.variants[0].catalog_name), 4096,
                         worker_nodes(rayjob["spec"]["rayClusterSpec"]))
    assert (plan.replicas, plan.accelerators) == (12, 24)


def test_a_replica_range_renders_an_autoscaling_worker_group():
    job_spec = spec(replicas={"min": 2, "max": 9}, tensor_parallel_size=2)
    rayjob = render_rayjob(job_spec, image="img:1", gpus_per_worker=8, workers=0)
    cluster = rayjob["spec"]["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (1, 1, 3)
    assert unknown_fields(rayjob) == []


def test_render_keeps_credentials_out_of_the_configmap():
    job_spec = load_spec({**SPEC, "input": {**SPEC["input"], "storage_options": {"secret": "s3cr3t", "anon": False}}})
    with pytest.raises(SpecError, match=r"input\.storage_options\.secret") as raised:
        render_configmap(job_spec, name="x-spec")
    assert "s3cr3t" not in str(raised.value)


@pytest.mark.parametrize("spec_name,expected", [
    ("reviews-2024.v1", "reviews-2024-v1"),
    ("Reviews_2024__v1", "reviews-2024-v1"),
    ("2024.nightly", "job-2024-nightly"),
    ("a" * 60 + "-b", "a" * 47),
])
def test_rayjob_names_are_dns_1035_labels(spec_name: str, expected: str):
    name = rayjob_name(spec_name)
    assert name == expected and DNS_1035_LABEL.fullmatch(name) and len(name) <= MAX_RAYJOB_NAME


def test_a_model_that_needs_pipeline_stages_on_two_workers_gets_them():
    job_spec = load_spec({**SPEC, "model": {"variant": "qwen3-235b-a22b", "max_model_len": 32768},
                          "resources": {"replicas": 1}})
    rayjob = render_rayjob(job_spec, image="img:1", gpus_per_worker=8, workers=0)
    nodes = worker_nodes(rayjob["spec"]["rayClusterSpec"])
    assert [node.gpus for node in nodes] == [8, 8]
    plan = plan_replicas(job_spec, job_spec.variants[0], get_variant("qwen3-235b-a22b"), 32768, nodes)
    assert (plan.tensor_parallel_size, plan.pipeline_parallel_size, plan.replicas) == (8, 2, 1)


@pytest.mark.parametrize("replicas", [2, {"min": 1, "max": 3}])
def test_models_side_by_side_get_the_workers_the_driver_places_all_their_replicas_on(replicas):
    """72B, 7B and 32B models (4, 1 and 2 GPUs a replica here): whole 8-GPU workers, as many as the driver's planner
    needs to run every model's replicas at once; one fewer and it could not."""
    job_spec = load_spec({**SPEC, "model": None, "resources": {"replicas": replicas},
                          "models": [{"variant": "qwen2.5-72b-instruct", "max_model_len": 8192},
                                     {"variant": "qwen2.5-7b-instruct", "max_model_len": 8192},
                                     {"variant": "qwen2.5-32b-instruct", "max_model_len": 8192}]})
    rayjob = render_rayjob(job_spec, image="img:1", gpus_per_worker=8, workers=0)
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) == 8
    models = [(m.output_name, m, get_variant(m.catalog_name), 8192) for m in job_spec.variants]
    wanted = [replicas, replicas] if isinstance(replicas, int) else [replicas["min"], replicas["max"]]
    for pods, each in zip((group["minReplicas"], group["maxReplicas"]), wanted):
        pinned = load_spec({**job_spec.model_dump(mode="json", exclude_none=True), "resources": {"replicas": each}})
        nodes = [NodeShape(64, 8, f"n{i}") for i in range(pods)]
        (turn,) = plan_models(pinned, models, nodes)
        assert [plan.replicas for plan in turn] == [each] * 3
        try:
            assert len(plan_models(pinned, models, nodes[:-1])) > 1
        except SpecError:
            pass  # one fewer worker cannot even hold one model's replicas
    assert group["minReplicas"] < group["maxReplicas"] or isinstance(replicas, int)
