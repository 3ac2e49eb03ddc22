"""Engine stage: one vLLM engine per actor, fed token ids from many shards at once, never drained between shards.

Ray Data calls the stage on several shards concurrently (threads of one actor). Each call hands its rows to the
actor's feeder thread, which is the only thread that touches the engine: it adds new requests between engine steps,
so a shard's last long rows decode alongside the next shards' rows and the engine's running batch stays full until
the job's last shard. A call returns when its own rows are done; shards therefore finish and commit in any order.

A dead actor is restarted by Ray and its shards retried without limit (a lost node is normal). The job's CrashLedger
knows which rows each engine holds, told before the engine takes them, so an engine failure counts against the rows in
flight whether Python saw it or not (a crash in native code, a kill for memory; not a lost node): on the retry those
rows run one at a time with nothing beside them, and a row that brings the engine down again on its own becomes an
`engine_error` row, so a poison row can neither loop nor end the job.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa

import ray

from qwen_batch.pipelines import adapters as lora
from qwen_batch.pipelines.images import IMAGES_TYPE, decode, image_token_counts
from qwen_batch.pipelines.stage import Stage, with_errors
from qwen_batch.pipelines.structured import StructuredOutput
from qwen_batch.pipelines.weights import local_checkpoint
from qwen_batch.schemas.results import LOGPROBS_FIELD

log = logging.getLogger(__name__)

# Rows each replica keeps in flight, as a multiple of the engine's max_num_seqs: enough queued behind the running
# batch that a shard finishing never leaves the engine short of work.
ROWS_IN_FLIGHT_PER_SEQ = 2
STRAGGLING_SHARDS = 3
# Engine failures a row may be part of: the first in company, the second alone, which makes it an error row.
CRASHES_BEFORE_ERROR = 2
# Deaths of an engine that Python does not see (a native crash, a kill) a row must be in flight for before they count
# as its failures: a single kill, by a user or for memory, is no reason to suspect the rows it interrupted.
UNSEEN_DEATHS_TO_SUSPECT = 2
LEDGER_TIMEOUT_S = 30.0


@ray.remote(num_cpus=0)
class CrashLedger:
    """How many engine failures each row (shard id, source row) was in flight for, in one run.

    An engine actor tells the ledger which rows it is about to hand its engine (`hold`), with those it is done with.
    A failure Python sees is recorded by the failing actor itself (`record`). A death it cannot see (a crash in
    native code, a kill for memory) is found when Ray restarts the actor: the rows it held were in flight, unless its
    node is gone (a lost node is no row's doing). Those count as a failure from the second such death they were in
    flight for, so one kill of the process alone sends no row into isolation.
    """

    def __init__(self) -> None:
        self.crashes: dict[str, dict[int, int]] = {}
        self.nodes: dict[str, str] = {}  # each engine actor's node
        self.held: dict[str, set[tuple[str, int]]] = {}
        self.unseen: dict[tuple[str, int], int] = {}  # deaths Python did not see, per row in flight at them
        self.restarts = 0

    def started(self, actor_id: str, node_id: str) -> None:
        """An engine actor came up on this node; Ray restarts an actor under the same id."""
        held = self.held.pop(actor_id, set())
        if actor_id in self.nodes:
            self.restarts += 1
            if held and self._alive(self.nodes[actor_id]):
                for row in held:
                    self.unseen[row] = self.unseen.get(row, 0) + 1
                self.record(sorted(row for row in held if self.unseen[row] >= UNSEEN_DEATHS_TO_SUSPECT))
        self.nodes[actor_id] = node_id

    def hold(self, actor_id: str, rows: list[tuple[str, int]], released: list[tuple[str, int]]) -> None:
        """The actor is about to hand these rows to its engine, and is done with the `released` ones."""
        held = self.held.setdefault(actor_id, set())
        held.difference_update(map(tuple, released))
        held.update(map(tuple, rows))

    def engine_restarts(self) -> int:
        """Engine actors Ray restarted (after a crash, or with a lost node) in this run."""
        return self.restarts

    def record(self, rows: list[tuple[str, int]], actor_id: str | None = None) -> None:
        """These rows were in flight at an engine failure (of `actor_id`, which then holds none)."""
        if actor_id is not None:
            self.held.pop(actor_id, None)
        for shard, index in rows:
            counts = self.crashes.setdefault(shard, {})
            counts[index] = counts.get(index, 0) + 1

    def of_shards(self, shards: list[str]) -> list[tuple[str, int, int]]:
        """(shard, source row, failures) of the rows of these shards that were in flight at a failure."""
        return [(shard, row, count) for shard in shards for row, count in self.crashes.get(shard, {}).items()]

    @staticmethod
    def _alive(node_id: str) -> bool:
        return any(node["NodeID"] == node_id and node["Alive"] for node in ray.nodes())


@dataclass(frozen=True)
class EngineConfig:
    """What one engine actor loads and how it samples."""

    model: str
    llm_kwargs: dict[str, Any]
    sampling: dict[str, Any]
    seed: int | None
    rows_of: str | None = None  # in a job of several models, the one whose rows this engine answers
    thinking: bool = False
    thinking_budget: int | None = None
    structured: StructuredOutput | None = None
    ledger: Any = None  # a CrashLedger handle
    adapters: tuple[lora.Adapter, ...] = ()  # LoRA adapters the engine serves beside the base model
    max_loras: int | None = None
    vllm_metrics: bool = False


def new_llm_engine(config: EngineConfig) -> Any:
    """vLLM's engine for `config`, with its own metrics exported through Ray's metrics agent when asked.

    Built from EngineArgs rather than `vllm.LLM`, which takes no stat loggers; the two config sections we pass as
    dicts are made into vLLM's config objects as `LLM` would.
    """
    from vllm import EngineArgs
    from vllm.config import ReasoningConfig, StructuredOutputsConfig
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.llm_engine import LLMEngine

    kwargs = dict(config.llm_kwargs)
    for name, section in (("structured_outputs_config", StructuredOutputsConfig), ("reasoning_config", ReasoningConfig)):
        if isinstance(kwargs.get(name), dict):
            kwargs[name] = section(**kwargs[name])
    loggers = None
    if config.vllm_metrics:
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        loggers = [RayPrometheusStatLogger]
    args = EngineArgs(model=config.model, disable_log_stats=not config.vllm_metrics, **kwargs)
    # LLM_CLASS: the batch defaults `vllm.LLM` gets (e.g. a larger max_num_batched_tokens than a server's).
    return LLMEngine.from_engine_args(args, usage_context=UsageContext.LLM_CLASS, stat_loggers=loggers)


def new_crash_ledger() -> Any:
    """A CrashLedger on this (the driver's) node: it must outlive the loss of any engine's node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return CrashLedger.options(scheduling_strategy=here).remote()


def shards_in_flight(max_num_seqs: int, rows_per_shard: int) -> int:
    """Concurrent shards per replica: enough for `ROWS_IN_FLIGHT_PER_SEQ x max_num_seqs` rows, plus
    STRAGGLING_SHARDS that may be down to their few longest rows, which hold their call open but feed the engine
    almost nothing."""
    return math.ceil(ROWS_IN_FLIGHT_PER_SEQ * max_num_seqs / rows_per_shard) + STRAGGLING_SHARDS


@dataclass(frozen=True)
class Generation:
    """What the engine reported for one row, plus its share of the engine's busy time."""

    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    engine_seconds: float
    batch_seconds: float
    logprobs: list[dict[str, Any]] | None = None
    image_tokens: list[int] = field(default_factory=list)  # tokens of each of the prompt's images, in order

    @classmethod
    def from_vllm(cls, output: Any, engine_seconds: float, batch_seconds: float, top_logprobs: int | None = None,
                  image_token_id: int | None = None) -> Generation:
        """From a finished `vllm.RequestOutput`; with `top_logprobs`, each token's logprob and its best
        `top_logprobs` alternatives (LOGPROBS_FIELD's shape); with `image_token_id` (a vision model's), the tokens
        each image took in the prompt as the engine expanded it."""
        completion = output.outputs[0]
        logprobs = None
        if top_logprobs is not None and completion.logprobs is not None:
            # vLLM lists the top alternatives by rank plus the chosen token wherever it ranks.
            logprobs = [{"token": ranked[token_id].decoded_token, "logprob": ranked[token_id].logprob,
                         "top_logprobs": [{"token": entry.decoded_token, "logprob": entry.logprob}
                                          for entry in sorted(ranked.values(), key=lambda e: e.rank)[:top_logprobs]]}
                        for token_id, ranked in zip(completion.token_ids, completion.logprobs)]
        return cls(list(completion.token_ids), completion.text, completion.finish_reason or "stop",
                   len(output.prompt_token_ids), output.num_cached_tokens or 0, engine_seconds, batch_seconds,
                   logprobs, image_token_counts(output.prompt_token_ids, image_token_id) if image_token_id else [])


@dataclass
class _Request:
    """A row on its way through the engine: where it is from, its future, and the busy time it has been part of."""

    row: tuple[str, int]
    future: Future
    isolated: bool = False
    lora_request: Any = None  # vLLM's LoRARequest of the row's adapter, None for the base model
    top_logprobs: int | None = None
    engine_seconds: float = 0.0
    batch_seconds: float = 0.0


class EngineStage(Stage):
    """Generates for every row without an error; error rows pass through with zero tokens."""

    requires = {
        "id": "row id, which seeds the row's sampling",
        "_shard": "shard id: with source_row, names the row to the crash ledger",
        "source_row": "row position in its input file",
        "prompt_token_ids": "token ids of the chat-templated prompt, null for error rows",
        "_skip": "true for rows another model of the job answers",
        "_request": "the row's own sampling overrides (OpenAI batch requests), else null",
        "_adapter": "name of the LoRA adapter that answers the row, null for the base model",
        "_error_type": "error class of a row that already failed, else null",
        "_error": "message of a row that already failed, else null",
        "_images": "the row's images as their encoded bytes, in prompt order; null without images",
        "_image_info": "source, format, size and bytes of each of the row's images; null without images",
    }
    produces = {
        "generated_text": "decoded answer (after the reasoning block, if any)",
        "reasoning_text": "decoded reasoning block without its tags, null when not thinking",
        "reasoning_tokens": "generated tokens up to and including the `</think>` token",
        "completion_token_ids": "token ids the engine generated",
        "finish_reason": "`stop`, `length`, or `error`",
        "prompt_tokens": "prompt length as the engine counted it",
        "cached_tokens": "prompt tokens served from the prefix cache",
        "parsed": "the answer when it satisfies the row's response format, else null",
        "logprobs": "generated tokens with their logprobs and top alternatives, for rows whose request asked",
        "images": "each of the row's images: source, format, size, bytes and the prompt tokens the engine gave it",
        "_engine_seconds": "the row's share of the engine's busy time (each step split among the rows in it)",
        "_batch_seconds": "engine busy time the row spent in the running batch",
    }

    def __init__(self, config: EngineConfig):
        started = time.monotonic()
        config = replace(config, model=local_checkpoint(config.model))  # a copy on this node if remote
        self.config, self.rows_of = config, config.rows_of
        self.lora_requests = self._lora_requests()
        self.engine = new_llm_engine(self._with_lora_args(config))
        self.tokenizer = self.engine.get_tokenizer()
        # A vision model's image placeholder, which the engine widens to each image's tokens (None without vision).
        self.image_token_id = getattr(self.engine.model_config.hf_config, "image_token_id", None)
        self.think_end = self.tokenizer.convert_tokens_to_ids("</think>") if config.thinking else None
        self._incoming: queue.SimpleQueue[tuple[str, Any, Any, _Request]] = queue.SimpleQueue()
        self._request_ids = itertools.count()
        context = ray.get_runtime_context()
        self.actor_id = context.get_actor_id()
        if config.ledger is not None:
            config.ledger.started.remote(self.actor_id, context.get_node_id())
        threading.Thread(target=self._feed, name="engine-feeder", daemon=True).start()
        log.info("engine for %s ready in %.1f s", config.model, time.monotonic() - started)

    def process(self, block: pa.Table) -> pa.Table:
        from vllm.inputs import TokensPrompt

        self.check(block)
        error_types = block.column("_error_type").to_pylist()
        errors = block.column("_error").to_pylist()
        ids = block.column("id").to_pylist()
        skip = block.column("_skip").to_pylist()
        token_lists = block.column("prompt_token_ids").to_pylist()
        requests = block.column("_request").to_pylist()
        images = block.column("_images").to_pylist()
        adapter = block.column("_adapter").to_pylist()
        # A row is (shard, source_row) for the crash ledger: the same however Ray groups shards into blocks.
        rows = list(zip(block.column("_shard").to_pylist(), block.column("source_row").to_pylist()))
        crashes = self._crashes({shard for shard, _ in rows})
        futures: dict[int, Future] = {}
        for index, error_type in enumerate(error_types):
            if error_type is not None or skip[index]:
                continue
            failures = crashes.get(rows[index], 0)
            if failures >= CRASHES_BEFORE_ERROR:
                error_types[index], errors[index] = "engine_error", (
                    f"the engine failed with this row in it and then again with this row alone ({failures} failures "
                    "counted against it): the row was not answered. Check its prompt and sampling fields.")
                continue
            prompt = TokensPrompt(prompt_token_ids=token_lists[index])
            if images[index]:
                prompt["multi_modal_data"] = {"image": [decode(data) for data in images[index]]}
            futures[index] = self._submit(rows[index], prompt,
                                          lambda i=index: self.sampling_params(ids[i], requests[i]),
                                          isolated=failures > 0, lora_request=self.lora_requests.get(adapter[index]))

        count = block.num_rows
        text: list[str | None] = [None] * count
        reasoning: list[str | None] = [None] * count
        reasoning_tokens = [0] * count
        completion_ids: list[list[int]] = [[] for _ in range(count)]
        finish = ["error"] * count
        prompt_tokens = [0] * count
        cached = [0] * count
        parsed: list[str | None] = [None] * count
        logprobs: list[list[dict[str, Any]] | None] = [None] * count
        engine_seconds = [0.0] * count
        batch_seconds = [0.0] * count
        image_info = block.column("_image_info").to_pylist()
        for index, future in futures.items():
            generation = future.result()
            if isinstance(generation, Exception):
                error_types[index], errors[index] = "engine_error", f"the engine rejected this row: {generation}"
                continue
            completion_ids[index] = generation.token_ids
            if self.think_end is None:
                text[index] = generation.text
            else:
                reasoning_tokens[index], reasoning[index], text[index] = self.split_reasoning(generation.token_ids)
            finish[index] = generation.finish_reason
            prompt_tokens[index] = generation.prompt_tokens
            cached[index] = generation.cached_tokens
            logprobs[index] = generation.logprobs
            engine_seconds[index], batch_seconds[index] = generation.engine_seconds, generation.batch_seconds
            for info, tokens in zip(image_info[index] or [], generation.image_tokens):
                info["tokens"] = tokens
            structured = self.structured_output(requests[index])
            if structured is not None:
                parsed[index], problem = structured.check(text[index])
                if problem is not None:
                    error_types[index], errors[index] = "invalid_structured_output", problem
        return (
            with_errors(block, error_types, errors)
            .append_column("generated_text", pa.array(text, pa.string()))
            .append_column("reasoning_text", pa.array(reasoning, pa.string()))
            .append_column("reasoning_tokens", pa.array(reasoning_tokens, pa.int64()))
            .append_column("completion_token_ids", pa.array(completion_ids, pa.list_(pa.int32())))
            .append_column("finish_reason", pa.array(finish, pa.string()))
            .append_column("prompt_tokens", pa.array(prompt_tokens, pa.int64()))
            .append_column("cached_tokens", pa.array(cached, pa.int64()))
            .append_column("parsed", pa.array(parsed, pa.string()))
            .append_column(LOGPROBS_FIELD.name, pa.array(logprobs, LOGPROBS_FIELD.type))
            .append_column("images", pa.array(image_info, IMAGES_TYPE))
            .append_column("_engine_seconds", pa.array(engine_seconds, pa.float64()))
            .append_column("_batch_seconds", pa.array(batch_seconds, pa.float64()))
        )

    def _lora_requests(self) -> dict[str, Any]:
        """vLLM's LoRARequest for each adapter, by name, from this node's copy of it (fetched now if needed)."""
        from vllm.lora.request import LoRARequest

        return {adapter.name: LoRARequest(adapter.name, number, lora.local_path(adapter))
                for number, adapter in enumerate(self.config.adapters, start=1)}

    @staticmethod
    def _with_lora_args(config: EngineConfig) -> EngineConfig:
        """`config` with the engine arguments that serve its adapters, for the platform the engine runs on."""
        from vllm.platforms import current_platform

        args = lora.engine_args(list(config.adapters), config.max_loras, on_cpu=current_platform.is_cpu())
        return replace(config, llm_kwargs={**config.llm_kwargs, **args}) if args else config

    def structured_output(self, request: dict[str, Any] | None) -> StructuredOutput | None:
        """The row's response format: its request's own, else the job's."""
        if request is not None and request.get("response_format") is not None:
            return StructuredOutput.from_json(request["response_format"])
        return self.config.structured

    def sampling_params(self, row_id: str, request: dict[str, Any] | None) -> Any:
        """A row's SamplingParams: the job's, with the row's own request fields (OpenAI batch) on top."""
        from vllm import SamplingParams

        config = self.config
        overrides = {name: value for name, value in (request or {}).items()
                     if value is not None and name != "response_format"}
        seed = overrides.pop("seed", None)
        structured = self.structured_output(request)
        return SamplingParams(
            **{**config.sampling, **overrides}, seed=row_seed(config.seed, row_id) if seed is None else seed,
            structured_outputs=structured.to_vllm() if structured else None,
            thinking_token_budget=config.thinking_budget,
        )

    def split_reasoning(self, token_ids: list[int]) -> tuple[int, str, str]:
        """(reasoning tokens, reasoning text, answer text), split at the `</think>` token; all reasoning if absent."""
        end = token_ids.index(self.think_end) + 1 if self.think_end in token_ids else len(token_ids)
        decode = self.tokenizer.decode
        reasoning = decode(token_ids[:end], skip_special_tokens=True).replace("</think>", "").strip()
        return end, reasoning, decode(token_ids[end:], skip_special_tokens=True).lstrip("\n")

    def _crashes(self, shards: set[str]) -> dict[tuple[str, int], int]:
        """Engine failures per row of these shards so far in this run (none without a ledger)."""
        if self.config.ledger is None or not shards:
            return {}
        found = ray.get(self.config.ledger.of_shards.remote(sorted(shards)), timeout=LEDGER_TIMEOUT_S)
        return {(shard, row): count for shard, row, count in found}

    def _submit(self, row: tuple[str, int], prompt: Any, make_params: Any, isolated: bool,
                lora_request: Any = None) -> Future:
        """Queue one row for the feeder; the future resolves to a Generation, or the exception that rejected it."""
        request = _Request(row, Future(), isolated, lora_request=lora_request)
        try:
            params = make_params()
        except Exception as exc:  # noqa: BLE001 - bad per-row sampling fields fail that row only
            request.future.set_result(exc)
            return request.future
        request.top_logprobs = params.logprobs
        self._incoming.put((f"row-{next(self._request_ids)}", prompt, params, request))
        return request.future

    def _feed(self) -> None:
        """The engine loop: admit queued rows, step, resolve finished rows; block while there is nothing to do.

        A row under suspicion (in flight at an earlier engine failure) is admitted only into an empty engine, and
        nothing joins it until it is done, so a failure with it in flight is its own.
        """
        engine = self.engine
        running: dict[str, _Request] = {}
        waiting: list[tuple[str, Any, Any, _Request]] = []
        suspects: list[tuple[str, Any, Any, _Request]] = []
        released: list[tuple[str, int]] = []  # done since the ledger last heard from this actor
        while True:
            try:
                # Wait for work only when there is none, so new rows join between steps.
                item = self._incoming.get(block=not (running or waiting or suspects))
                while True:
                    (suspects if item[3].isolated else waiting).append(item)
                    item = self._incoming.get_nowait()
            except queue.Empty:
                pass
            if any(r.isolated for r in running.values()):
                admitted = []
            elif suspects:
                # Let the engine empty, then give it the suspect alone.
                admitted = [] if running else [suspects.pop(0)]
            else:
                admitted, waiting = waiting, []
            if admitted:
                self._hold([request.row for *_, request in admitted], released)
                released = []
            for request_id, prompt, params, request in admitted:
                try:
                    engine.add_request(request_id, prompt, params, lora_request=request.lora_request)
                    running[request_id] = request
                except Exception as exc:  # noqa: BLE001 - the engine rejected this row alone
                    self._exit_if_dead(exc, running)
                    request.future.set_result(exc)
            if not running:
                continue
            started = time.monotonic()
            try:
                outputs = engine.step()
            except Exception as exc:  # noqa: BLE001 - an engine that fails a step is not trusted again
                self._exit_if_dead(exc, running)
                self._exit(f"engine step failed ({exc})", running)
            seconds = time.monotonic() - started
            for output in outputs:
                request = running[output.request_id]
                request.engine_seconds += seconds / len(outputs)
                request.batch_seconds += seconds
                if output.finished:
                    del running[output.request_id]
                    released.append(request.row)
                    request.future.set_result(
                        Generation.from_vllm(output, request.engine_seconds, request.batch_seconds,
                                             request.top_logprobs, image_token_id=self.image_token_id))

    def _hold(self, rows: list[tuple[str, int]], released: list[tuple[str, int]]) -> None:
        """Tell the ledger which rows the engine is about to take, before it takes them: if the process then dies
        where Python cannot see it, the restarted actor's ledger knows which rows were in flight."""
        if self.config.ledger is None:
            return
        try:
            ray.get(self.config.ledger.hold.remote(self.actor_id, rows, released), timeout=LEDGER_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - the rows are answered all the same; only a crash goes unattributed
            log.error("could not tell the crash ledger which rows the engine takes: %s", exc)

    def _exit(self, why: str, running: dict[str, _Request]) -> None:
        """Record the rows in flight in the ledger, then exit so Ray restarts the actor and retries its shards."""
        log.error("%s with %d rows in flight; exiting the actor so Ray restarts it", why, len(running))
        if self.config.ledger is not None and running:
            try:
                ray.get(self.config.ledger.record.remote([r.row for r in running.values()], self.actor_id),
                        timeout=LEDGER_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - the restart matters more than the record
                log.error("could not record the rows in flight at the engine failure: %s", exc)
        os._exit(1)

    def _exit_if_dead(self, exc: Exception, running: dict[str, _Request]) -> None:
        """A dead engine cannot recover in this process."""
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(exc, EngineDeadError):
            self._exit(f"engine died ({exc})", running)


def row_seed(base_seed: int | None, row_id: str) -> int | None:
    """Per-row seed from the job's seed and the row id, so a row samples the same however rows are batched."""
    if base_seed is None:
        return None
    digest = hashlib.blake2b(f"{base_seed}\0{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF
