"""The Ray Data pipeline: read shards -> prompts -> engine actors -> write and commit, one block per shard.

A job of several models reads its input once: each shard's rows are copied once per model that has not committed
the shard yet (tagged MODEL_COLUMN), and every model's prompt and engine stages run side by side on their own actor
pools, each working on its own rows only (see pipelines.stage); one write stage commits each model's shards.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa

import ray
from ray.data import ActorPoolStrategy, Dataset
from ray.data._internal.execution.execution_callback import ExecutionCallback
from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator

from qwen_batch.cluster.resources import Placement
from qwen_batch.pipelines.engine import EngineConfig, EngineStage, shards_in_flight
from qwen_batch.pipelines.prompts import PromptConfig, PromptStage
from qwen_batch.pipelines.read import BLOCK_SCHEMA, ReadConfig, Shard, ShardDatasource
from qwen_batch.pipelines.stage import MODEL_COLUMN, check_wiring
from qwen_batch.pipelines.write import WriteConfig, WriteStage
from qwen_batch.schemas.errors import SpecError

# Logical CPUs asked for by the light stages, so that on a small node they never starve the engine actor.
READ_CPUS = 0.25
PROMPT_CPUS = 0.5
WRITE_CPUS = 0.25
# Blocks are whole shards: Ray slices a block only past 1.5x this target, and planning keeps every shard far below it
# (pipelines.read.MAX_SHARD_BYTES).
MAX_BLOCK_BYTES = 4 << 30
# The dataset's DataContext config the start watch reads: (seconds, [(stage, model, what each actor asks for)]).
START_WATCH = "qwen_batch.actor_pools"


@dataclass(frozen=True)
class ModelStages:
    """One model of a job on the pipeline: its stages' settings, its engine pool, and the shards it still runs."""

    prompt: PromptConfig
    engine: EngineConfig
    write: WriteConfig
    placement: Placement  # its replica plan, and where Ray puts each replica
    shards: frozenset[str]  # ids of the shards this model has not committed
    ledger: Any = None  # the model's CrashLedger (pipelines.engine), which also counts its engine restarts

    @property
    def name(self) -> str:
        """The model's name in the output and in MODEL_COLUMN."""
        return self.write.variant


def build_dataset(shards: list[Shard], read: ReadConfig, models: Sequence[ModelStages], start_timeout_s: float,
                  repeats: ray.ObjectRef | None) -> Dataset:
    """A lazy dataset whose rows are one summary per committed (model, shard); iterating it runs the job. `shards`
    are those any of the models still runs; each is read once, flagging the rows `repeats` (the id check's result,
    pipelines.read.start_repeated_ids) names. Iterating raises PoolsDidNotStart when an actor pool has no actor
    running `start_timeout_s` after the run began."""
    check_wiring([*BLOCK_SCHEMA.names, *read.carry_columns], [PromptStage, EngineStage, WriteStage])
    dataset = ray.data.read_datasource(ShardDatasource(shards, read, repeats), override_num_blocks=len(shards),
                                       num_cpus=READ_CPUS)
    # The dataset's own copy of the DataContext: every later stage inherits it, the process-wide one is untouched.
    dataset.context.target_max_block_size = MAX_BLOCK_BYTES
    dataset.context.enable_progress_bars = False
    # Fused into the read tasks by Ray Data: no extra pass over the rows.
    dataset = dataset.map_batches(_CopyPerModel({m.name: m.shards for m in models}), batch_size=None,
                                  batch_format="pyarrow", num_cpus=READ_CPUS)
    for model in models:
        dataset = _model_stages(dataset, model, shards)
    dataset = dataset.map_batches(WriteStage(*(m.write for m in models)), batch_size=None, batch_format="pyarrow",
                                  num_cpus=WRITE_CPUS)
    pools = [pool for m in models for pool in ((PromptStage.__name__, m.name, {"CPU": PROMPT_CPUS}),
                                               (EngineStage.__name__, m.name, m.placement.plan.asks()))]
    dataset.context.set_config(START_WATCH, (start_timeout_s, pools))
    dataset.context.custom_execution_callback_classes = [*dataset.context.custom_execution_callback_classes,
                                                         _StartWatch]
    return dataset


class PoolsDidNotStart(SpecError):
    """An actor pool of the job had no actor running within resources.start_timeout_s: the job cannot start."""


