"""Engine stage: one vLLM engine per actor, fed token ids, reporting what it generated in token ids."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from qwen_batch.pipelines.stage import Stage, with_errors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """What one engine actor loads and how it samples."""

    model: str
    llm_kwargs: dict[str, Any]
    sampling: dict[str, Any]
    seed: int | None
    thinking: bool = False
    thinking_budget: int | None = None
    structured: dict[str, Any] | None = None


class EngineStage(Stage):
    """Generates for every row without an error; error rows pass through with zero tokens."""

    requires = {
        "id": "row id, which seeds the row's sampling",
        "prompt_token_ids": "token ids of the chat-templated prompt, null for error rows",
        "_skip": "true for rows another model of the job answers",
        "_request": "JSON of the row's own sampling overrides (OpenAI batch requests), else null",
        "_error_type": "error class of a row that already failed, else null",
        "_error": "message of a row that already failed, else null",
    }
    produces = {
        "generated_text": "decoded answer (after the reasoning block, if any)",
        "reasoning_text": "decoded reasoning block without its tags, null when not thinking",
        "reasoning_tokens": "generated tokens up to and including the `</think>` token",
        "completion_token_ids": "token ids the engine generated",
        "finish_reason": "`stop`, `length`, or `error`",
        "prompt_tokens": "prompt length as the engine counted it",
        "cached_tokens": "prompt tokens served from the prefix cache",
        "_engine_seconds": "wall time of the shard's generate call",
    }

    def __init__(self, config: EngineConfig):
        from vllm import LLM

        started = time.monotonic()
        self.config = config
        self.llm = LLM(model=config.model, **config.llm_kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.think_end = self.tokenizer.convert_tokens_to_ids("</think>") if config.thinking else None
        log.info("engine for %s ready in %.1f s", config.model, time.monotonic() - started)

    def __call__(self, block: pa.Table) -> pa.Table:
        from vllm.inputs import TokensPrompt

        self.check(block)
        error_types = block.column("_error_type").to_pylist()
        errors = block.column("_error").to_pylist()
        ids = block.column("id").to_pylist()
        skip = block.column("_skip").to_pylist()
        todo = [i for i, error_type in enumerate(error_types) if error_type is None and not skip[i]]
        token_lists = block.column("prompt_token_ids").to_pylist()
        prompts = [TokensPrompt(prompt_token_ids=token_lists[i]) for i in todo]
        requests = block.column("_request").to_pylist()
        params = [self.sampling_params(ids[i], json.loads(requests[i]) if requests[i] else {}) for i in todo]
        started = time.monotonic()
        outputs = self._generate(prompts, params)
        engine_seconds = time.monotonic() - started

        count = block.num_rows
        text: list[str | None] = [None] * count
        reasoning: list[str | None] = [None] * count
        reasoning_tokens = [0] * count
        completion_ids: list[list[int]] = [[] for _ in range(count)]
        finish = ["error"] * count
        prompt_tokens = [0] * count
        cached = [0] * count
        for index, output in zip(todo, outputs):
            if isinstance(output, Exception):
                error_types[index], errors[index] = "engine_error", f"the engine rejected this row: {output}"
                continue
            completion = output.outputs[0]
            completion_ids[index] = list(completion.token_ids)
            if self.think_end is None:
                text[index] = completion.text
            else:
                reasoning_tokens[index], reasoning[index], text[index] = self.split_reasoning(completion_ids[index])
            finish[index] = completion.finish_reason or "stop"
            prompt_tokens[index] = len(output.prompt_token_ids)
            cached[index] = output.num_cached_tokens or 0
        return (
            with_errors(block, error_types, errors)
            .append_column("generated_text", pa.array(text, pa.string()))
            .append_column("reasoning_text", pa.array(reasoning, pa.string()))
            .append_column("reasoning_tokens", pa.array(reasoning_tokens, pa.int64()))
            .append_column("completion_token_ids", pa.array(completion_ids, pa.list_(pa.int32())))
            .append_column("finish_reason", pa.array(finish, pa.string()))
            .append_column("prompt_tokens", pa.array(prompt_tokens, pa.int64()))
            .append_column("cached_tokens", pa.array(cached, pa.int64()))
            .append_column("_engine_seconds", pa.array([engine_seconds] * count, pa.float64()))
        )

    def sampling_params(self, row_id: str, overrides: dict[str, Any]) -> Any:
        """A row's SamplingParams: the job's, with the row's own request fields (OpenAI batch) on top."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        config = self.config
        response_format = overrides.pop("response_format", None)
        structured = config.structured
        if response_format is not None:
            structured = {"json": response_format["json_schema"]} if "json_schema" in response_format else \
                {"json_object": True}
        seed = overrides.pop("seed", None)
        return SamplingParams(
            **{**config.sampling, **overrides}, seed=row_seed(config.seed, row_id) if seed is None else seed,
            structured_outputs=StructuredOutputsParams(**structured) if structured else None,
            thinking_token_budget=config.thinking_budget,
        )

    def split_reasoning(self, token_ids: list[int]) -> tuple[int, str, str]:
        """(reasoning tokens, reasoning text, answer text), split at the `</think>` token; all reasoning if absent."""
        end = token_ids.index(self.think_end) + 1 if self.think_end in token_ids else len(token_ids)
        decode = self.tokenizer.decode
        reasoning = decode(token_ids[:end], skip_special_tokens=True).replace("</think>", "").strip()
        return end, reasoning, decode(token_ids[end:], skip_special_tokens=True).lstrip("\n")

    def _generate(self, prompts: list[Any], params: list[Any]) -> list[Any]:
        """Generate a batch; if the engine rejects it, isolate the rows it rejects as per-row exceptions."""
        if not prompts:
            return []
        try:
            return self.llm.generate(prompts, params, use_tqdm=False)
        except Exception as exc:  # noqa: BLE001 - a dead engine is re-raised below; anything else is per row
            self._exit_if_dead(exc)
            log.warning("batch of %d rows failed (%s); retrying row by row to isolate the bad rows", len(prompts), exc)
        results: list[Any] = []
        for prompt, param in zip(prompts, params):
            try:
                results.extend(self.llm.generate([prompt], [param], use_tqdm=False))
            except Exception as exc:  # noqa: BLE001
                self._exit_if_dead(exc)
                results.append(exc)
        return results

    @staticmethod
    def _exit_if_dead(exc: Exception) -> None:
        """A dead engine cannot recover in this process: exit so Ray restarts the actor and retries the shard."""
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(exc, EngineDeadError):
            log.error("engine died (%s); exiting the actor so Ray restarts it", exc)
            os._exit(1)


def row_seed(base_seed: int | None, row_id: str) -> int | None:
    """Per-row seed from the job's seed and the row id, so a row samples the same however rows are batched."""
    if base_seed is None:
        return None
    digest = hashlib.blake2b(f"{base_seed}\0{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF
