"""Side-by-side benchmark: raw vLLM, qwen-batch, Ray Data LLM and plain transformers on one dataset and one model.

Every mode answers the same generated rows (system + user chat, greedy, each row's own `max_tokens`, EOS ignored where
the mode allows it: the random-weight model does not emit it) with the same tiny random-weight Qwen2 checkpoint in
float32, each in its own fresh subprocess, so peak memory and engine state never leak from one mode into the next.

Workloads (`--workload`):

  long-tail  (default, 4,096 rows) each row's max_tokens drawn from a lognormal (median 24, sigma 1, in [1, 400]),
             as in real batches: a mode that waits for a batch's longest row before refilling drains its engine
  fixed      (2,048 rows) every row --max-tokens (default 32): plain decode throughput
  long-doc   (1,024 rows) prompts of about 2,000 tokens, max_tokens 8: the prompt stage (templating + tokenizing)

Modes (`--modes`):

  raw                vLLM's own generate loop in-process (token ids in, `uni` executor, no engine-core process):
                     `add_request` for every row, then `step()` until done, each step timed: the ceiling
  qwen-batch         `jobs.driver.run_job` on an OpenAI batch file (`input.format: openai-batch`, per-request
                     max_tokens), writing Parquet with accounting, on a local Ray
  ray-data-llm       `ray.data.llm.build_processor` in its defaults (batch_size, max_concurrent_batches untouched) with
                     a CPU vLLM engine actor, writing Parquet (its async engine runs the engine core in a child process
                     whatever VLLM_ENABLE_V1_MULTIPROCESSING says)
  ray-data-llm-best  the same in its fastest configuration found here (--ray-data-llm-batch,
                     --ray-data-llm-concurrent-batches)
  transformers       `AutoModelForCausalLM.generate` on left-padded batches of 8, as many Qwen guides show (fixed
                     workload only: too slow for the others)

Besides wall time and tokens/s, each engine mode reports its busy fraction (engine busy seconds over the time from
engine ready to its last output) and its mean running batch (rows in the running batch, averaged over busy time), so
an engine that drains between batches shows as a number; the issue's targets are printed as ratios with PASS/MISS.

Run from the repository root (the lead's `./run bench` does the same):

  python tests/bench.py                      # long-tail, every mode that fits it, table + bench.json
  python tests/bench.py --workload fixed     # adds transformers
  python tests/bench.py --workload long-doc --modes raw,qwen-batch
  python tests/bench.py --rows 96 --modes raw,qwen-batch
  python tests/bench.py --scaling            # qwen-batch only, max_tokens 1, 1k/10k/100k/1M rows: per-row overhead
  python tests/bench.py --scaling --scaling-sizes 10000 --rows-per-shard 1   # 10,000 shards of one row each
  python tests/bench.py --side-by-side       # two models of one job at once against each alone, on 2 raylets

Every qwen-batch run checks that each input row was committed exactly once (the `exactly once` column).

Caches, Ray's session folder and the model live in a temporary folder removed at the end (`--keep` keeps it);
nothing is downloaded (HF_HUB_OFFLINE=1). Every process a mode starts is ended when the mode ends.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODES = ("raw", "qwen-batch", "ray-data-llm", "ray-data-llm-best", "transformers")
REFERENCE_MODE = "qwen-batch"
VARIANT = "tiny-qwen2"
SYSTEM_PROMPT = "You are a careful assistant. Answer in one short paragraph."
KV_CACHE_GIB = 1.0
RAY_OBJECT_STORE_BYTES = 256 << 20
SAMPLE_INTERVAL_S = 0.2
TEXTS_COMPARED = 64
TRANSFORMERS_BATCH = 8
TRANSFORMERS_MAX_ROWS = 512
TRANSFORMERS_BUDGET_S = 90.0
# Ray Data LLM's fastest configuration in a quick try here (long-tail, 512 rows, 2 cores that other programs kept
# 40-75 % busy, so judged by engine ready to last output rather than wall): batch_size x max_concurrent_batches 32x16
# 27-31 s (two runs), 16x32 25 s, 16x16 37 s, 32x8 (its defaults) 40 s, 64x16 57 s, 64x8 83 s, 128x8 82 s. Each
# batch waits for its longest row, so on a long tail smaller batches, more of them at once, drain the engine less;
# 32x16 and 16x32 tie within the noise, and 32x16 keeps the library's batch size.
RAY_DATA_LLM_BEST_BATCH = 32
RAY_DATA_LLM_BEST_CONCURRENT_BATCHES = 16
LIGHT_STAGE_CPUS = 0.25
ROWS_PER_SHARD = 512
GIB = 1 << 30
NOISY_SHARE = 0.05
# A mode is killed after this, plus MODE_TIMEOUT_PER_ROW_S per row (1M scaling rows run for well over an hour).
MODE_TIMEOUT_S = 1800.0
MODE_TIMEOUT_PER_ROW_S = 0.01
WRITE_CHUNK_ROWS = 10_000
# --side-by-side: two models, each engine one core of its own (this machine's stand-in for a GPU each), and each
# model's half of the rows in many shards, as a real job's are, rather than two.
SIDE_BY_SIDE_MODELS = ("tiny-qwen2", "tiny-qwen3")
SIDE_BY_SIDE_ROWS = 2048
SIDE_BY_SIDE_ROWS_PER_SHARD = 64
SIDE_BY_SIDE_ENGINE_ENV = {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
# Share of one core an engine process uses in a sample interval for that interval to count as the engine working.
ENGINE_WORKING = 0.5

LONG_TAIL_MEDIAN = 24
LONG_TAIL_SIGMA = 1.0
LONG_TAIL_CAP = 400
# Every word in WORDS is one Qwen token with its leading space, so a body of N words is N tokens; with the task line
# and the chat template around it a long-doc prompt is about 1,990 tokens, leaving room for 8 output tokens in 2,048.
LONG_DOC_WORDS = 1950
LONG_DOC_SAMPLE = 16

TOPICS = ["the harbour", "a spreadsheet", "the night train", "an old kettle", "the school garden", "a power outage",
          "the quarterly report", "a lost umbrella", "the city library", "a mountain hut", "the new printer",
          "a delayed flight", "the bakery queue", "a chess club", "the river bridge", "a broken zipper"]
TASKS = ["Summarize", "Explain the main risk in", "Write a friendly reply to", "List two questions about",
         "Give a one-line title for", "Rewrite more formally"]
WORDS = ("after before during while because although however the a an this that some many every each our their "
         "report meeting customer order delivery invoice weather station platform ticket manager team budget plan "
         "week morning evening window door engine screen battery cable signal route map note letter message "
         "arrived stopped started changed moved failed worked waited called asked said noticed missed checked "
         "quickly slowly early late again twice nearly almost still never often quietly suddenly carefully").split()


# ---------------------------------------------------------------------------------------------------------------
# The shared inputs: one dataset per workload, one chat, one model.


@dataclass(frozen=True)
class Workload:
    """How a workload's rows are drawn and the sizes it runs at by default."""

    name: str
    rows: int  # default --rows
    max_tokens: int | None  # default --max-tokens for every row; None: each row's drawn from the long-tail lognormal
    body_words: tuple[int, int]  # fewest and most words in a row's text
    max_model_len: int
    summary: str


WORKLOADS = {
    "long-tail": Workload("long-tail", 4096, None, (12, 60), 1024,
                          f"lognormal per row (median {LONG_TAIL_MEDIAN}, sigma {LONG_TAIL_SIGMA:g}, in "
                          f"[1, {LONG_TAIL_CAP}])"),
    "fixed": Workload("fixed", 2048, 32, (12, 60), 1024, "every row the same max_tokens"),
    "long-doc": Workload("long-doc", 1024, 8, (LONG_DOC_WORDS, LONG_DOC_WORDS), 2048,
                         "prompts of about 2,000 tokens, short outputs"),
}


def long_tail_max_tokens(draw: random.Random) -> int:
    """One row's max_tokens from the long-tail lognormal, rounded, floored at 1 and capped."""
    return min(LONG_TAIL_CAP, max(1, round(draw.lognormvariate(math.log(LONG_TAIL_MEDIAN), LONG_TAIL_SIGMA))))


def make_rows(count: int, workload: Workload, max_tokens: int | None, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Deterministic rows (`id`, `text`, `max_tokens`), the same for every mode; texts and lengths have their own
    random streams, so the long-tail rows carry the same texts as the fixed ones."""
    texts, lengths = random.Random(seed), random.Random(seed + 1)
    fewest, most = workload.body_words
    for index in range(count):
        body = " ".join(texts.choices(WORDS, k=texts.randint(fewest, most)))
        text = f"{texts.choice(TASKS)} this note about {texts.choice(TOPICS)}: {body}."
        yield {"id": f"r{index:07d}", "text": text,
               "max_tokens": max_tokens if max_tokens is not None else long_tail_max_tokens(lengths)}


def chat(text: str) -> list[dict[str, str]]:
    """The chat every mode sends for a row: the system message, then the row's text as the user message."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}]


def openai_request(row: dict[str, Any], model: str = VARIANT) -> dict[str, Any]:
    """A row as one OpenAI batch request line, the way qwen-batch reads it."""
    return {"custom_id": row["id"], "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": chat(row["text"]), "max_tokens": row["max_tokens"],
                     "temperature": 0}}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file."""
    with path.open() as lines:
        return [json.loads(line) for line in lines if line.strip()]


@dataclass(frozen=True)
class Inputs:
    """One generated dataset, in the shapes the modes read."""

    workload: Workload
    rows_file: Path | None  # JSONL of {id, text, max_tokens}: raw, ray-data-llm, transformers
    openai_file: Path | None  # the same rows as OpenAI batch requests: qwen-batch
    max_tokens: list[int]  # each row's max_tokens, in row order

    @property
    def rows(self) -> int:
        return len(self.max_tokens)


def write_inputs(folder: Path, workload: Workload, rows: int, max_tokens: int | None, shapes: set[str]) -> Inputs:
    """Write the dataset streaming, in chunks, in the shapes asked for (`rows`, `openai`): a million rows never sit
    in memory as dicts or one string."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{workload.name}-{rows}-{max_tokens or 'drawn'}"
    paths = {"rows": folder / f"{stem}.jsonl" if "rows" in shapes else None,
             "openai": folder / f"{stem}.openai.jsonl" if "openai" in shapes else None}
    files = {shape: path.open("w") for shape, path in paths.items() if path is not None}
    lengths: list[int] = []
    chunks: dict[str, list[str]] = {shape: [] for shape in files}
    try:
        for row in make_rows(rows, workload, max_tokens):
            lengths.append(row["max_tokens"])
            if "rows" in chunks:
                chunks["rows"].append(json.dumps(row))
            if "openai" in chunks:
                chunks["openai"].append(json.dumps(openai_request(row)))
            if len(lengths) % WRITE_CHUNK_ROWS == 0:
                _flush(files, chunks)
        _flush(files, chunks)
    finally:
        for handle in files.values():
            handle.close()
    return Inputs(workload, paths["rows"], paths["openai"], lengths)


def _flush(files: dict[str, Any], chunks: dict[str, list[str]]) -> None:
    for shape, lines in chunks.items():
        if lines:
            files[shape].write("\n".join(lines) + "\n")
            lines.clear()


@dataclass(frozen=True)
class WorkerConfig:
    """What one mode's subprocess needs; written as JSON next to the run."""

    mode: str
    rows_file: str | None
    openai_file: str | None
    output_dir: str
    model: str
    max_tokens: int  # the largest row max_tokens: qwen-batch's sampling default, transformers' budget
    max_model_len: int
    rows_per_shard: int
    cores: int
    ray_temp_dir: str
    result_file: str
    row_limit: int | None = None
    time_budget_s: float | None = None
    # None leaves Ray Data LLM's own default.
    ray_data_llm_batch: int | None = None
    ray_data_llm_concurrent_batches: int | None = None
    ray_data_llm_stages: str = "template"
    # qwen-batch only: the models of the job (several: routed by each request's body.model), a multi-node cluster on
    # this machine instead of one local node (its worker nodes; 0: none), and engine.env.
    models: tuple[str, ...] = (VARIANT,)
    cluster_workers: int = 0
    engine_env: dict[str, str] | None = None


# ---------------------------------------------------------------------------------------------------------------
# The modes. Each runs inside a fresh worker process, starting its clock before its heavy imports, and returns
# what it measured; `output_tokens` always comes from token ids the engine or model produced. Times named `*_s`
# without `seconds` are offsets from the worker's start.


def engine_env(cores: int) -> dict[str, str]:
    """The CPU engine settings qwen-batch gives its engine actors, plus the in-process engine core."""
    from qwen_batch.cluster.resources import cpu_engine_env

    env = cpu_engine_env(1, KV_CACHE_GIB)
    env["OMP_NUM_THREADS"] = str(cores)
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


def vllm_engine_kwargs(max_model_len: int) -> dict[str, Any]:
    """vLLM engine keywords shared by the raw and Ray Data LLM modes (qwen-batch derives the same from its spec)."""
    return {"dtype": "float32", "enforce_eager": True, "distributed_executor_backend": "uni",
            "max_model_len": max_model_len, "seed": 0}