class _StartWatch(ExecutionCallback):
    """Fails the run when one of its actor pools has no actor running `start_timeout_s` after the run began: an actor
    the cluster has no room for (nor gets, when it autoscales) would otherwise be waited for without end."""

    def __init__(self) -> None:
        self.began = time.monotonic()
        self.started = False

    def before_execution_starts(self, executor: Any) -> None:
        self.began = time.monotonic()

    def on_execution_step(self, executor: Any) -> None:
        watch = executor._data_context.get_config(START_WATCH)  # noqa: SLF001 - the executor's own context
        if self.started or watch is None:
            return
        timeout_s, pools = watch
        ops = [op for op in executor._topology if isinstance(op, ActorPoolMapOperator)]  # noqa: SLF001
        waiting = []
        for stage in {stage for stage, _, _ in pools}:  # each stage's operators are in the models' order
            of_stage = [op for op in ops if stage in op.name]
            waiting += [(stage, model, asks) for (_, model, asks), op
                        in zip([p for p in pools if p[0] == stage], of_stage) if not op.get_actor_info().running]
        if not waiting:
            self.started = True
        elif time.monotonic() - self.began > timeout_s:
            what = "; ".join(f"{'engine replicas' if stage == EngineStage.__name__ else 'prompt actors'} of {model}, "
                             f"each asking for {asks}" for stage, model, asks in sorted(waiting, key=str))
            raise PoolsDidNotStart(
                f"no actor of these started within resources.start_timeout_s ({timeout_s:g} s): {what}; the Ray "
                f"cluster has {_cpus_and_gpus(ray.available_resources())} free of "
                f"{_cpus_and_gpus(ray.cluster_resources())}. Give the cluster room for them (`ray status` shows what is "
                "free and what waits), ask for less per replica (resources.cpus_per_replica, "
                "resources.tensor_parallel_size), or raise resources.start_timeout_s when loading the model takes "
                "longer")


def _cpus_and_gpus(resources: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 2) for name, value in sorted(resources.items()) if name in ("CPU", "GPU")}


def _model_stages(dataset: Dataset, model: ModelStages, shards: list[Shard]) -> Dataset:
    """The model's prompt and engine stages, each on its own actor pool, sized from the model's replicas."""
    replicas = model.placement.plan
    most_replicas = replicas.max_replicas or replicas.replicas
    # Templating and tokenizing scale with the engines: up to one prompt actor per replica.
    dataset = dataset.map_batches(
        PromptStage, fn_constructor_args=(replace(model.prompt, rows_of=model.name),), batch_size=None,
        batch_format="pyarrow", num_cpus=PROMPT_CPUS, compute=ActorPoolStrategy(min_size=1, max_size=most_replicas),
    )
    own = [s for s in shards if s.shard_id in model.shards] or shards
    mean_rows = max(1, round(sum(s.row_count for s in own) / len(own)))
    calls = min(shards_in_flight(replicas.max_num_seqs, mean_rows), 2 * replicas.max_num_seqs + 1)
    return dataset.map_batches(
        EngineStage, fn_constructor_args=(replace(model.engine, ledger=model.ledger, rows_of=model.name),),
        batch_size=None, batch_format="pyarrow",
        # Several shards run at each engine at once (see pipelines.engine), one more waits ready behind them.
        compute=ActorPoolStrategy(min_size=replicas.replicas, max_size=most_replicas,
                                  max_concurrent_calls_per_actor=calls, max_tasks_in_flight_per_actor=calls + 1,
                                  enable_true_multi_threading=True),
        num_cpus=replicas.num_cpus, runtime_env={"env_vars": replicas.env}, **model.placement.map_batches_args(),
    )


class _CopyPerModel:
    """A shard's rows once for each model that has not committed the shard, each copy tagged with its model."""

    def __init__(self, todo: dict[str, frozenset[str]]):
        self.todo = todo

    def __call__(self, block: pa.Table) -> pa.Table:
        shards = block.column("_shard").to_pylist()
        copies = []
        for model, todo in self.todo.items():
            rows = block.filter(pa.array([shard in todo for shard in shards]))
            if rows.num_rows:
                copies.append(rows.append_column(MODEL_COLUMN, pa.array([model] * rows.num_rows, pa.string())))
        return pa.concat_tables(copies)
