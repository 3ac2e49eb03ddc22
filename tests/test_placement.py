"""Where Ray puts engine replicas, on real raylets that declare GPUs they do not have (ray.cluster_utils.Cluster).

No vLLM starts: probe actors take each replica's placement, as Ray Data gives it to an engine actor, and start one
child per GPU bundle, as vLLM's `ray` executor starts its workers; they report the node and GPU ids Ray gave them.
The probes run in a driver subprocess, since this pytest process may hold a Ray connection of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from clusters import local_cluster  # tests/ is on sys.path, as pytest puts conftest folders there

pytestmark = pytest.mark.cluster

PROBE = r'''
import json, sys
import ray
from ray.data import ActorPoolStrategy
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from qwen_batch.cluster.resources import cluster_nodes, plan_models
from qwen_batch.schemas.catalog import get_variant
from qwen_batch.schemas.spec import load_spec

ray.init(address=sys.argv[1], log_to_driver=False)
spec = load_spec(json.loads(sys.argv[2]))
models = [(m.output_name, m, get_variant(m.catalog_name), m.max_model_len or 4096) for m in spec.variants]
(plans,) = plan_models(spec, models, cluster_nodes())


@ray.remote(num_cpus=0, num_gpus=1)
def worker():
    return ray.get_runtime_context().get_node_id(), [str(g) for g in ray.get_gpu_ids()]


class Probe:
    """An engine replica: reports its node and, for a placement group, where its per-GPU workers landed."""

    def __init__(self):
        group = ray.util.get_current_placement_group()
        self.node = ray.get_runtime_context().get_node_id()
        self.gpus = [str(g) for g in ray.get_gpu_ids()]
        self.workers = [] if group is None else ray.get([
            worker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i))
            .remote() for i, bundle in enumerate(group.bundle_specs) if bundle.get("GPU")])
        self.group = None if group is None else group.id.hex()

    def __call__(self, batch):
        return {"replica": [json.dumps({"node": self.node, "gpus": self.gpus, "workers": self.workers,
                                         "group": self.group})] * len(batch["id"])}


report = {"nodes": {n.node_id: n.gpus for n in cluster_nodes()}, "models": []}
for plan in plans:
    placement = plan.placement()
    rows = ray.data.range(4 * plan.replicas, override_num_blocks=4 * plan.replicas).map_batches(
        Probe, batch_size=1, num_cpus=plan.num_cpus, compute=ActorPoolStrategy(size=plan.replicas),
        **placement.map_batches_args()).take_all()
    made = list(placement.groups)
    groups = [ray.util.placement_group_table(g)["strategy"] for g in made]
    placement.release()
    released = [ray.util.placement_group_table(g)["state"] for g in made]
    report["models"].append({"replicas": plan.replicas, "tp": plan.tensor_parallel_size, "strategies": groups,
                             "seen": sorted({r["replica"] for r in rows}), "planned": list(plan.nodes),
                             "released": released})
print("REPORT " + json.dumps(report))
'''

BASE = {"name": "placed", "input": {"path": "x", "format": "jsonl"}, "prompt": {"template": "{t}"},
        "output": {"path": "s3://b/out"}, "resources": {"accelerator": "gpu"}}


@pytest.fixture(scope="module")
def gpu_cluster() -> Iterator[Any]:
    """A head with CPUs and no GPUs, a worker with 2 GPUs and one with 4."""
    head = {"num_cpus": 4, "num_gpus": 0, "object_store_memory": 100 << 20, "include_dashboard": False}
    workers = [{"num_cpus": 4, "num_gpus": gpus, "object_store_memory": 100 << 20} for gpus in (2, 4)]
    with local_cluster("qb-pg-", head, workers) as cluster:
        yield cluster


def probe(cluster: Any, spec: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", PROBE, cluster.address, json.dumps(spec)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    return json.loads(line.removeprefix("REPORT "))


def test_ray_backend_replicas_get_a_strict_pack_group_of_gpu_bundles_on_one_gpu_node(gpu_cluster: Any) -> None:
    report = probe(gpu_cluster, {**BASE, "model": {"variant": "qwen2.5-7b-instruct"},
                                 "resources": {"accelerator": "gpu", "tensor_parallel_size": 2},
                                 "engine": {"executor_backend": "ray"}})
    (model,) = report["models"]
    assert model["replicas"] == 3 and model["strategies"] == ["STRICT_PACK"] * 3  # 2 // 2 + 4 // 2
    replicas = [json.loads(seen) for seen in model["seen"]]
    assert len(replicas) == 3 and len({r["group"] for r in replicas}) == 3
    for replica in replicas:
        # The actor holds no GPU itself; its two workers hold one each, on the actor's node, which has GPUs.
        assert replica["gpus"] == [] and report["nodes"][replica["node"]] > 0
        assert len(replica["workers"]) == 2 and {node for node, _ in replica["workers"]} == {replica["node"]}
        assert len({gpu for _, gpus in replica["workers"] for gpu in gpus}) == 2
    assert sorted(report["nodes"][r["node"]] for r in replicas) == [2, 4, 4]
    assert model["released"] == ["REMOVED"] * 3


def test_models_side_by_side_land_on_the_nodes_the_planner_gave_them(gpu_cluster: Any) -> None:
    # A tp=4 replica fits only the 4-GPU node: the tp=1 replicas must leave it whole and fill the 2-GPU node.
    report = probe(gpu_cluster, {**BASE, "models": [
        {"variant": "qwen2.5-7b-instruct"}, {"variant": "qwen2.5-72b-instruct", "max_model_len": 8192}]})
    small, big = report["models"]
    assert (small["replicas"], small["tp"], big["replicas"], big["tp"]) == (2, 1, 1, 4)
    for model in (small, big):
        replicas = [json.loads(seen) for seen in model["seen"]]
        assert sorted(r["node"] for r in replicas) == sorted(model["planned"])
        assert all(len(r["gpus"]) == model["tp"] for r in replicas) and model["strategies"] == []
    (big_node,) = big["planned"]
    assert report["nodes"][big_node] == 4 and {report["nodes"][n] for n in small["planned"]} == {2}
