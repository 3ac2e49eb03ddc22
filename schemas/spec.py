"""The job spec: what to read, how to prompt, which Qwen variant, where to write, what it costs."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import string
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import pyarrow as pa
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from qwen_batch.schemas.catalog import CATALOG, _closest_hint
from qwen_batch.schemas.errors import SpecError
from qwen_batch.schemas.results import RESULT_COLUMNS

# Columns the pipeline itself puts next to the carried ones: every name starting with `_`, the output columns, and
# the engine's token id lists. A carried column of the same name would overwrite one of them.
PIPELINE_COLUMNS = RESULT_COLUMNS | {"prompt_token_ids", "completion_token_ids"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputSpec(_Strict):
    """Where the rows come from."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, serialize_by_alias=True)

    path: str = Field(description="A file, a folder (read recursively) or a glob; s3://, gs://, file:// or a local path.")
    format: Literal["parquet", "jsonl", "csv", "openai-batch"] = Field(
        description="File format of every input file; `openai-batch` reads OpenAI Batch API request files (JSONL with "
        "custom_id and a chat-completions body): ids from custom_id, chats from body.messages, body.model in column "
        "`model` for routing, and per-row max_tokens, temperature, top_p, seed, stop and response_format."
    )
    id_column: str | None = Field(
        None,
        description="Column holding each row's unique id. Without it a row's id is `<file>:<row>`: the file's path "
        "under the input folder and the row's 0-based position in the file.",
    )
    carry_columns: list[str] = Field(
        default_factory=list, description="Input columns copied unchanged into every output row; not a name starting "
        "with `_` nor one of the output columns (`id`, `source_file`, ...), which the pipeline uses itself. For "
        "`openai-batch` input, a request line's own keys (e.g. `url`, or one you add beside `body`)."
    )
    schema_: dict[str, str] = Field(
        default_factory=dict, alias="schema", description="Arrow types of carried columns, by name (`int64`, "
        "`float64`, `bool`, `string`, `date32`, `timestamp[us]`, `timestamp[ns, tz=UTC]`, ...): each value is "
        "converted to its type (text parsed, as CSV needs) and one that does not fit makes its row an "
        "`invalid_field` error row. A carried column not named here takes its type from the input: the Parquet "
        "footers, `string` for CSV, for JSONL the values in each file's first lines (a column of mixed types or "
        "holding objects, or only nulls there, is `string`; other values in a string column keep their JSON text)."
    )
    unique_ids: bool | None = Field(
        None, description="Check that no two rows share an id across the whole input, while the engines start (the "
        "read waits for it): one pass of Ray tasks over the ids, split by a hash of the id and grouped per partition, "
        "so memory stays bounded. A row repeating an "
        "earlier row's id becomes a `duplicate_id` error row; the first is answered. Default: on for `openai-batch` "
        "(a custom_id must be unique), off otherwise, where only repeats within a shard are found. Needs an id "
        "column."
    )
    rows_per_shard: int = Field(
        512,
        ge=1,
        description="Rows per shard, the unit of output, commit and resume. Smaller shards give earlier output and "
        "finer resume; larger ones fewer files.",
    )
    on_bad_file: Literal["fail", "skip"] = Field(
        "fail",
        description="What an unreadable or corrupt input file does: `fail` stops the job naming the file; `skip` "
        "records it in the manifest and goes on.",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Options passed to fsspec for the input (e.g. `endpoint_url`). Prefer credentials from the "
        "environment; any secret given here is redacted from the manifest.",
    )

    @field_validator("carry_columns")
    @classmethod
    def _carry_columns(cls, columns: list[str]) -> list[str]:
        problems = []
        internal = [c for c in dict.fromkeys(columns) if c.startswith("_") or c in PIPELINE_COLUMNS]
        if internal:
            problems.append(f"{internal} are the pipeline's own column names (names starting with `_`, the output "
                            "columns such as `id` and `source_file`, and the engine's token ids); rename the input "
                            "column, or use input.id_column for the row id")
        repeated = sorted({c for c in columns if columns.count(c) > 1})
        if repeated:
            problems.append(f"{repeated} appear more than once; name each column once")
        if problems:
            raise ValueError("; ".join(problems))
        return columns

    @property
    def checks_unique_ids(self) -> bool:
        """Whether the run checks ids across shards (unique_ids, with its default)."""
        return self.format == "openai-batch" if self.unique_ids is None else self.unique_ids

    @field_validator("schema_")
    @classmethod
    def _schema_types(cls, schema: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        carried = info.data.get("carry_columns", [])
        problems = []
        for column, alias in schema.items():
            if column not in carried:
                problems.append(f"column {column!r} is not in input.carry_columns {carried}; the schema types the "
                                "carried columns, so carry the column or drop it here")
            try:
                arrow_type(alias)
            except ValueError:
                problems.append(f"column {column!r}: {alias!r} is not an Arrow type name; use one such as int64, "
                                "float64, bool, string, date32 or timestamp[us]")
        if problems:
            raise ValueError("; ".join(problems))
        return schema

    @field_validator("unique_ids")
    @classmethod
    def _ids_to_check(cls, unique_ids: bool | None, info: ValidationInfo) -> bool | None:
        if unique_ids and info.data.get("id_column") is None and info.data.get("format") != "openai-batch":
            raise ValueError("it needs input.id_column; rows without one are named by their position, which is "
                             "unique anyway: set id_column or drop unique_ids")
        return unique_ids


class PromptSpec(_Strict):
    """How a row becomes chat messages."""

    system: str | None = Field(None, description="System message put before every prompt.")
    template: str | None = Field(
        None,
        description="User message with `{column}` placeholders filled from the row; `{{` and `}}` are literal "
        "braces. Plain substitution: no attribute access, indexing or format specs.",
    )
    messages_column: str | None = Field(
        None,
        description="Column holding a whole chat as a list of `{role, content}` messages, instead of `template`.",
    )
    adapter_column: str | None = Field(
        None, description="Column naming the LoRA adapter (a key of model.adapters) that answers each row; a null or "
        "empty value, or the model's own name, means the base model. For openai-batch input it defaults to `model` "
        "(the request's body.model) when the model has adapters."
    )

    images: list[str] = Field(
        default_factory=list, description="Columns holding each row's images, for a model with a vision tower "
        "(Qwen2.5-VL): put before the template's text in the user message, in this order. A value is the image's "
        "bytes (a Parquet binary column) or a string: a local path (a relative one is taken from the input file's "
        "folder), a file://, s3:// or gs:// URL (read with input.storage_options; gs:// needs gcsfs), an http(s):// "
        "URL or a `data:image/...;base64,` URL. Limits in `images`."
    )

    @model_validator(mode="after")
    def _one_source(self) -> PromptSpec:
        if (self.template is None) == (self.messages_column is None):
            raise ValueError("give exactly one of `template` (a string with {column} placeholders) or `messages_column`")
        return self

    @model_validator(mode="after")
    def _images_with_template(self) -> PromptSpec:
        if self.images and self.template is None:
            raise ValueError("prompt.images places images before the template's text; with messages_column, give "
                             "images as content parts ({type: image_url, image_url: {url: ...}}) in the messages")
        return self

    @field_validator("template")
    @classmethod
    def _plain_template(cls, value: str | None) -> str | None:
        if value is not None:
            template_columns(value)
        return value

    @property
    def columns(self) -> list[str]:
        """Input columns the prompt reads."""
        adapter = [self.adapter_column] if self.adapter_column is not None else []
        if self.messages_column is not None:
            return [self.messages_column, *adapter]
        return [*dict.fromkeys([*template_columns(self.template or ""), *self.images]), *adapter]


def template_columns(template: str) -> list[str]:
    """Column names a template's `{column}` placeholders name, in order of first use."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"template is not a valid {{column}} template ({exc}); write literal braces as {{{{ and }}}}")
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        placeholder = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        if not field or field.isdigit() or any(char in field for char in ".[]"):
            raise ValueError(
                f"template placeholder {placeholder} is not a plain column name; only {{column}} is allowed "
                "(no attribute access, indexing or positional fields)"
            )
        if spec or conversion:
            raise ValueError(f"template placeholder {placeholder} has a format spec or conversion; use plain {{column}}")
        if field not in names:
            names.append(field)
    return names


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class AdapterSpec(_Strict):
    """A LoRA fine-tune of the model, as peft saves it."""

    path: str = Field(
        pattern=r"\S", description="Folder holding adapter_config.json and adapter_model.safetensors; s3://, gs://, "
        "file:// or a local path (copied once to each node that serves it)."
    )
    input_per_mtok: float | None = Field(
        None, ge=0, description="USD per 1M input tokens of rows this adapter answers; defaults to the model's."
    )
    output_per_mtok: float | None = Field(
        None, ge=0, description="USD per 1M output tokens of rows this adapter answers; defaults to the model's."
    )

    @model_validator(mode="before")
    @classmethod
    def _path_alone(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value


class ModelSpec(_Strict):
    """Which Qwen model answers."""

    variant: str | None = Field(None, description="A catalog name (see `qwen-batch models`), e.g. `qwen2.5-7b-instruct`.")
    path: str | None = Field(
        None,
        description="A checkpoint to load instead of a catalog variant: a local folder, a Hugging Face id, or a "
        "folder on s3:// or gs:// (copied once to each node); needs `like` for its prices and defaults.",
    )
    like: str | None = Field(
        None, description="With `path`: the catalog variant whose prices, context length and defaults apply."
    )
    max_model_len: int | None = Field(
        None, ge=16, description="Longest prompt + output in tokens; defaults to the variant's context length."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Dtype the engine computes in; `auto` takes the variant's."
    )
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="This model's name in the output `variant` column, in routing and in output paths; defaults to "
        "the catalog name. Set it to run one variant twice (e.g. thinking on and off).",
    )
    aliases: list[str] = Field(
        default_factory=list, description="Other values of `route_column` that pick this model, e.g. the OpenAI model "
        "names of a batch file (`gpt-4o-mini`)."
    )
    thinking: Literal["on", "off"] = Field(
        "off", description="Qwen3 thinking: `on` lets the model reason in a `<think>` block before answering "
        "(split into `reasoning_text`); passed to the chat template as `enable_thinking`."
    )
    thinking_budget: int | None = Field(
        None, ge=1, description="Most reasoning tokens per row with thinking on; the engine then closes the "
        "`<think>` block and the answer gets the rest of `max_tokens`."
    )
    adapters: dict[Annotated[str, Field(pattern=NAME_PATTERN)], AdapterSpec] = Field(
        default_factory=dict, description="LoRA adapters of this model by name, e.g. `{support-v3: "
        "s3://models/lora/support-v3/}` (or `{name: {path, input_per_mtok, output_per_mtok}}`): one engine serves "
        "them all side by side, and prompt.adapter_column picks each row's; the output's `adapter` column names it."
    )

    @field_validator("variant", "like")
    @classmethod
    def _in_catalog(cls, name: str | None, info: ValidationInfo) -> str | None:
        if name is not None and name not in CATALOG:
            checkpoint = ("; to run a local checkpoint, give `path:` (with `like:` a catalog name) instead"
                          if info.field_name == "variant" else "")
            raise ValueError(f"it is not in the catalog.{_closest_hint(name)} `qwen-batch models` lists them "
                             f"all{checkpoint}")
        return name

    @model_validator(mode="after")
    def _one_model(self) -> ModelSpec:
        if (self.variant is None) == (self.path is None):
            raise ValueError("give exactly one of `variant` (a catalog name) or `path` (a checkpoint) with `like`")
        if self.path is not None and self.like is None:
            raise ValueError("`path` needs `like: <catalog variant>` so prices and defaults are known")
        if self.thinking_budget is not None and self.thinking == "off":
            raise ValueError("thinking_budget needs thinking: on")
        taken = sorted(set(self.adapters) & {self.catalog_name, self.output_name, *self.aliases})
        if taken:
            raise ValueError(f"adapters {taken} have the name of the model itself (its variant, name or an alias), "
                             "which picks the base model; rename the adapter")
        return self

    @property
    def catalog_name(self) -> str:
        """The catalog entry whose facts and prices apply."""
        return self.variant or self.like  # type: ignore[return-value]

    @property
    def output_name(self) -> str:
        """Name of this model in the output."""
        return self.name or self.catalog_name


class ResponseFormatSpec(_Strict):
    """Constrain every answer, for labeling: exactly one of labels, json_schema or regex."""

    labels: list[str] | None = Field(None, min_length=1, description="The answer is exactly one of these labels.")
    json_schema: dict[str, Any] | None = Field(None, description="The answer is JSON valid against this JSON Schema.")
    regex: str | None = Field(None, description="The answer matches this regular expression in full.")

    @model_validator(mode="after")
    def _one_format(self) -> ResponseFormatSpec:
        if sum(value is not None for value in (self.labels, self.json_schema, self.regex)) != 1:
            raise ValueError("give exactly one of `labels`, `json_schema` or `regex`")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex does not compile: {exc}") from None
        if self.json_schema is not None:
            from jsonschema import Draft202012Validator, SchemaError

            try:
                Draft202012Validator.check_schema(self.json_schema)
            except SchemaError as exc:
                raise ValueError(f"json_schema is not a valid JSON Schema: {exc.message}") from None
        return self


class SamplingSpec(_Strict):
    """How tokens are drawn; unset fields take the variant's recommended values."""

    max_tokens: int = Field(256, gt=0, description="Most tokens generated per row; a row that hits it ends with `length`.")
    # The ranges are vLLM's own (vllm/sampling_params.py, SamplingParams._verify_args): a value outside them would
    # fail every row in the engine.
    temperature: float | None = Field(
        None, ge=0, le=2, allow_inf_nan=False, description="Softmax temperature, in [0, 2]; 0 is greedy."
    )
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, description="Nucleus sampling mass, in (0, 1].")
    top_k: int | None = Field(None, description="Keep only the k most likely tokens; -1 keeps all.")
    repetition_penalty: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="Penalty on repeated tokens, a finite number > 0; 1.0 is none."
    )
    seed: int | None = Field(
        0, ge=-(2**63), lt=2**63,
        description="Base seed, a 64-bit integer; each row's seed derives from it and the row id, so reruns repeat.",
    )
    stop: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="Non-empty strings that end generation (not included in the text)."
    )

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int | None) -> int | None:
        if value is not None and value != -1 and value < 1:
            raise ValueError("top_k must be -1 (keep all) or at least 1")
        return value