def run_raw(config: WorkerConfig, started: float) -> dict[str, Any]:
    """vLLM's best single-process path: tokenize in the driver, then the loop `LLM.generate` runs (add every request,
    step until none is unfinished), each step timed and the rows it advanced counted."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    imported = time.monotonic()
    rows = read_jsonl(Path(config.rows_file))
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    texts = [tokenizer.apply_chat_template(chat(row["text"]), tokenize=False, add_generation_prompt=True)
             for row in rows]
    token_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    tokenized = time.monotonic()
    llm = LLM(model=config.model, **vllm_engine_kwargs(config.max_model_len))
    engine = llm.llm_engine
    engine_ready = time.monotonic()
    for index, (row, ids) in enumerate(zip(rows, token_ids)):
        engine.add_request(str(index), TokensPrompt(prompt_token_ids=ids),
                           SamplingParams(max_tokens=row["max_tokens"], temperature=0.0, ignore_eos=True))
    added = last_output = time.monotonic()
    busy_seconds = batch_seconds = 0.0
    steps = 0
    finished: dict[str, Any] = {}
    while engine.has_unfinished_requests():
        step_started = time.monotonic()
        outputs = engine.step()
        last_output = time.monotonic()
        busy_seconds += last_output - step_started
        batch_seconds += len(outputs) * (last_output - step_started)
        steps += 1
        for output in outputs:
            if output.finished:
                finished[output.request_id] = output
    outputs = [finished[str(index)] for index in range(len(rows))]
    completions = [output.outputs[0] for output in outputs]
    table = pa.table({
        "id": [row["id"] for row in rows],
        "generated_text": [c.text for c in completions],
        "finish_reason": [c.finish_reason for c in completions],
        "prompt_tokens": [len(output.prompt_token_ids) for output in outputs],
        "completion_tokens": [len(c.token_ids) for c in completions],
    })
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    pq.write_table(table, Path(config.output_dir) / "part-0.parquet", compression="zstd")
    written = time.monotonic()
    return {
        "rows": table.num_rows, "output_tokens": sum(len(c.token_ids) for c in completions),
        "prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs),
        "finish_reasons": _count(c.finish_reason for c in completions),
        "wall_s": written - started, "engine_start_s": engine_ready - tokenized,
        "engine_ready_s": engine_ready - started, "last_output_s": last_output - started,
        "engine_seconds": busy_seconds, "mean_running_batch": batch_seconds / busy_seconds if busy_seconds else None,
        "steps": steps,
        # Rows are written once all are done: nothing is out before the whole batch is.
        "first_output_s": written - started,
        "phases_s": {"imports": imported - started, "read_and_tokenize": tokenized - imported,
                     "engine_start": engine_ready - tokenized, "add_requests": added - engine_ready,
                     "generate": last_output - added, "write": written - last_output},
        "texts": dict(zip(table.column("id").to_pylist(), table.column("generated_text").to_pylist())),
    }


def start_ray(config: WorkerConfig, num_cpus: int) -> None:
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=RAY_OBJECT_STORE_BYTES,
             _temp_dir=config.ray_temp_dir, log_to_driver=True)


def qwen_batch_spec(config: WorkerConfig) -> dict[str, Any]:
    """The job spec: an OpenAI batch file in (chats and max_tokens per request, so no `prompt`), Parquet out."""
    models = [{"variant": name, "max_model_len": config.max_model_len} for name in config.models]
    spec = {
        "name": "bench",
        "input": {"path": config.openai_file, "format": "openai-batch", "rows_per_shard": config.rows_per_shard},
        # Every request carries its own max_tokens; the job's is the largest, for rows that would not.
        "sampling": {"max_tokens": config.max_tokens, "temperature": 0, "top_p": 1.0, "seed": 0},
        # On a cluster of this machine's raylets every node sees the same folder.
        "output": {"path": config.output_dir, "shared": bool(config.cluster_workers)},
    }
    spec.update({"models": models, "route_column": "model"} if len(models) > 1 else {"model": models[0]})
    if config.cluster_workers:
        spec["resources"] = {"replicas": 1}
    if config.engine_env:
        spec["engine"] = {"env": config.engine_env}
    return spec


def run_qwen_batch(config: WorkerConfig, started: float) -> dict[str, Any]:
    """qwen-batch end to end: an OpenAI batch file in, Parquet with accounting, commit records and the manifest out."""
    import pyarrow.parquet as pq
    import ray

    from clusters import local_cluster  # tests/, the script's folder, is first on sys.path
    from qwen_batch.cluster.local import job_log_file
    from qwen_batch.jobs.driver import run_job
    from qwen_batch.schemas.spec import load_spec

    imported = time.monotonic()
    if config.cluster_workers:
        # A head that runs nothing, and worker nodes with the CPUs a CPU engine and the light stages ask for.
        worker = {"num_cpus": config.cores, "object_store_memory": RAY_OBJECT_STORE_BYTES}
        with local_cluster("qb-bench-", {"num_cpus": 0, "object_store_memory": RAY_OBJECT_STORE_BYTES},
                           [worker] * config.cluster_workers) as cluster:
            ray_ready = time.monotonic()
            manifest = run_job(load_spec(qwen_batch_spec(config)), address=cluster.address)
            finished = time.monotonic()
    else:
        start_ray(config, config.cores)
        ray_ready = time.monotonic()
        manifest = run_job(load_spec(qwen_batch_spec(config)))
        finished = time.monotonic()
        ray.shutdown()
    output = Path(config.output_dir)
    commits = [json.loads(p.read_text()) for p in sorted(output.glob("_commits/*/*.json"))]
    started_wall = _wall_clock(started)
    committed_at = sorted(datetime.fromisoformat(c["committed_at"]).timestamp() for c in commits)
    data_files = sorted((f for name in config.models for f in output.glob(f"{name}/part-*.parquet")),
                        key=lambda p: p.stat().st_mtime)
    texts = _parquet_texts(output / config.models[0])
    planned = sum(1 for _ in open(config.openai_file))
    # Every planned row committed once: as many rows as input lines (bench ids are unique, and each row goes to one
    # model), one commit record per shard and model, and no data file that no commit names.
    rows_out = sum(pq.read_metadata(path).num_rows for path in data_files)
    exactly_once = (manifest.complete and manifest.rows_in == rows_out == planned
                    and len(commits) == manifest.shards == len(data_files)
                    and (len(config.models) > 1 or len(texts) == planned))
    return {
        "exactly_once": exactly_once,
        "rows": manifest.rows_in, "output_tokens": manifest.totals.completion_tokens,
        "prompt_tokens": manifest.totals.prompt_tokens, "finish_reasons": manifest.totals.finish_reasons,
        "rows_failed": manifest.rows_failed, "engine_seconds": manifest.engine_seconds,
        "mean_running_batch": manifest.mean_running_batch, "wall_s": finished - started,
        "engine_start_s": None,
        # Engine ready comes from vLLM's log line (whole seconds) in the run's log file, where qwen-batch sends Ray's
        # and vLLM's output; the last output is the last data file written.
        "engine_ready_s": None, "engine_log_file": str(job_log_file(manifest.job_id, manifest.runs[-1].run_id)),
        "last_output_s": data_files[-1].stat().st_mtime - started_wall if data_files else None,
        # Commit records stamp whole seconds (truncated); the first data file's mtime is the finer figure.
        "first_output_s": committed_at[0] - started_wall if committed_at else None,
        "first_output_file_s": data_files[0].stat().st_mtime - started_wall if data_files else None,
        "shards": manifest.shards,
        "commit_offsets_s": [round(t - started_wall, 2) for t in committed_at],
        "engine_seconds_by_model": {name: totals.engine_seconds for name, totals in manifest.per_variant.items()},
        "phases_s": {"imports": imported - started, "ray_init": ray_ready - imported,
                     "run_job": finished - ray_ready},
        "texts": texts,
    }


def run_ray_data_llm(config: WorkerConfig, started: float) -> dict[str, Any]:
    """Ray Data LLM's processor with a CPU vLLM engine actor; rows from the JSONL file, Parquet out. Batch size and
    concurrent batches are passed only when set, so `ray-data-llm` runs the library's defaults."""
    import pyarrow.parquet as pq
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    imported = time.monotonic()
    stages = config.ray_data_llm_stages
    start_ray(config, config.cores)
    ray_ready = time.monotonic()
    # Every CPU stage and task defaults to 1 logical CPU: with the engine actor's 1 that starves the read task on a
    # 2-CPU node (the job waits forever). The light parts get the fractions qwen-batch gives its own light stages.
    light = {"num_cpus": LIGHT_STAGE_CPUS}
    tokenize_in_ray = stages == "all"
    tuned = {name: value for name, value in (("batch_size", config.ray_data_llm_batch),
                                             ("max_concurrent_batches", config.ray_data_llm_concurrent_batches))
             if value is not None}
    processor_config = vLLMEngineProcessorConfig(
        model_source=config.model,
        engine_kwargs=vllm_engine_kwargs(config.max_model_len),
        runtime_env={"env_vars": engine_env(config.cores)},
        **tuned,
        placement_group_config={"bundles": [{"CPU": 1}]},
        # True (the default) makes vLLM build Ray Prometheus metrics, which import `ray.serve`: without ray[serve]
        # installed the engine fails to start ("RayPrometheusMetric requires Ray to be installed").
        log_engine_metrics=False,
        chat_template_stage={"enabled": True, **light},
        tokenize_stage={"enabled": tokenize_in_ray, **light},
        detokenize_stage={"enabled": tokenize_in_ray, **light},
    )
    sampling = {"temperature": 0.0, "ignore_eos": True}
    if tokenize_in_ray:
        sampling["detokenize"] = False
    processor = build_processor(
        processor_config,
        preprocess=lambda row: {"messages": chat(row["text"]),
                                "sampling_params": {**sampling, "max_tokens": int(row["max_tokens"])}},
        postprocess=lambda row: {
            "id": row["id"], "generated_text": row["generated_text"],
            "completion_tokens": len(row["generated_tokens"]), "prompt_tokens": row["num_input_tokens"],
            "scheduled_ts": (row.get("metrics") or {}).get("scheduled_ts"),
            "last_token_ts": (row.get("metrics") or {}).get("last_token_ts"),
        },
        preprocess_map_kwargs=light,
        postprocess_map_kwargs=light,
    )
    dataset = processor(ray.data.read_json(config.rows_file, num_cpus=LIGHT_STAGE_CPUS))
    dataset.write_parquet(config.output_dir, ray_remote_args=light)
    finished = time.monotonic()
    ray.shutdown()
    started_wall = _wall_clock(started)
    table = pq.read_table(config.output_dir)
    files = sorted(Path(config.output_dir).glob("*.parquet"), key=lambda p: p.stat().st_mtime)
    scheduled, last_token = table.column("scheduled_ts").to_pylist(), table.column("last_token_ts").to_pylist()
    # vLLM stamps these with time.monotonic() in the engine core: the system-wide clock this worker's `started` uses.
    intervals = [(start, stop) for start, stop in zip(scheduled, last_token) if start and stop]
    complete = len(intervals) == table.num_rows
    busy_seconds = _busy_seconds(intervals) if complete else None
    return {
        "rows": table.num_rows, "output_tokens": int(sum(table.column("completion_tokens").to_pylist())),
        "prompt_tokens": int(sum(table.column("prompt_tokens").to_pylist())),
        "finish_reasons": None, "engine_start_s": None, "wall_s": finished - started,
        # Time the engine had at least one request scheduled, from vLLM's per-request timestamps.
        "engine_seconds": busy_seconds,
        # Each request's residency summed over busy time: the rows in the running batch on average.
        "mean_running_batch": (sum(stop - start for start, stop in intervals) / busy_seconds
                               if busy_seconds else None),
        "engine_ready_s": None,
        "last_output_s": max(stop for _, stop in intervals) - started if complete and intervals else None,
        "first_output_s": None,
        "first_output_file_s": files[0].stat().st_mtime - started_wall if files else None,
        "config": {"stages": stages, "logical_cpus": config.cores, "light_stage_cpus": LIGHT_STAGE_CPUS,
                   "batch_size": processor_config.batch_size,
                   "max_concurrent_batches": processor_config.max_concurrent_batches,
                   "max_tasks_in_flight_per_actor": processor_config.max_tasks_in_flight_per_actor,
                   "max_pending_requests": processor_config.max_pending_requests,
                   "concurrency": processor_config.concurrency, "tuned": sorted(tuned)},
        "phases_s": {"imports": imported - started, "ray_init": ray_ready - imported,
                     "pipeline": finished - ray_ready},
        "texts": dict(zip(table.column("id").to_pylist(), table.column("generated_text").to_pylist())),
    }


def run_transformers(config: WorkerConfig, started: float) -> dict[str, Any]:
    """The loop many Qwen guides show: chat template, left padding, batches of 8, `model.generate`, greedy."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    imported = time.monotonic()
    torch.set_num_threads(config.cores)
    rows = read_jsonl(Path(config.rows_file))[: config.row_limit]
    tokenizer = AutoTokenizer.from_pretrained(config.model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32).eval()
    loaded = time.monotonic()
    eos_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    ids, texts, completion_tokens, prompt_tokens = [], [], [], []
    first_batch_done = None
    for start in range(0, len(rows), TRANSFORMERS_BATCH):
        batch = rows[start:start + TRANSFORMERS_BATCH]
        prompts = [tokenizer.apply_chat_template(chat(r["text"]), tokenize=False, add_generation_prompt=True)
                   for r in batch]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        longest = max(r["max_tokens"] for r in batch)
        with torch.inference_mode():
            # min_new_tokens = max_new_tokens is transformers' way to ignore EOS; each row keeps its own max_tokens.
            out = model.generate(**encoded, max_new_tokens=longest, min_new_tokens=longest,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new_tokens = out[:, encoded["input_ids"].shape[1]:].tolist()
        for row, tokens, mask in zip(batch, new_tokens, encoded["attention_mask"].tolist()):
            tokens = tokens[: row["max_tokens"]]
            ends = [i for i, token in enumerate(tokens) if token in eos_ids]
            kept = tokens[: ends[0] + 1] if ends else tokens
            ids.append(row["id"])
            completion_tokens.append(len(kept))
            prompt_tokens.append(sum(mask))
            texts.append(tokenizer.decode(kept, skip_special_tokens=True))
        if first_batch_done is None:
            first_batch_done = time.monotonic()
        if config.time_budget_s is not None and time.monotonic() - loaded > config.time_budget_s:
            break
    generated = time.monotonic()
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "generated_text": texts, "prompt_tokens": prompt_tokens,
                             "completion_tokens": completion_tokens}),
                   Path(config.output_dir) / "part-0.parquet", compression="zstd")
    written = time.monotonic()
    return {
        "rows": len(ids), "output_tokens": sum(completion_tokens), "prompt_tokens": sum(prompt_tokens),
        "finish_reasons": None, "engine_start_s": loaded - imported, "engine_seconds": generated - loaded,
        "engine_ready_s": loaded - started, "last_output_s": generated - started, "mean_running_batch": None,
        "wall_s": written - started,
        "first_output_s": (first_batch_done - started) if first_batch_done else None,
        "scalable_s": generated - loaded,
        "phases_s": {"imports": imported - started, "load": loaded - imported, "generate": generated - loaded,
                     "write": written - generated},
        "texts": dict(zip(ids, texts)),
    }


RUNNERS: dict[str, Callable[[WorkerConfig, float], dict[str, Any]]] = {
    "raw": run_raw, "qwen-batch": run_qwen_batch, "ray-data-llm": run_ray_data_llm,
    "ray-data-llm-best": run_ray_data_llm, "transformers": run_transformers,
}


def _wall_clock(monotonic: float) -> float:
    """The wall-clock time (epoch seconds) of a `time.monotonic()` reading, to compare with file times."""
    return time.time() - (time.monotonic() - monotonic)


def _count(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def _busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of time intervals."""
    busy, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        busy += stop - max(start, end)
        end = stop
    return busy


def _parquet_texts(folder: Path) -> dict[str, str]:
    import pyarrow.parquet as pq

    table = pq.read_table(folder, columns=["id", "generated_text"])
    return dict(zip(table.column("id").to_pylist(), table.column("generated_text").to_pylist()))


def worker_main(config_file: str) -> int:
    """Entry point of a mode's subprocess: run the mode, write what it measured as JSON."""
    started, started_wall = time.monotonic(), time.time()
    config = WorkerConfig(**json.loads(Path(config_file).read_text()))
    if config.mode == "raw":
        os.environ.update(engine_env(config.cores))
    elif config.mode == "transformers":
        os.environ["OMP_NUM_THREADS"] = str(config.cores)
    measured = RUNNERS[config.mode](config, started)
    measured["started_wall"] = started_wall
    texts = dict(sorted(measured.pop("texts", {}).items())[:TEXTS_COMPARED])
    measured["driver_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    measured["children_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    Path(config.result_file).write_text(json.dumps(measured))
    Path(config.result_file + ".texts").write_text(json.dumps(texts))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# The parent: a fresh subprocess per mode, its process tree sampled for memory, every process it left ended.


class TreeSampler(threading.Thread):
    """Samples the RSS of a process and all its descendants every 0.2 s; keeps the peaks, every pid seen and the CPU
    time each used, so the CPU that other programs took meanwhile can be told apart (`foreign_cpu_share`)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        import psutil

        self.root = psutil.Process(pid)
        self.stop = threading.Event()
        self.driver_peak = 0
        self.tree_peak = 0
        self.tree_peak_processes = 0
        self.tree_peak_breakdown: list[tuple[str, int]] = []
        self.seen: dict[int, float] = {}
        self.cpu_seconds: dict[int, float] = {}
        self.labels: dict[int, str] = {}
        # (wall time, CPU seconds so far) of each engine actor process at every sample: when each engine worked.
        self.engine_cpu: dict[int, list[tuple[float, float]]] = {}
        self.started = time.monotonic()
        self.busy_at_start = _system_busy_seconds()

    def cpu_by_label(self) -> list[tuple[str, float]]:
        """CPU seconds each kind of process used (as last sampled), largest first."""
        grouped: dict[str, float] = {}
        for pid, seconds in self.cpu_seconds.items():
            label = self.labels.get(pid, f"pid {pid}")
            grouped[label] = grouped.get(label, 0.0) + seconds
        return sorted(grouped.items(), key=lambda item: -item[1])

    def foreign_cpu_share(self) -> float:
        """Share of all cores that processes outside the tree kept busy since the sampler started (0 = idle box)."""
        elapsed = time.monotonic() - self.started
        foreign = _system_busy_seconds() - self.busy_at_start - sum(self.cpu_seconds.values())
        return max(0.0, foreign) / (elapsed * (os.cpu_count() or 1)) if elapsed > 0 else 0.0

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            sizes: list[tuple[psutil.Process, int]] = []
            for process in processes:
                try:
                    sizes.append((process, process.memory_info().rss))
                    self.seen.setdefault(process.pid, process.create_time())
                    cpu = process.cpu_times()
                    self.cpu_seconds[process.pid] = cpu.user + cpu.system
                    self.labels[process.pid] = _label(process) or self.labels.get(process.pid, f"pid {process.pid}")
                    if "EngineStage" in self.labels[process.pid]:
                        self.engine_cpu.setdefault(process.pid, []).append((time.time(), cpu.user + cpu.system))
                except psutil.Error:
                    continue
                if process.pid == self.root.pid:
                    self.driver_peak = max(self.driver_peak, sizes[-1][1])
            total = sum(rss for _, rss in sizes)
            if total > self.tree_peak:
                self.tree_peak, self.tree_peak_processes = total, len(sizes)
                self.tree_peak_breakdown = sorted(((self.labels.get(p.pid, "?"), rss) for p, rss in sizes),
                                                  key=lambda x: -x[1])
            self.stop.wait(SAMPLE_INTERVAL_S)


def _system_busy_seconds() -> float:
    """CPU seconds all cores have spent not idle since boot."""
    import psutil

    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def engine_work(samples: dict[int, list[tuple[float, float]]], log_file: Path,
                started_wall: float) -> dict[str, dict[str, Any]]:
    """Per engine actor, from its CPU samples and vLLM's log lines: the model it ran, when it was ready (vLLM's
    `init engine` line, whole seconds) and the sample intervals after that in which it used at least ENGINE_WORKING
    of a core, as offsets from the mode's start."""
    import re

    text = log_file.read_text(errors="replace") if log_file.exists() else ""
    year = datetime.fromtimestamp(started_wall).year
    actor = r"pid=(\d+)(?:, ip=[^)]*)?\)"  # Ray's prefix of a worker's line; on a cluster it names the node's ip
    models = dict(re.findall(actor + r".*Initializing a V1 LLM engine.*?model='([^']+)'", text))
    ready = {pid: datetime.strptime(f"{year}-{stamp}", "%Y-%m-%d %H:%M:%S").timestamp() for pid, stamp in
             re.findall(actor + r".*(?:INFO|WARNING) (\d\d-\d\d \d\d:\d\d:\d\d) \[core\.py:\d+\] init engine",
                        text)}
    found = {}
    for pid, points in samples.items():
        key = str(pid)
        if key not in ready:
            continue
        working = [(start - started_wall, stop - started_wall) for (start, used), (stop, used_after)
                   in zip(points, points[1:])
                   if start >= ready[key] and (used_after - used) >= ENGINE_WORKING * (stop - start)]
        found[key] = {"model": Path(models.get(key, "?")).name, "ready_s": ready[key] - started_wall,
                      "working_s": working}
    return found


def _both_working_s(first: list[list[float]], second: list[list[float]]) -> float:
    """Seconds in which both engines were working: the overlap of their working intervals."""
    return sum(max(0.0, min(a_end, b_end) - max(a_start, b_start))
               for a_start, a_end in first for b_start, b_end in second)


def _label(process: Any) -> str | None:
    """A short name for a process: Ray's worker title (`ray::MapWorker(...)`), the program and its script or module,
    or None when it is gone (a zombie has no command line)."""
    import psutil

    try:
        command = process.cmdline()
    except psutil.Error:
        return None
    if not command:
        return None
    if command[0].startswith("ray::"):
        return command[0].split(" ")[0].removesuffix(".submit")[:60]
    program = Path(command[0]).name
    if not program.startswith("python"):
        return program[:60]
    if "-m" in command[1:-1]:
        return f"{program} -m {command[command.index('-m') + 1]}"[:60]
    script = next((Path(arg).name for arg in command[1:] if arg.endswith(".py")), None)
    return f"{program} {script or ' '.join(command[1:2])}".strip()[:60]


def end_leftovers(seen: dict[int, float], own_pid: int) -> list[int]:
    """End the processes a mode started that are still alive (matched by pid and start time); their pids."""
    import psutil
    from processes import stop_processes  # tests/, the script's folder, is first on sys.path

    alive = []
    for pid, created in seen.items():
        if pid == own_pid:
            continue
        try:
            process = psutil.Process(pid)
            if abs(process.create_time() - created) < 0.01:
                alive.append(process)
        except psutil.Error:
            continue
    stop_processes(alive, timeout_s=10)
    return [p.pid for p in alive]


@dataclass
class ModeResult:
    """What one mode measured, as reported."""

    mode: str
    ok: bool
    rows: int | None = None
    rows_measured: int | None = None
    extrapolated: bool = False
    wall_s: float | None = None
    wall_measured_s: float | None = None
    output_tokens: int | None = None
    output_tokens_expected: int | None = None
    prompt_tokens: int | None = None
    e2e_tokens_per_s: float | None = None
    engine_seconds: float | None = None
    engine_tokens_per_s: float | None = None
    engine_start_s: float | None = None
    engine_ready_offset_s: float | None = None
    last_output_offset_s: float | None = None
    busy_fraction: float | None = None
    mean_running_batch: float | None = None
    first_output_s: float | None = None
    first_output_file_s: float | None = None
    driver_peak_rss_bytes: int | None = None
    tree_peak_rss_bytes: int | None = None
    tree_peak_processes: int | None = None
    tree_peak_breakdown: list[tuple[str, int]] = field(default_factory=list)
    cpu_seconds_by_process: list[tuple[str, float]] = field(default_factory=list)
    driver_maxrss_bytes: int | None = None
    children_maxrss_bytes: int | None = None
    ended_leftover_pids: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    other_cpu_share: float | None = None
    error: str | None = None
    log_file: str | None = None


