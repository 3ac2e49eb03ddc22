"""The Ray Data pipeline: read shards -> prompts -> engine actors -> write and commit, one block per shard."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import ray
from ray.data import ActorPoolStrategy, Dataset

from qwen_batch.cluster.resources import ReplicaPlan
from qwen_batch.pipelines.engine import EngineConfig, EngineStage, shards_in_flight
from qwen_batch.pipelines.prompts import PromptConfig, PromptStage
from qwen_batch.pipelines.read import BLOCK_SCHEMA, ReadConfig, Shard, ShardDatasource
from qwen_batch.pipelines.stage import check_wiring
from qwen_batch.pipelines.write import WriteConfig, WriteStage

# Logical CPUs asked for by the light stages, so that on a small node they never starve the engine actor.
READ_CPUS = 0.25
PROMPT_CPUS = 0.5
WRITE_CPUS = 0.25
# Blocks are whole shards: Ray slices a block only past 1.5x this target, and planning keeps every shard far below it
# (pipelines.read.MAX_SHARD_BYTES).
MAX_BLOCK_BYTES = 4 << 30


def build_dataset(shards: list[Shard], read: ReadConfig, prompt: PromptConfig, engine: EngineConfig,
                  write: WriteConfig, replicas: ReplicaPlan, ledger: Any) -> Dataset:
    """A lazy dataset whose rows are one summary per committed shard; iterating it runs the job. `ledger` is the
    run's CrashLedger (pipelines.engine), which also counts engine restarts."""
    check_wiring([*BLOCK_SCHEMA.names, *read.carry_columns], [PromptStage, EngineStage, WriteStage])
    dataset = ray.data.read_datasource(ShardDatasource(shards, read), override_num_blocks=len(shards),
                                       num_cpus=READ_CPUS)
    # The dataset's own copy of the DataContext: every later stage inherits it, the process-wide one is untouched.
    dataset.context.target_max_block_size = MAX_BLOCK_BYTES
    dataset.context.enable_progress_bars = False
    most_replicas = replicas.max_replicas or replicas.replicas
    # Templating and tokenizing scale with the engines: up to one prompt actor per replica.
    dataset = dataset.map_batches(
        PromptStage, fn_constructor_args=(prompt,), batch_size=None, batch_format="pyarrow", num_cpus=PROMPT_CPUS,
        compute=ActorPoolStrategy(min_size=1, max_size=most_replicas),
    )
    mean_rows = max(1, round(sum(s.row_count for s in shards) / len(shards)))
    calls = min(shards_in_flight(replicas.max_num_seqs, mean_rows), 2 * replicas.max_num_seqs + 1)
    dataset = dataset.map_batches(
        EngineStage, fn_constructor_args=(replace(engine, ledger=ledger),), batch_size=None, batch_format="pyarrow",
        # Several shards run at each engine at once (see pipelines.engine), one more waits ready behind them.
        compute=ActorPoolStrategy(min_size=replicas.replicas, max_size=most_replicas,
                                  max_concurrent_calls_per_actor=calls, max_tasks_in_flight_per_actor=calls + 1,
                                  enable_true_multi_threading=True),
        num_cpus=replicas.num_cpus, num_gpus=replicas.num_gpus or None, runtime_env={"env_vars": replicas.env},
    )
    return dataset.map_batches(WriteStage(write), batch_size=None, batch_format="pyarrow", num_cpus=WRITE_CPUS)