class OutputSpec(_Strict):
    """Where the results go."""

    path: str = Field(
        pattern=r"\S", description="Output folder; s3://, gs://, file:// or a local path. One job per folder; not the "
        "store's root, not the input nor a folder holding it or inside it."
    )
    format: Literal["parquet", "openai-batch"] = Field(
        "parquet", description="`openai-batch` also writes `_openai/output.jsonl` in the OpenAI Batch API's output-file "
        "shape (one line per row, `error` set for failed rows), besides the Parquet."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="Options passed to fsspec for the output; secrets are redacted."
    )
    shared: bool = Field(
        False, description="The local (or file://) output path is on a filesystem every node of the Ray cluster "
        "mounts (NFS, Lustre, ...). Without it a local output path is refused on a cluster of more than one node, "
        "where each node would write its shards to its own disk."
    )


class ReplicaRange(_Strict):
    """An autoscaling pool of engine replicas: Ray adds replicas (and an autoscaling cluster its nodes) while work
    waits, and gives them back when idle."""

    min: int = Field(1, ge=1, description="Replicas the job keeps while it runs.")
    max: int = Field(ge=1, description="Most replicas the job asks for.")

    @model_validator(mode="after")
    def _ordered(self) -> ReplicaRange:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be at least min ({self.min})")
        return self


class ResourcesSpec(_Strict):
    """How much of the cluster the job uses."""

    replicas: Annotated[int, Field(ge=1)] | Literal["auto"] | ReplicaRange = Field(
        "auto", description="Engine replicas (actors), each with its own copy of the model: `auto` fills the cluster "
        "(on each node, its accelerators // accelerators per replica; on CPU clusters one per node), an integer pins "
        "the count, `{min, max}` gives an autoscaling pool."
    )

    @field_validator("replicas", mode="before")
    @classmethod
    def _replicas(cls, value: Any) -> Any:
        if value == "auto" or isinstance(value, ReplicaRange):
            return value
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        if isinstance(value, dict):
            try:
                return ReplicaRange(**value)
            except ValidationError as exc:
                problems = [(".".join(map(str, e["loc"])) + ": " if e["loc"] else "") + e["msg"].removeprefix("Value error, ")
                            for e in exc.errors()]
                raise ValueError("{min, max}: " + "; ".join(problems)) from None
        raise ValueError("expected `auto`, a whole number of replicas (1 or more) or {min, max}")
    tensor_parallel_size: int | Literal["auto"] = Field(
        "auto", description="Accelerators per pipeline stage of a replica, on one node; `auto` picks the smallest "
        "that fits the model."
    )
    pipeline_parallel_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="Pipeline stages per replica, one node each (GPUs only): `auto` is 1 unless the model "
        "does not fit one node, then the fewest stages of a whole node's tensor parallelism that fit."
    )
    accelerator: Literal["auto", "gpu", "cpu"] = Field(
        "auto", description="Where engines run: `auto` uses GPUs when the Ray cluster has them, else the CPU."
    )
    gpu_type: str = Field(
        "h100-80gb", description="GPU model of the cluster, for planning tensor parallelism and KV capacity "
        "(`h100-80gb`, `h200-141gb`, `a100-80gb`, `a100-40gb`, `l40s-48gb`, `l4-24gb`, `a10g-24gb`)."
    )
    cpus_per_replica: float = Field(
        1.0, gt=0, description="Ray CPUs each engine actor asks for (on CPU engines the compute is the whole node)."
    )
    start_timeout_s: float = Field(
        3600.0, gt=0, description="Seconds each model's engine replicas and prompt actors may take to have one actor "
        "running (scheduled, a new node of an autoscaling cluster included, and the model loaded); past it the run "
        "fails naming what did not start and what the cluster has free, instead of waiting without end."
    )