def run_mode(mode: str, root: Path, inputs: Inputs, cores: int, args: argparse.Namespace,
             tag: str | None = None, job: dict[str, Any] | None = None) -> ModeResult:
    """Run one mode in a fresh subprocess and collect its figures; `job` sets WorkerConfig's qwen-batch fields."""

    name = tag or mode
    rows = inputs.rows
    folder = root / "runs" / name
    folder.mkdir(parents=True, exist_ok=True)
    row_limit = min(rows, args.transformers_rows) if mode == "transformers" else None
    budget = args.transformers_seconds if mode == "transformers" else None
    best = mode == "ray-data-llm-best"
    config = WorkerConfig(mode=mode, rows_file=str(inputs.rows_file) if inputs.rows_file else None,
                          openai_file=str(inputs.openai_file) if inputs.openai_file else None,
                          output_dir=str(folder / "output"), model=str(root / "models" / "qwen-batch" / VARIANT),
                          max_tokens=max(inputs.max_tokens), max_model_len=inputs.workload.max_model_len,
                          rows_per_shard=args.rows_per_shard, cores=cores, ray_temp_dir=str(root / "ray"),
                          result_file=str(folder / "result.json"), row_limit=row_limit, time_budget_s=budget,
                          ray_data_llm_batch=args.ray_data_llm_batch if best else None,
                          ray_data_llm_concurrent_batches=args.ray_data_llm_concurrent_batches if best else None,
                          ray_data_llm_stages=args.ray_data_llm_stages)
    config = replace(config, **(job or {}))
    config_file = folder / "config.json"
    config_file.write_text(json.dumps(asdict(config)))
    log_file = folder / "log.txt"
    timeout = args.mode_timeout or MODE_TIMEOUT_S + MODE_TIMEOUT_PER_ROW_S * rows
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {row_limit or rows} rows, {_tokens_label(inputs)} "
          f"(log: {log_file})", flush=True)
    with log_file.open("w") as log:
        child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(config_file)],
                                 cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                 env={**os.environ, **cache_env(folder / "cache")})
        sampler = TreeSampler(child.pid)
        sampler.start()
        try:
            code = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            # Also on Ctrl-C: Ray's workers run in their own sessions, so each process seen is ended by pid.
            sampler.stop.set()
            sampler.join()
            foreign_share = sampler.foreign_cpu_share()
            leftovers = end_leftovers(sampler.seen, os.getpid())
            if child.poll() is None:
                child.kill()
            child.wait()
    result = ModeResult(mode=name, ok=False, driver_peak_rss_bytes=sampler.driver_peak,
                        tree_peak_rss_bytes=sampler.tree_peak, tree_peak_processes=sampler.tree_peak_processes,
                        tree_peak_breakdown=sampler.tree_peak_breakdown,
                        cpu_seconds_by_process=[(label, round(sec, 2)) for label, sec in sampler.cpu_by_label()],
                        ended_leftover_pids=leftovers, log_file=str(log_file),
                        other_cpu_share=round(foreign_share, 3))
    result_file = Path(config.result_file)
    if code != 0 or not result_file.exists():
        tail = log_file.read_text(errors="replace").splitlines()[-25:]
        result.error = f"exit code {code}; last log lines:\n" + "\n".join(tail)
        print(f"  FAILED: {result.error}", flush=True)
        return result
    measured = json.loads(result_file.read_text())
    result.ok = True
    result.rows, result.rows_measured = rows, measured["rows"]
    result.extrapolated = measured["rows"] != rows
    result.wall_measured_s = result.wall_s = measured["wall_s"]
    result.output_tokens = measured["output_tokens"]
    result.output_tokens_expected = sum(inputs.max_tokens[: measured["rows"]])
    result.prompt_tokens = measured["prompt_tokens"]
    result.e2e_tokens_per_s = measured["output_tokens"] / measured["wall_s"]
    if result.extrapolated and measured["rows"]:
        # Only the generate loop grows with rows; imports and model load are paid once.
        scale = rows / measured["rows"]
        result.wall_s = measured["wall_s"] - measured["scalable_s"] + measured["scalable_s"] * scale
        result.e2e_tokens_per_s = measured["output_tokens"] * scale / result.wall_s
    result.engine_seconds = measured["engine_seconds"]
    if measured["engine_seconds"]:
        result.engine_tokens_per_s = measured["output_tokens"] / measured["engine_seconds"]
    engine_log = Path(measured.get("engine_log_file") or log_file)
    engine_log = engine_log if engine_log.exists() else log_file
    logged_start, logged_ready = engine_times_from_log(engine_log, measured["started_wall"])
    result.engine_start_s = measured["engine_start_s"] if measured["engine_start_s"] is not None else logged_start
    measured_ready = measured["engine_ready_s"]
    result.engine_ready_offset_s = measured_ready if measured_ready is not None else logged_ready
    result.last_output_offset_s = measured["last_output_s"]
    result.mean_running_batch = measured["mean_running_batch"]
    ready, last = result.engine_ready_offset_s, result.last_output_offset_s
    if result.engine_seconds and ready is not None and last is not None and last > ready:
        result.busy_fraction = result.engine_seconds / (last - ready)
    result.first_output_s = measured["first_output_s"]
    result.first_output_file_s = measured.get("first_output_file_s")
    result.driver_maxrss_bytes = measured["driver_maxrss_bytes"]
    result.children_maxrss_bytes = measured["children_maxrss_bytes"]
    result.extra = {key: measured[key] for key in ("phases_s", "finish_reasons", "shards", "commit_offsets_s",
                                                   "config", "rows_failed", "steps", "exactly_once",
                                                   "engine_seconds_by_model")
                    if measured.get(key) is not None}
    if sampler.engine_cpu:
        result.extra["engines"] = engine_work(sampler.engine_cpu, engine_log, measured["started_wall"])
    print(f"  done: wall {result.wall_measured_s:.1f} s, {result.output_tokens} output tokens, "
          f"tree peak {_gib(result.tree_peak_rss_bytes)}, other programs used {foreign_share:.0%} of the cores",
          flush=True)
    return result


def engine_times_from_log(log_file: Path, started_wall: float) -> tuple[float | None, float | None]:
    """(engine start, engine ready offset) of an engine inside a Ray actor, to the second, from the log: start is
    Ray Data starting the dataset (it then creates the engine actor, which imports vLLM and builds the engine) to vLLM's
    `init engine ... took` line; the offset is that line's time after the mode began."""
    import re

    text = log_file.read_text(errors="replace")
    ready = re.search(r"(?:INFO|WARNING) (\d\d-\d\d \d\d:\d\d:\d\d) \[core\.py:\d+\] init engine", text)
    if not ready:
        return None, None
    year = datetime.fromtimestamp(started_wall).year
    ready_at = datetime.strptime(f"{year}-{ready.group(1)}", "%Y-%m-%d %H:%M:%S").timestamp()
    # Ray's own format on the terminal, or the logger's name in qwen-batch's run log file.
    execution = re.search(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\s+INFO (?:streaming_executor\.py:\d+ --|"
                          r"ray\.data\._internal\.execution\.streaming_executor:) Starting execution",
                          text, re.MULTILINE)
    if not execution:
        return None, ready_at - started_wall
    executed_at = datetime.strptime(execution.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return ready_at - executed_at, ready_at - started_wall


def texts_agreement(root: Path, modes: list[str]) -> dict[str, float]:
    """Share of rows whose text equals the raw mode's, for the modes that ran (greedy should agree)."""
    reference_file = root / "runs" / "raw" / "result.json.texts"
    if not reference_file.exists():
        return {}
    reference = json.loads(reference_file.read_text())
    shares = {}
    for mode in modes:
        texts_file = root / "runs" / mode / "result.json.texts"
        if mode == "raw" or not texts_file.exists():
            continue
        texts = json.loads(texts_file.read_text())
        common = [key for key in texts if key in reference]
        if common:
            shares[mode] = sum(texts[key] == reference[key] for key in common) / len(common)
    return shares


def ratios(results: list[ModeResult]) -> dict[str, dict[str, float | None]]:
    """qwen-batch's wall time and tokens/s over each other mode's (wall < 1 and tokens/s > 1 mean qwen-batch wins)."""
    by_mode = {r.mode: r for r in results if r.ok}
    reference = by_mode.get(REFERENCE_MODE)
    if reference is None:
        return {}
    found = {}
    for mode, other in by_mode.items():
        if mode == REFERENCE_MODE:
            continue
        found[mode] = {
            "wall": reference.wall_s / other.wall_s if other.wall_s else None,
            "e2e_tokens_per_s": reference.e2e_tokens_per_s / other.e2e_tokens_per_s if other.e2e_tokens_per_s else None,
            "engine_tokens_per_s": (reference.engine_tokens_per_s / other.engine_tokens_per_s
                                    if reference.engine_tokens_per_s and other.engine_tokens_per_s else None),
            "tree_peak_rss": (reference.tree_peak_rss_bytes / other.tree_peak_rss_bytes
                              if other.tree_peak_rss_bytes else None),
        }
    return found


@dataclass(frozen=True)
class Target:
    """One of the issue's targets: qwen-batch's `metric` over another mode's, at least `at_least` (or within
    `within` of 1)."""

    other: str
    metric: str
    at_least: float | None = None
    within: float | None = None

    @property
    def label(self) -> str:
        bound = f">= {self.at_least:.2f}" if self.at_least is not None else f"within {self.within:.0%}"
        return f"qwen-batch {METRIC_LABELS[self.metric]} / {self.other}'s {bound}"

    def check(self, by_mode: dict[str, ModeResult]) -> dict[str, Any]:
        """The ratio and PASS/MISS, or no verdict when either mode did not run or lacks the figure."""
        mine, theirs = by_mode.get(REFERENCE_MODE), by_mode.get(self.other)
        ratio = None
        if mine is not None and theirs is not None and getattr(mine, self.metric) and getattr(theirs, self.metric):
            ratio = getattr(mine, self.metric) / getattr(theirs, self.metric)
        passed = None if ratio is None else (
            ratio >= self.at_least if self.at_least is not None else abs(ratio - 1) <= self.within)
        return {"target": self.label, "other": self.other, "metric": self.metric, "at_least": self.at_least,
                "within": self.within, "ratio": ratio, "pass": passed}


METRIC_LABELS = {"e2e_tokens_per_s": "e2e tok/s", "engine_tokens_per_s": "engine tok/s",
                 "mean_running_batch": "mean running batch"}
TARGETS: dict[str, list[Target]] = {
    "long-tail": [Target("raw", "e2e_tokens_per_s", at_least=0.95),
                  Target("ray-data-llm", "e2e_tokens_per_s", at_least=1.4),
                  Target("raw", "mean_running_batch", within=0.10)],
    "fixed": [Target("raw", "e2e_tokens_per_s", at_least=0.95),
              Target("raw", "engine_tokens_per_s", at_least=0.98)],
    "long-doc": [],
}


def check_targets(workload: Workload, results: list[ModeResult]) -> list[dict[str, Any]]:
    """The workload's targets, each with its ratio and verdict."""
    by_mode = {r.mode: r for r in results if r.ok}
    return [target.check(by_mode) for target in TARGETS[workload.name]]


def print_targets(workload: Workload, checked: list[dict[str, Any]]) -> None:
    """One line per target: what it asks, the ratio found, PASS or MISS."""
    if not checked:
        print(f"\ntargets: none for the {workload.name} workload")
        return
    print(f"\ntargets ({workload.name}):")
    width = max(len(c["target"]) for c in checked)
    for c in checked:
        verdict = {True: "PASS", False: "MISS", None: "n/a (a mode did not run or has no figure)"}[c["pass"]]
        ratio = "-" if c["ratio"] is None else f"x{c['ratio']:.3f}"
        print(f"  {c['target']:<{width}}  {ratio:>7}  {verdict}")


def _tokens_label(inputs: Inputs) -> str:
    """What a dataset's max_tokens are, in a few words."""
    lengths = sorted(inputs.max_tokens)
    if lengths[0] == lengths[-1]:
        return f"max_tokens {lengths[0]}"
    p50, p90, p99 = (lengths[min(len(lengths) - 1, int(share * len(lengths)))] for share in (0.5, 0.9, 0.99))
    return (f"max_tokens {inputs.workload.summary}: mean {sum(lengths) / len(lengths):.1f}, p50 {p50}, p90 {p90}, "
            f"p99 {p99}, max {lengths[-1]}, {sum(lengths):,} in all")


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f} GiB"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def print_table(results: list[ModeResult], found_ratios: dict[str, dict[str, float | None]]) -> None:
    """The side-by-side table, then the ratios and the notes."""
    columns = [
        ("mode", lambda r: r.mode + (" *" if r.extrapolated else "")),
        ("rows", lambda r: f"{r.rows_measured}" if r.rows_measured is not None else "-"),
        ("wall s", lambda r: _num(r.wall_s)),
        ("out tokens", lambda r: f"{r.output_tokens}" if r.output_tokens is not None else "-"),
        ("e2e tok/s", lambda r: _num(r.e2e_tokens_per_s, 0)),
        ("prompt tok/s", lambda r: _num(r.prompt_tokens / r.wall_measured_s if r.prompt_tokens else None, 0)),
        ("engine tok/s", lambda r: _num(r.engine_tokens_per_s, 0)),
        ("busy", lambda r: f"{r.busy_fraction:.0%}" if r.busy_fraction is not None else "-"),
        ("mean batch", lambda r: _num(r.mean_running_batch)),
        ("engine start s", lambda r: _num(r.engine_start_s)),
        ("engine ready at s", lambda r: _num(r.engine_ready_offset_s, 0)),
        ("first out s", lambda r: _num(r.first_output_s if r.first_output_s is not None else r.first_output_file_s)),
        ("driver peak", lambda r: _gib(r.driver_peak_rss_bytes)),
        ("tree peak", lambda r: _gib(r.tree_peak_rss_bytes)),
        ("children maxrss", lambda r: _gib(r.children_maxrss_bytes)),
    ]
    cells = [[name for name, _ in columns]]
    for result in results:
        cells.append([get(result) if result.ok or name == "mode" else ("FAILED" if name == "rows" else "-")
                      for name, get in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    print()
    for index, row in enumerate(cells):
        print("  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                        for i, (cell, width) in enumerate(zip(row, widths))))
        if index == 0:
            print("  ".join("-" * width for width in widths))
    if found_ratios:
        print(f"\n{REFERENCE_MODE} vs each mode (wall: <1 is faster; tok/s: >1 is faster; memory: <1 is smaller)")
        for mode, values in found_ratios.items():
            print(f"  vs {mode:<17} wall x{_num(values['wall'], 2)}   e2e tok/s x{_num(values['e2e_tokens_per_s'], 2)}"
                  f"   engine tok/s x{_num(values['engine_tokens_per_s'], 2)}"
                  f"   tree peak RSS x{_num(values['tree_peak_rss'], 2)}")


def print_breakdown(results: list[ModeResult]) -> None:
    """What made up each mode's tree peak (RSS per kind of process at the largest sample) and where its CPU went."""
    print("\ntree peak by process (RSS at the peak sample; processes under 32 MiB summed as `other`):")
    for result in results:
        grouped: dict[str, list[int]] = {}
        for label, rss in result.tree_peak_breakdown:
            grouped.setdefault(label if rss >= 32 << 20 else "other", []).append(rss)
        parts = [f"{label}{f' x{len(sizes)}' if len(sizes) > 1 else ''} {sum(sizes) / GIB:.2f}"
                 for label, sizes in sorted(grouped.items(), key=lambda item: -sum(item[1]))]
        print(f"  {result.mode}: " + ", ".join(parts))
    print("\nCPU seconds by process over the whole mode (as last sampled; under 0.5 s summed as `other`):")
    for result in results:
        grouped: dict[str, float] = {}
        for label, seconds in result.cpu_seconds_by_process:
            key = label if seconds >= 0.5 else "other"
            grouped[key] = grouped.get(key, 0.0) + seconds
        total = sum(grouped.values())
        parts = [f"{label} {seconds:.1f}" for label, seconds in sorted(grouped.items(), key=lambda item: -item[1])]
        print(f"  {result.mode} ({total:.0f} CPU-s): " + ", ".join(parts))


def print_noise(results: list[ModeResult]) -> None:
    """How much CPU other programs took while each mode ran: above a few percent the figures are noisy."""
    shares = [f"{r.mode} {r.other_cpu_share:.0%}" for r in results if r.other_cpu_share is not None]
    busy = any(r.other_cpu_share > NOISY_SHARE for r in results if r.other_cpu_share is not None)
    print(f"  CPU other programs used while each mode ran (share of {os.cpu_count()} cores): {', '.join(shares)}"
          + ("  <- the machine was busy: figures are noisy" if busy else ""))


def print_notes(results: list[ModeResult], args: argparse.Namespace, skipped: list[str]) -> None:
    print("\nnotes:")
    for line in skipped:
        print(f"  * {line}")
    for result in results:
        if result.extrapolated:
            print(f"  * {result.mode}: ran {result.rows_measured} of {result.rows} rows (--transformers-rows / "
                  f"--transformers-seconds); wall s and e2e tok/s are extrapolated to {result.rows} rows by "
                  f"scaling its generate loop x{result.rows / result.rows_measured:.1f} (measured wall "
                  f"{result.wall_measured_s:.1f} s); engine tok/s, prompt tok/s and memory are as measured")
    print("  first out s: qwen-batch = first commit record's committed_at (whole seconds, truncated); raw = all rows "
          "at once; transformers = first batch of 8; ray-data-llm = first Parquet file's mtime")
    print("  engine start: raw = the LLM(...) call (vLLM already imported); transformers = from_pretrained; Ray modes "
          "= Ray Data starting the dataset to vLLM's `init engine` log line (actor start + vLLM import + engine "
          "build, whole seconds); engine ready at = that line after the mode's start (raw: LLM(...) returning)")
    print("  engine tok/s: output tokens per engine busy second. Busy: raw = sum of `step()` times; qwen-batch = "
          "manifest engine_seconds (sum of its engines' step times); ray-data-llm = union of vLLM's per-request "
          "(scheduled_ts, last_token_ts); transformers = generate loop")
    print("  busy = busy seconds / (last output - engine ready); last output: raw = last step, qwen-batch = last "
          "data file written, ray-data-llm = last last_token_ts. Engine ready is whole seconds from the log in the "
          "Ray modes, so on short runs busy is rough. One engine per mode here (2 cores)")
    print("  mean batch = rows in the running batch averaged over busy time: raw = sum(len(step outputs) x step "
          "time) / busy; qwen-batch = manifest mean_running_batch (per-row batch_seconds / engine_seconds); "
          "ray-data-llm = sum of per-request residency (last_token_ts - scheduled_ts) / busy")
    print("  prompt tok/s = prompt tokens / measured wall (the long-doc workload's figure)")
    print("  tree peak = max over 0.2 s samples of the summed RSS of the mode's process and all descendants (shared "
          "pages count once per process); children maxrss = getrusage(RUSAGE_CHILDREN) in the mode's process: the "
          "largest descendant it reaped (misses Ray workers, which the raylet reaps)")
    print_noise(results)
    for result in results:
        config = result.extra.get("config")
        if not (result.ok and config):
            continue
        how = (f"its defaults (only the CPU-needed settings are passed: 1-CPU placement group, {LIGHT_STAGE_CPUS} CPU "
               "light stages, log_engine_metrics off)" if not config["tuned"] else
               f"{', '.join(config['tuned'])} set, the fastest of 8 configurations in a quick try on long-tail at "
               "512 rows (see RAY_DATA_LLM_BEST_BATCH in tests/bench.py)")
        print(f"  {result.mode}: {how}: batch_size {config['batch_size']}, max_concurrent_batches "
              f"{config['max_concurrent_batches']} (the engine actor's max_concurrency), max_tasks_in_flight_per_actor "
              f"{config['max_tasks_in_flight_per_actor'] or '2 x max_concurrent_batches'}, max_pending_requests "
              f"{config['max_pending_requests'] or 'ceil(1.1 x max_num_seqs) = 282 with vLLM CPU max_num_seqs 256'}, "
              f"concurrency {config['concurrency']}; stages={config['stages']}")
    for result in results:
        if result.ok and result.output_tokens != result.output_tokens_expected:
            print(f"  ! {result.mode}: {result.output_tokens} output tokens, expected "
                  f"{result.output_tokens_expected} (the sum of its {result.rows_measured} rows' max_tokens)")


def cache_env(folder: Path) -> dict[str, str]:
    """Every cache under `folder`: each mode gets empty ones, so none starts warm from an earlier mode (vLLM caches
    what it learns about the model architecture under VLLM_CACHE_ROOT: about 10 s of the first engine start)."""
    env = {}
    for name, sub in (("VLLM_CACHE_ROOT", "vllm"), ("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("XDG_CACHE_HOME", "xdg"),
                      ("HF_HOME", "hf"), ("TMPDIR", "tmp")):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        env[name] = str(folder / sub)
    return env


def prepare(root: Path, workload: Workload, rows: int, max_tokens: int | None, shapes: set[str],
            models: tuple[str, ...] = (VARIANT,)) -> Inputs:
    """Caches in the temp folder, the tiny models where qwen-batch's catalog finds them, and the input files."""
    os.environ.update(cache_env(root / "cache"))
    (root / "ray").mkdir(exist_ok=True)
    os.environ["RAY_TMPDIR"] = str(root / "ray")
    os.environ["QWEN_BATCH_MODEL_DIR"] = str(root / "models")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    for model in models:
        checkpoint = root / "models" / "qwen-batch" / model
        if not (checkpoint / "config.json").exists():
            print(f"building the tiny model at {checkpoint}", flush=True)
            build = ("import sys; from qwen_batch.jobs.tiny_model import make_tiny_model; "
                     "make_tiny_model(sys.argv[1], sys.argv[2])")
            subprocess.run([sys.executable, "-c", build, model.removeprefix("tiny-"), str(checkpoint)], cwd=REPO,
                           check=True)
    written = time.monotonic()
    inputs = write_inputs(root / "input", workload, rows, max_tokens, shapes)
    print(f"wrote {rows:,} {workload.name} rows ({', '.join(sorted(shapes))}) in {time.monotonic() - written:.1f} s",
          flush=True)
    return inputs


def prompt_token_counts(model: Path, workload: Workload, sample: int) -> list[int]:
    """Chat-prompt token counts of the dataset's first `sample` rows, by the model's tokenizer in a subprocess (the
    parent stays free of transformers)."""
    rows_file = model.parent / f"sample-{workload.name}.jsonl"
    rows_file.write_text("".join(json.dumps(row) + "\n" for row in make_rows(sample, workload, workload.max_tokens)))
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--count-prompt-tokens", str(rows_file),
                          str(model)], cwd=REPO, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def count_prompt_tokens_main(rows_file: str, model: str) -> int:
    """Print the chat-prompt token count of each row of `rows_file` as one JSON list."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    texts = [tokenizer.apply_chat_template(chat(row["text"]), tokenize=False, add_generation_prompt=True)
             for row in read_jsonl(Path(rows_file))]
    print(json.dumps([len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]))
    return 0


def chosen_modes(args: argparse.Namespace, workload: Workload) -> tuple[list[str], list[str]]:
    """(modes to run, notes on modes skipped for this workload)."""
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"--modes: unknown mode(s) {unknown}; expected some of {list(MODES)}")
    skipped = []
    if "transformers" in modes and workload.name != "fixed":
        modes.remove("transformers")
        skipped.append(f"transformers skipped: it runs only in the fixed workload (too slow for {workload.name})")
        print(skipped[-1], flush=True)
    return modes, skipped


def run_comparison(args: argparse.Namespace, root: Path, cores: int) -> dict[str, Any]:
    workload = WORKLOADS[args.workload]
    modes, skipped = chosen_modes(args, workload)
    if args.max_tokens is not None and workload.max_tokens is None:
        raise SystemExit(f"--max-tokens: the {workload.name} workload draws each row's ({workload.summary}); "
                         "drop the flag or use --workload fixed")
    rows = args.rows or workload.rows
    max_tokens = args.max_tokens or workload.max_tokens
    shapes = {"openai" if mode == REFERENCE_MODE else "rows" for mode in modes}
    inputs = prepare(root, workload, rows, max_tokens, shapes)
    prompt_tokens = None
    if workload.name == "long-doc":
        prompt_tokens = prompt_token_counts(root / "models" / "qwen-batch" / VARIANT, workload, LONG_DOC_SAMPLE)
        print(f"long-doc prompts (chat template included) on the first {len(prompt_tokens)} rows: "
              f"{min(prompt_tokens)}-{max(prompt_tokens)} tokens; with max_tokens {max_tokens} that is at most "
              f"{max(prompt_tokens) + max_tokens} of max_model_len {workload.max_model_len}", flush=True)
    started = time.monotonic()
    results = [run_mode(mode, root, inputs, cores, args) for mode in modes]
    found_ratios = ratios(results)
    checked = check_targets(workload, results)
    agreement = texts_agreement(root, modes)
    print(f"\n{workload.name}: {rows} rows, {_tokens_label(inputs)}; greedy, {VARIANT} float32, {cores} cores, "
          f"{args.rows_per_shard} rows per qwen-batch shard; total {time.monotonic() - started:.0f} s")
    print_table(results, found_ratios)
    print_targets(workload, checked)
    tokens = {r.mode: f"{r.output_tokens}/{r.output_tokens_expected}" for r in results if r.ok}
    print(f"\noutput tokens (got/expected): {tokens}")
    if agreement:
        print("generated text equal to raw's (greedy; sampled rows): "
              + ", ".join(f"{mode} {share:.0%}" for mode, share in agreement.items()))
    print_breakdown(results)
    print_notes(results, args, skipped)
    return {"kind": "comparison", "workload": workload.name, "workload_summary": workload.summary, "rows": rows,
            "max_tokens": max_tokens, "max_tokens_label": _tokens_label(inputs),
            "max_tokens_total": sum(inputs.max_tokens), "max_model_len": workload.max_model_len,
            "rows_per_shard": args.rows_per_shard, "long_doc_prompt_tokens_sample": prompt_tokens, "cores": cores,
            "variant": VARIANT,
            "results": [asdict(r) for r in results], "ratios": found_ratios, "targets": checked,
            "skipped": skipped, "text_agreement_with_raw": agreement}


def run_scaling(args: argparse.Namespace, root: Path, cores: int) -> dict[str, Any]:
    """qwen-batch alone at growing sizes with max_tokens 1: what each row costs outside the engine."""
    sizes = [int(size) for size in args.scaling_sizes.split(",")]
    results = []
    for size in sizes:
        inputs = prepare(root, WORKLOADS["fixed"], size, 1, {"openai"})
        results.append(run_mode(REFERENCE_MODE, root, inputs, cores, args, tag=f"qwen-batch-{size}"))
        inputs.openai_file.unlink()  # a million rows is about 550 MB
    print(f"\nqwen-batch scaling, max_tokens 1, {cores} cores, {args.rows_per_shard} rows per shard; after ready = "
          "wall after the engine was ready, engine = manifest engine_seconds, outside = after ready minus engine "
          "(per-row cost the engine waits on)")
    header = ["rows", "wall s", "s/1k rows", "ready at s", "after ready", "engine s/1k", "outside s/1k", "shards",
              "exactly once", "busy", "driver peak", "driver maxrss", "tree peak"]
    print("  ".join(f"{h:>13}" for h in header))
    table = []
    for size, result in zip(sizes, results):
        if not result.ok:
            print(f"{size:>13}  FAILED (log: {result.log_file})")
            continue
        ready = result.engine_ready_offset_s
        after_ready = (result.wall_s - ready) / size * 1000 if ready is not None else None
        engine = result.engine_seconds / size * 1000 if result.engine_seconds is not None else None
        row = {"rows": size, "wall_s": result.wall_s, "wall_s_per_1k_rows": result.wall_s / size * 1000,
               "engine_ready_at_s": ready, "after_ready_s_per_1k_rows": after_ready,
               "engine_s_per_1k_rows": engine,
               "outside_engine_s_per_1k_rows": after_ready - engine if None not in (after_ready, engine) else None,
               "engine_seconds": result.engine_seconds, "busy_fraction": result.busy_fraction,
               "mean_running_batch": result.mean_running_batch, "shards": result.extra.get("shards"),
               "exactly_once": result.extra.get("exactly_once"),
               "driver_peak_rss_bytes": result.driver_peak_rss_bytes, "driver_maxrss_bytes": result.driver_maxrss_bytes,
               "tree_peak_rss_bytes": result.tree_peak_rss_bytes}
        table.append(row)
        print("  ".join(f"{v:>13}" for v in [
            size, _num(row["wall_s"]), _num(row["wall_s_per_1k_rows"], 2), _num(ready), _num(after_ready, 2),
            _num(engine, 2), _num(row["outside_engine_s_per_1k_rows"], 2), str(row["shards"]), str(row["exactly_once"]),
            f"{result.busy_fraction:.0%}" if result.busy_fraction is not None else "-",
            _gib(row["driver_peak_rss_bytes"]), _gib(row["driver_maxrss_bytes"]), _gib(row["tree_peak_rss_bytes"])]))
    by_size = {row["rows"]: row for row in table}
    rss_ratios = {}
    if 10_000 in by_size:
        small = by_size[10_000]
        for size in (size for size in sorted(by_size) if size > 10_000):
            large = by_size[size]
            rss_ratios[size] = large["driver_peak_rss_bytes"] / small["driver_peak_rss_bytes"]
            exact = large["driver_maxrss_bytes"] / small["driver_maxrss_bytes"]
            print(f"\ndriver peak RSS({size:,}) / RSS(10,000) = {rss_ratios[size]:.2f} sampled, {exact:.2f} by "
                  f"getrusage maxrss (1.0 = flat; {size // 10_000} = grows with rows)")
    print_breakdown(results)
    print_noise(results)
    return {"kind": "scaling", "cores": cores, "variant": VARIANT, "rows_per_shard": args.rows_per_shard,
            "sizes": table, "driver_rss_ratio_100k_10k": rss_ratios.get(100_000),
            "driver_rss_ratios_to_10k": rss_ratios, "results": [asdict(r) for r in results]}


def route_inputs(root: Path, inputs: Inputs, models: tuple[str, ...]) -> dict[str, Inputs]:
    """The dataset's requests dealt out to `models` in turn (body.model), as one file for the routed job (key
    "both") and one per model of only its own requests."""
    routed: dict[str, list[str]] = {"both": [], **{model: [] for model in models}}
    lengths: dict[str, list[int]] = {name: [] for name in routed}
    for index, line in enumerate(inputs.openai_file.read_text().splitlines()):
        request = json.loads(line)
        model = models[index % len(models)]
        request["body"]["model"] = model
        for name in ("both", model):
            routed[name].append(json.dumps(request))
            lengths[name].append(request["body"]["max_tokens"])
    found = {}
    for name, lines in routed.items():
        path = root / "input" / f"routed-{name}.openai.jsonl"
        path.write_text("\n".join(lines) + "\n")
        found[name] = Inputs(inputs.workload, None, path, lengths[name])
    return found


def _working_by_model(result: ModeResult) -> dict[str, tuple[float, float]]:
    """Each model's engine from its first to its last working sample, as offsets from the mode's start."""
    return {engine["model"]: (engine["working_s"][0][0], engine["working_s"][-1][1])
            for engine in result.extra.get("engines", {}).values() if engine["working_s"]}


def run_side_by_side(args: argparse.Namespace, root: Path, cores: int) -> dict[str, Any]:
    """Two models of one job at the same time, against each alone: wall time, and how long both engines worked at
    once."""
    workload = WORKLOADS["long-tail"]
    rows = args.rows or SIDE_BY_SIDE_ROWS
    inputs = route_inputs(root, prepare(root, workload, rows, None, {"openai"}, SIDE_BY_SIDE_MODELS),
                          SIDE_BY_SIDE_MODELS)
    cluster = {"cluster_workers": len(SIDE_BY_SIDE_MODELS), "engine_env": SIDE_BY_SIDE_ENGINE_ENV}
    runs = [(f"alone-{model}", inputs[model], (model,)) for model in SIDE_BY_SIDE_MODELS]
    runs.append(("side-by-side", inputs["both"], SIDE_BY_SIDE_MODELS))
    results = [run_mode(REFERENCE_MODE, root, run_inputs, cores, args, tag=tag, job={**cluster, "models": models})
               for tag, run_inputs, models in runs]
    print(f"\nside by side: {rows} rows, {_tokens_label(inputs['both'])}; {' and '.join(SIDE_BY_SIDE_MODELS)} routed "
          f"by body.model, half the rows each; a Ray cluster of {len(SIDE_BY_SIDE_MODELS)} worker nodes on this "
          f"machine ({cores} cores), one engine replica per model, each engine one core (OMP_NUM_THREADS=1, "
          f"unbound); {args.rows_per_shard} rows per shard")
    header = ["run", "rows", "wall s", *(f"{m} working s" for m in SIDE_BY_SIDE_MODELS), "engine busy s",
              "exactly once"]
    print("  ".join(f"{h:>22}" for h in header))
    for result in results:
        if not result.ok:
            print(f"{result.mode:>22}  FAILED (log: {result.log_file})")
            continue
        working = _working_by_model(result)
        busy = result.extra.get("engine_seconds_by_model", {})
        print("  ".join(f"{v:>22}" for v in [
            result.mode, str(result.rows_measured), _num(result.wall_s),
            *(f"{working[m][0]:.1f} - {working[m][1]:.1f}" if m in working else "-" for m in SIDE_BY_SIDE_MODELS),
            " / ".join(_num(busy.get(m)) for m in SIDE_BY_SIDE_MODELS), str(result.extra.get("exactly_once"))]))
    figures: dict[str, Any] = {}
    if all(result.ok for result in results):
        *alone, both = results
        engines = {engine["model"]: engine["working_s"] for engine in both.extra.get("engines", {}).values()}
        together = (_both_working_s(*(engines[m] for m in SIDE_BY_SIDE_MODELS))
                    if set(SIDE_BY_SIDE_MODELS) <= set(engines) else None)
        figures = {"wall_over_sum_alone": both.wall_s / sum(r.wall_s for r in alone),
                   "wall_over_slowest_alone": both.wall_s / max(r.wall_s for r in alone),
                   "both_engines_working_s": together,
                   "engine_working_s": {m: sum(b - a for a, b in spans) for m, spans in engines.items()}}
        print(f"\nwall(side by side) / (sum of the models alone) = {figures['wall_over_sum_alone']:.2f}  "
              f"(below 1: they ran at the same time); / (the slower alone) = "
              f"{figures['wall_over_slowest_alone']:.2f}")
        if together is not None:
            each = " and ".join(f"{_num(figures['engine_working_s'][m])} s" for m in SIDE_BY_SIDE_MODELS)
            print(f"side by side, after each was ready, the engines worked {each}; both at once for {together:.1f} s")
    print("  working = the engine process used at least "
          f"{ENGINE_WORKING:.0%} of a core (sampled every {SAMPLE_INTERVAL_S:g} s), from vLLM's `init engine` line "
          "to its last such sample")
    print_breakdown(results)
    print_noise(results)
    return {"kind": "side-by-side", "rows": rows, "models": SIDE_BY_SIDE_MODELS, "cores": cores,
            "rows_per_shard": args.rows_per_shard, "engine_env": SIDE_BY_SIDE_ENGINE_ENV, **figures,
            "results": [asdict(r) for r in results]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tests/bench.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="long-tail",
                        help="long-tail (per-row max_tokens from a lognormal), fixed (every row --max-tokens) or "
                             "long-doc (2k-token prompts, 8 output tokens). Default: long-tail")
    parser.add_argument("--rows", type=int, help="rows in the dataset (default per workload: "
                        + ", ".join(f"{w.name} {w.rows}" for w in WORKLOADS.values()) + ")")
    parser.add_argument("--max-tokens", type=int, help="every row's max_tokens in the fixed and long-doc workloads "
                        "(default: fixed 32, long-doc 8)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated, from {', '.join(MODES)} (transformers only runs the fixed workload)")
    parser.add_argument("--rows-per-shard", type=int,
                        help=f"qwen-batch's input.rows_per_shard (default {ROWS_PER_SHARD}, qwen-batch's own; "
                             f"{SIDE_BY_SIDE_ROWS_PER_SHARD} with --side-by-side)")
    parser.add_argument("--transformers-rows", type=int, default=TRANSFORMERS_MAX_ROWS,
                        help="most rows the transformers mode runs; its wall time is scaled to --rows and labelled "
                             f"(default {TRANSFORMERS_MAX_ROWS})")
    parser.add_argument("--transformers-seconds", type=float, default=TRANSFORMERS_BUDGET_S,
                        help="the transformers mode stops generating after this many seconds and is extrapolated "
                             f"(default {TRANSFORMERS_BUDGET_S:g})")
    parser.add_argument("--ray-data-llm-stages", choices=["template", "all"], default="template",
                        help="Ray Data LLM's CPU stages: `template` (its chat template stage only; vLLM tokenizes "
                             "and detokenizes inside the engine) or `all` (template, tokenize and detokenize stages, "
                             "so the engine gets token ids). Light stages ask for 0.25 CPU. Default: template")
    parser.add_argument("--ray-data-llm-batch", type=int, default=RAY_DATA_LLM_BEST_BATCH,
                        help=f"batch_size of ray-data-llm-best (default {RAY_DATA_LLM_BEST_BATCH}; ray-data-llm "
                             "keeps the library's)")
    parser.add_argument("--ray-data-llm-concurrent-batches", type=int, default=RAY_DATA_LLM_BEST_CONCURRENT_BATCHES,
                        help="max_concurrent_batches of ray-data-llm-best (default "
                             f"{RAY_DATA_LLM_BEST_CONCURRENT_BATCHES}; ray-data-llm keeps the library's)")
    parser.add_argument("--scaling", action="store_true", help="qwen-batch alone, max_tokens 1, at --scaling-sizes")
    parser.add_argument("--scaling-sizes", default="1000,10000,100000,1000000",
                        help="rows per scaling run (default 1000,10000,100000,1000000)")
    parser.add_argument("--side-by-side", action="store_true",
                        help=f"qwen-batch only, long-tail: {' and '.join(SIDE_BY_SIDE_MODELS)} each alone on half the "
                             "rows, then both in one routed job, on a cluster of two worker nodes on this machine "
                             f"(default {SIDE_BY_SIDE_ROWS} rows, {SIDE_BY_SIDE_ROWS_PER_SHARD} rows per shard)")
    parser.add_argument("--mode-timeout", type=float,
                        help=f"seconds before a mode is killed (default {MODE_TIMEOUT_S:g} + "
                             f"{MODE_TIMEOUT_PER_ROW_S:g} per row)")
    parser.add_argument("--out", default="bench.json", help="JSON results file (default bench.json)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (models, inputs, outputs, logs)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--count-prompt-tokens", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.rows_per_shard = args.rows_per_shard or (SIDE_BY_SIDE_ROWS_PER_SHARD if args.side_by_side else ROWS_PER_SHARD)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if args.count_prompt_tokens:
        return count_prompt_tokens_main(*args.count_prompt_tokens)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind through the cleanup below
    cores = os.cpu_count() or 1
    root = Path(tempfile.mkdtemp(prefix="qb-bench-"))
    try:
        run = run_scaling if args.scaling else run_side_by_side if args.side_by_side else run_comparison
        report = run(args, root, cores)
        report["versions"] = _versions()
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
        print(f"\nwrote {args.out}" + (f"; temp folder kept at {root}" if args.keep else ""))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def _versions() -> dict[str, str]:
    from qwen_batch.jobs.driver import versions

    return versions()


if __name__ == "__main__":
    sys.exit(main())