class EngineSpec(_Strict):
    """vLLM engine settings; the defaults follow the accelerator."""

    executor_backend: Literal["auto", "uni", "mp", "ray"] = Field(
        "auto",
        description="vLLM's distributed executor: `auto` is `uni` for one accelerator, `mp` for tensor parallelism "
        "on one node (and always on CPU), `ray` for GPU replicas spanning a placement group.",
    )
    enforce_eager: bool | None = Field(
        None, description="Skip CUDA graphs / torch.compile; defaults to true on CPU (faster start) and false on GPU."
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of each GPU's memory vLLM may take.")
    cpu_kv_cache_gib: float = Field(1.0, gt=0, description="KV cache size for CPU engines, in GiB.")
    max_num_seqs: int | None = Field(None, ge=1, description="Most sequences the engine decodes at once.")
    max_loras: int | None = Field(
        None, ge=1, description="LoRA adapters one engine holds on its GPUs at once (vLLM's max_loras); defaults to "
        "all of the model's adapters. Fewer saves memory; the others wait in CPU memory and swap in."
    )
    enable_expert_parallel: bool = Field(
        False, description="Mixture-of-experts models (Qwen3-30B-A3B, 235B-A22B): place whole experts on the "
        "replica's GPUs instead of sharding each one (vLLM's expert parallelism); memory stays the same."
    )
    vllm_metrics: bool = Field(
        True, description="Export vLLM's own engine metrics (running and waiting requests, KV-cache use, prefix-cache "
        "hits, time to first token, ...) through each Ray node's metrics agent, as `ray_vllm_*` series in Ray's "
        "Prometheus endpoint. Off saves the per-step statistics."
    )
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables for engine actors.")
    extra_args: dict[str, Any] = Field(
        default_factory=dict, description="Further vLLM engine arguments (`vllm.EngineArgs` fields), passed through "
        "as given."
    )

    @field_validator("extra_args")
    @classmethod
    def _not_the_model(cls, value: dict[str, Any]) -> dict[str, Any]:
        owned = sorted({"model", "disable_log_stats"} & value.keys())
        if owned:
            raise ValueError(f"found {', '.join(owned)}; the job sets these itself: choose the model with "
                             "model.variant or model.path, and vLLM's statistics with engine.vllm_metrics")
        return value


class PricesSpec(_Strict):
    """Prices for the two costs the manifest reports side by side."""

    input_per_mtok: float | None = Field(
        None, ge=0, description="USD per 1M input tokens; defaults to the variant's list price."
    )
    output_per_mtok: float | None = Field(
        None, ge=0, description="USD per 1M output tokens; defaults to the variant's list price."
    )
    accelerator_hour: float = Field(
        2.50, ge=0, description="USD per accelerator-hour the engines hold, for the compute cost (default: a typical "
        "on-demand H100 hour)."
    )


class ImagesSpec(_Strict):
    """Bounds on the images rows carry (prompt.images, OpenAI `image_url` parts): an image past one makes its row an
    `image_too_large` or `image_fetch_failed` error row."""

    max_bytes: int = Field(20 << 20, ge=1, description="Largest encoded image, in bytes (default 20 MiB).")
    max_pixels: int = Field(
        50_000_000, ge=1, description="Largest image, in pixels (width x height; default 50 MP), checked before it "
        "is decoded. The processor then scales every image to at most 12.8 MP, 16,384 image tokens (one per 28x28 "
        "pixels)."
    )
    fetch_timeout_s: float = Field(30.0, gt=0, description="Seconds an http(s) image may take to arrive.")
    max_per_row: int = Field(
        8, ge=1, description="Most images one row may carry (a row with more is an `invalid_request` error row); the "
        "engine takes this many per prompt. prompt.images columns count for every row."
    )


class LimitsSpec(_Strict):
    """When a job stops itself: a broken job should not spend the rest of its GPU time on error rows."""

    max_error_rate: float = Field(
        0.1, gt=0, le=1, description="Share of error rows above which the job is failed: stopped early once "
        "min_rows_before_check rows are done, and a finished job over it exits non-zero too."
    )
    min_rows_before_check: int = Field(
        1000, ge=1, description="Rows done before the running error rate can stop the job."
    )


class JobSpec(_Strict):
    """A whole batch job."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", description="Job name: letters, digits, `.`, `_`, `-`.")
    input: InputSpec = Field(description="Where the rows come from.")
    prompt: PromptSpec | None = Field(
        None, description="How a row becomes chat messages; required except for `openai-batch` input, whose "
        "requests carry their messages."
    )
    model: ModelSpec | None = Field(None, description="Which Qwen model answers (or `models` for several).")
    models: list[ModelSpec] | None = Field(
        None, min_length=1, description="Several models: each answers every row (fan-out), or the rows `route_column` "
        "sends it."
    )
    route_column: str | None = Field(
        None, description="With `models`: column naming the model (its `name` or catalog name) that answers each row; "
        "without it every model answers every row."
    )
    response_format: ResponseFormatSpec | None = Field(
        None, description="Constrain answers to labels, a JSON schema or a regex; the validated answer goes to `parsed`."
    )
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="How tokens are drawn.")
    output: OutputSpec = Field(description="Where the results go.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="How much of the cluster the job uses.")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="vLLM engine settings.")
    prices: PricesSpec = Field(default_factory=PricesSpec, description="Price overrides for the cost columns.")
    images: ImagesSpec = Field(default_factory=ImagesSpec, description="Limits on the rows' images.")
    limits: LimitsSpec = Field(default_factory=LimitsSpec, description="When the job fails itself.")
    logical_date: datetime | None = Field(
        None, description="The logical date load_spec filled into `{ds}`/`{ts}` placeholders (set by it; a rendered "
        "spec keeps it). Part of the job's identity, so two scheduled slots never share a job id, nor the OpenAI "
        "response ids derived from it."
    )

    @model_validator(mode="after")
    def _prompt(self) -> JobSpec:
        if self.input.format == "openai-batch":
            if self.prompt is not None and self.prompt.messages_column != "messages":
                raise ValueError("openai-batch input takes its chats from each request's body.messages; drop `prompt` "
                                 "(or set prompt.messages_column: messages, optionally with a system message)")
            self.prompt = self.prompt or PromptSpec(messages_column="messages")
        elif self.prompt is None:
            raise ValueError("`prompt` is required: give prompt.template or prompt.messages_column")
        return self

    @model_validator(mode="after")
    def _models(self) -> JobSpec:
        if (self.model is None) == (self.models is None):
            raise ValueError("give exactly one of `model` (one model) or `models` (a list)")
        names = [m.output_name for m in self.variants]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"models {duplicates} appear twice; give each a distinct `name`")
        if self.route_column is not None and self.models is None:
            raise ValueError("route_column needs `models`")
        if self.response_format is not None and any(m.thinking == "on" for m in self.variants):
            raise ValueError("response_format cannot be combined with thinking: on; constrain the answer of a "
                             "non-thinking model instead")
        return self

    @model_validator(mode="after")
    def _images_need_vision(self) -> JobSpec:
        blind = [m.output_name for m in self.variants if CATALOG[m.catalog_name].vision_params_b is None]
        if self.prompt.images and blind:
            raise ValueError(f"prompt.images gives rows images, but {blind} has no vision tower; use a Qwen2.5-VL "
                             "variant (`qwen-batch models` lists them) or drop prompt.images")
        if len(self.prompt.images) > self.images.max_per_row:
            raise ValueError(f"prompt.images names {len(self.prompt.images)} columns, over images.max_per_row "
                             f"({self.images.max_per_row}); raise the limit or give fewer columns")
        return self

    @model_validator(mode="after")
    def _adapter_column(self) -> JobSpec:
        adapters = any(m.adapters for m in self.variants)
        if self.prompt.adapter_column is not None and not adapters:
            raise ValueError("prompt.adapter_column names each row's LoRA adapter, but no model has `adapters`; add "
                             "them to the model or drop adapter_column")
        if adapters and self.prompt.adapter_column is None:
            if self.input.format != "openai-batch":
                raise ValueError("the model has `adapters`; set prompt.adapter_column to the column naming each row's "
                                 "adapter (null or empty for the base model)")
            self.prompt.adapter_column = "model"  # the request's body.model names the adapter, as OpenAI's does
        return self

    @property
    def variants(self) -> list[ModelSpec]:
        """The models of the job, one or several."""
        return self.models if self.models is not None else [self.model]  # type: ignore[list-item]

    def output_hash(self) -> str:
        """Hash of everything that decides the output rows, the logical date of a scheduled spec included; resume
        requires it to match."""
        decisive = self.model_dump(
            mode="json",
            include={"input": {"path", "format", "id_column", "carry_columns", "rows_per_shard", "schema_",
                               "unique_ids"},
                     "prompt": True,
                     "output": {"format"}, "model": True, "models": True, "route_column": True,
                     "response_format": True, "sampling": True, "prices": {"input_per_mtok", "output_per_mtok"}},
        )
        for name, unset in (("schema", {}), ("unique_ids", None)):
            if decisive["input"][name] == unset:
                del decisive["input"][name]  # specs from before these fields keep their job ids
        if not self.prompt.images:
            del decisive["prompt"]["images"]  # text-only specs keep their job ids
        if self.logical_date is not None:
            decisive["logical_date"] = logical_date_values(self.logical_date)["ts"]
        return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:16]


def arrow_type(name: str) -> pa.DataType:
    """The Arrow type an `input.schema` value names: one of pyarrow's type aliases (`int64`, `timestamp[us]`, ...)."""
    return pa.type_for_alias(name)


def load_spec(source: str | Path | dict[str, Any], logical_date: datetime | None = None) -> JobSpec:
    """Parse and validate a spec from a YAML/JSON file or a dict; every problem raises one SpecError.

    `{ds}`, `{ds_nodash}`, `{ts}` and `{ts_nodash}` in `name`, `input.path` and `output.path` become the run's
    logical date (`logical_date`, else $QWEN_BATCH_LOGICAL_DATE), so each scheduled slot has its own input, output
    and job id, and a rerun of a slot resumes it. Prompt templates are left alone: their `{...}` are columns.
    """
    if isinstance(source, dict):
        raw, where = source, "spec"
    else:
        where = str(source)
        try:
            text = Path(source).read_text()
        except OSError as exc:
            raise SpecError(f"cannot read the spec file {where}: {exc.strerror}; check the path") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpecError(f"{where} is not valid YAML or JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise SpecError(f"{where} must hold a mapping of spec fields, found {type(raw).__name__}")
    raw, filled, problems, slot = _fill_logical_date(raw, logical_date)
    if slot is not None:
        raw = {**raw, "logical_date": slot}
    messages = list(problems.values())
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            if field in problems:
                continue
            message = _describe(error)
            if field in filled:
                message += f" (from {filled[field]!r} with the logical date filled in)"
                if field == "name" and "{ts}" in filled[field]:
                    message += "; {ts} holds ':' and '+', so a name takes {ds}, {ds_nodash} or {ts_nodash}"
            messages.append(message)
    if messages:
        raise SpecError(messages)
    return spec


LOGICAL_DATE_ENV = "QWEN_BATCH_LOGICAL_DATE"
LOGICAL_DATE_PLACEHOLDERS = ("ds", "ds_nodash", "ts", "ts_nodash")


def parse_logical_date(text: str, where: str = "--logical-date") -> datetime:
    """A logical date from `YYYY-MM-DD` or an ISO 8601 datetime, in UTC; a time without a zone is UTC."""
    value = text.strip()
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}([T ].+)?", value):
            raise ValueError(value)
        parsed = datetime.fromisoformat(value[:-1] + "+00:00" if value[-1] in "Zz" else value)
    except ValueError:
        raise SpecError(f"{where}: found {text!r}; expected a date YYYY-MM-DD or an ISO 8601 datetime such as "
                        "2026-11-28T02:00:00Z (a time without a zone is UTC)") from None
    return parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed.astimezone(timezone.utc)


def logical_date_from_env() -> datetime | None:
    """The logical date in $QWEN_BATCH_LOGICAL_DATE, or None when it is unset or empty."""
    text = os.environ.get(LOGICAL_DATE_ENV, "").strip()
    return parse_logical_date(text, LOGICAL_DATE_ENV) if text else None


def logical_date_values(logical_date: datetime) -> dict[str, str]:
    """What each placeholder becomes, as Airflow's `ds`, `ds_nodash`, `ts`, `ts_nodash`, in UTC."""
    moment = (logical_date.replace(tzinfo=timezone.utc) if logical_date.tzinfo is None
              else logical_date.astimezone(timezone.utc))
    return {"ds": f"{moment:%Y-%m-%d}", "ds_nodash": f"{moment:%Y%m%d}", "ts": moment.isoformat(),
            "ts_nodash": f"{moment:%Y%m%dT%H%M%S}"}


def _fill_logical_date(
    raw: dict[str, Any], logical_date: datetime | None
) -> tuple[dict[str, Any], dict[str, str], dict[str, str], str | None]:
    """`raw` with the logical date filled into name, input.path and output.path (a copy), the original text of each
    field it changed, a problem per field it could not fill, and the logical date's `ts` if it filled any."""
    sections = {section: dict(raw[section]) for section in ("input", "output") if isinstance(raw.get(section), dict)}
    raw = {**raw, **sections}
    holders = {"name": (raw, "name"), "input.path": (raw.get("input"), "path"),
               "output.path": (raw.get("output"), "path")}
    texts = {where: holder[key] for where, (holder, key) in holders.items()
             if isinstance(holder, dict) and isinstance(holder.get(key), str)}
    parts: dict[str, list[tuple[str, str | None]]] = {}
    problems: dict[str, str] = {}
    for where, text in texts.items():
        try:
            parts[where] = _date_template(text)
        except ValueError as exc:
            problems[where] = f"{where}: found {text!r}; {exc}"
    dated = [where for where, pieces in parts.items() if any(field for _, field in pieces)]
    if dated and logical_date is None:
        logical_date = logical_date_from_env()
    if dated and logical_date is None:
        for where in dated:
            problems[where] = (f"{where}: found {texts[where]!r}, which needs the run's logical date; pass "
                               f"--logical-date YYYY-MM-DD (or an ISO datetime) or set {LOGICAL_DATE_ENV}")
            del parts[where]
    values = logical_date_values(logical_date) if logical_date is not None else {}
    filled: dict[str, str] = {}
    for where, pieces in parts.items():
        text = "".join(literal + (values[field] if field else "") for literal, field in pieces)
        if text != texts[where]:
            holder, key = holders[where]
            holder[key] = text  # type: ignore[index]
            filled[where] = texts[where]
    return raw, filled, problems, values["ts"] if filled else None


def _date_template(text: str) -> list[tuple[str, str | None]]:
    """A name or path as (literal text, placeholder or None) pieces; ValueError on braces that are not ours."""
    escape = "write a literal brace as {{ or }}"
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ValueError(f"{exc}; {escape}") from None
    unknown = ["{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
               for _, field, spec, conversion in parsed
               if field is not None and (field not in LOGICAL_DATE_PLACEHOLDERS or spec or conversion)]
    if unknown:
        known = ", ".join("{" + name + "}" for name in LOGICAL_DATE_PLACEHOLDERS)
        raise ValueError(f"unknown placeholder(s) {', '.join(unknown)}; the placeholders are {known} (the logical "
                         f"date); {escape}")
    return [(literal, field) for literal, field, _, _ in parsed]


def _describe(error: dict[str, Any]) -> str:
    """One pydantic error as `field.path: found X; expected Y`."""
    where = ".".join(str(part) for part in error["loc"]) or "spec"
    if error["type"] == "extra_forbidden":
        section = _model_in(_spec_type_at(error["loc"][:-1]))
        fields = list(section.model_fields) if section else []
        close = difflib.get_close_matches(str(error["loc"][-1]), fields, n=1)
        expected = f"did you mean `{close[0]}`? Else" if close else f"the fields here are {', '.join(fields)};"
        return (f"{where}: unknown field; {expected} remove it or check its spelling against the spec reference in "
                "README.md")
    if error["type"] == "missing":
        return f"{where}: required field is missing"
    found = error.get("input")
    if isinstance(found, dict):
        shown = f"an object with fields {sorted(map(str, found))}"
    elif isinstance(found, list):
        shown = f"a list of {len(found)} item(s)"
    else:
        shown = repr(found)
    message = f"{where}: found {shown}; {error['msg'].removeprefix('Value error, ')}"
    if error["type"] == "literal_error" and isinstance(found, str):
        allowed = [part for part in _type_parts(_spec_type_at(error["loc"])) if isinstance(part, str)]
        close = difflib.get_close_matches(found, allowed, n=1)
        if close:
            message += f"; did you mean {close[0]!r}?"
    return message


def _spec_type_at(loc: tuple[str | int, ...]) -> Any:
    """The declared type of the spec field at `loc`, a pydantic error location; None if JobSpec has no such field."""
    annotation: Any = JobSpec
    for part in loc:
        model = _model_in(annotation)
        if model is None:
            break  # inside a plain field: the tag of a union member, e.g. "literal['auto']"
        if isinstance(part, str):
            if part not in model.model_fields:
                return None
            annotation = model.model_fields[part].annotation
    return annotation


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The spec section an annotation holds (`ModelSpec` in `list[ModelSpec] | None`), or None."""
    return next((part for part in _type_parts(annotation) if isinstance(part, type) and issubclass(part, BaseModel)),
                None)


def _type_parts(annotation: Any) -> list[Any]:
    """`annotation` and everything nested in it: union members, item types, Literal values."""
    return [annotation, *(part for arg in get_args(annotation) for part in _type_parts(arg))]
