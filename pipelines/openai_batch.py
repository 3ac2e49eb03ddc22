"""OpenAI Batch API files: request lines in, response lines out, so a batch file moves over unchanged.

Request line: {"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {"model", "messages", ...}}.
Response line: {"id", "custom_id", "response": {"status_code", "request_id", "body": <chat.completion>}, "error"}.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import ConfigDict, Field, ValidationError

from qwen_batch.pipelines.structured import StructuredOutput
from qwen_batch.schemas.errors import RowError
from qwen_batch.schemas.spec import SamplingSpec

CHAT_COMPLETIONS = "/v1/chat/completions"
# Body fields with a meaning here; anything else a model server would act on is refused rather than ignored.
SAMPLING_FIELDS = ("temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty",
                   "repetition_penalty")
IGNORED_FIELDS = ("model", "messages", "user", "metadata", "store", "service_tier", "n", "max_tokens",
                  "max_completion_tokens", "response_format", "stream", "logprobs", "top_logprobs")
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs


def parse_request(line: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(columns the pipeline reads: custom_id, model, messages; per-row overrides) of one request line."""
    if line.get("method", "POST") != "POST" or line.get("url") != CHAT_COMPLETIONS:
        raise RowError("invalid_request", f"expected method POST and url {CHAT_COMPLETIONS}, found "
                       f"{line.get('method')!r} {line.get('url')!r}: only chat completions are supported")
    body = line.get("body")
    if not isinstance(body, dict):
        raise RowError("invalid_request", f"`body` must be an object, found {type(body).__name__}")
    unsupported = sorted(set(body) - set(SAMPLING_FIELDS) - set(IGNORED_FIELDS))
    if unsupported:
        raise RowError("invalid_request", f"body fields {unsupported} are not supported; remove them")
    if body.get("n", 1) != 1 or body.get("stream"):
        raise RowError("invalid_request", "body.n > 1 and body.stream are not supported in batch jobs; remove them")
    overrides = _sampling(body)
    logprobs = _logprobs(body)
    if logprobs is not None:
        overrides["logprobs"] = logprobs
    response_format = _response_format(body.get("response_format"))
    if response_format is not None:
        overrides["response_format"] = response_format
    columns = {"custom_id": line.get("custom_id"), "model": body.get("model"), "messages": body.get("messages")}
    return columns, overrides


class _RequestSampling(SamplingSpec):
    """A request's sampling fields, held to the job spec's limits (vLLM's own) with JSON's types, no coercion."""

    model_config = ConfigDict(extra="forbid", strict=True)

    presence_penalty: float | None = Field(
        None, ge=-2, le=2, allow_inf_nan=False, description="Penalty on tokens already present, in [-2, 2]."
    )
    frequency_penalty: float | None = Field(
        None, ge=-2, le=2, allow_inf_nan=False, description="Penalty by how often a token appeared, in [-2, 2]."
    )


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    """The body's sampling fields that are set, checked against vLLM's ranges; RowError naming field and range."""
    given = {name: body[name] for name in SAMPLING_FIELDS if body.get(name) is not None}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        given["max_tokens"] = max_tokens
    if isinstance(given.get("stop"), str):
        given["stop"] = [given["stop"]]  # OpenAI takes one stop string or a list
    try:
        _RequestSampling.model_validate(given)
    except ValidationError as exc:
        named = {"max_tokens": "max_completion_tokens"} if "max_completion_tokens" in body else {}
        raise RowError("invalid_request", "; ".join(_problem(error, named) for error in exc.errors())) from None
    return given


def _problem(error: Any, named: dict[str, str]) -> str:
    """One validation error as `body.<field>: found <value>; <what is wrong>; allowed: <range>`."""
    field = str(error["loc"][0])
    where = ".".join(["body", named.get(field, field), *map(str, error["loc"][1:])])
    return f"{where}: found {error['input']!r}; {error['msg'][0].lower()}{error['msg'][1:]}; allowed: {_allowed(field)}"


_BOUNDS = {"Ge": ("[", ">="), "Gt": ("(", ">"), "Le": ("]", "<="), "Lt": (")", "<")}


def _allowed(field: str) -> str:
    """The values a sampling field takes, from its constraints: `a finite number in [0, 2]`, `an integer >= 1`..."""
    bounds = {type(rule).__name__: getattr(rule, type(rule).__name__.lower())
              for rule in _RequestSampling.model_fields[field].metadata if type(rule).__name__ in _BOUNDS}
    kind = {"max_tokens": "an integer", "seed": "an integer", "stop": "a string or a list of non-empty strings"}.get(
        field, "a finite number")
    low = next(((name, value) for name, value in bounds.items() if name in ("Ge", "Gt")), None)
    high = next(((name, value) for name, value in bounds.items() if name in ("Le", "Lt")), None)
    if low and high:
        return f"{kind} in {_BOUNDS[low[0]][0]}{low[1]}, {high[1]}{_BOUNDS[high[0]][0]}"
    if low or high:
        name, value = low or high  # type: ignore[misc]
        return f"{kind} {_BOUNDS[name][1]} {value}"
    return kind


def _logprobs(body: dict[str, Any]) -> int | None:
    """How many alternatives per generated token the row's logprobs list (0: the chosen token's only); None: no
    logprobs. As OpenAI: `logprobs: true`, with `top_logprobs` in [0, 20]."""
    wanted, top = body.get("logprobs"), body.get("top_logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise RowError("invalid_request", f"body.logprobs: found {wanted!r}; allowed: true or false")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise RowError("invalid_request", f"body.top_logprobs: found {top!r}; allowed: an integer in "
                       f"[0, {MAX_TOP_LOGPROBS}]")
    if top is not None and not wanted:
        raise RowError("invalid_request", "body.top_logprobs needs body.logprobs: true")
    return (top or 0) if wanted else None


def _response_format(given: Any) -> StructuredOutput | None:
    """OpenAI's response_format as ours: None (text), any JSON object, or JSON valid against a schema."""
    if given is None or given == {"type": "text"}:
        return None
    if isinstance(given, dict) and given.get("type") == "json_object":
        return StructuredOutput("json_object")
    if isinstance(given, dict) and given.get("type") == "json_schema" and isinstance(given.get("json_schema"), dict):
        schema = given["json_schema"].get("schema")
        if isinstance(schema, dict):
            return StructuredOutput("json_schema", json_schema=schema)
    raise RowError("invalid_request", f"response_format must be text, json_object or json_schema with a `schema`, "
                   f"found {json.dumps(given)[:120]}")


def response_line(row: dict[str, Any], job_id: str, created: int) -> dict[str, Any]:
    """The OpenAI batch output line of one output row; ids are derived from the job and row, so reruns match."""
    digest = hashlib.sha256(f"{job_id}\0{row['variant']}\0{row['id']}".encode()).hexdigest()
    line: dict[str, Any] = {"id": f"batch_req_{digest[:24]}", "custom_id": row["id"], "response": None, "error": None}
    if row["error_type"] is not None and row["completion_tokens"] == 0:
        line["error"] = {"code": row["error_type"], "message": row["error"]}
        return line
    usage = {
        "prompt_tokens": row["prompt_tokens"], "completion_tokens": row["completion_tokens"],
        "total_tokens": row["total_tokens"],
        "prompt_tokens_details": {"cached_tokens": row["cached_tokens"]},
        "completion_tokens_details": {"reasoning_tokens": row["reasoning_tokens"]},
    }
    message = {"role": "assistant", "content": row["generated_text"]}
    if row.get("reasoning_text") is not None:
        message["reasoning_content"] = row["reasoning_text"]
    body = {
        "id": f"chatcmpl-{digest[24:48]}", "object": "chat.completion", "created": created,
        "model": row.get("adapter") or row["variant"],  # the model that answered, as the request named it
        "choices": [{"index": 0, "message": message, "logprobs": _choice_logprobs(row.get("logprobs")),
                     "finish_reason": row["finish_reason"]}],
        "usage": usage, "system_fingerprint": None,
    }
    line["response"] = {"status_code": 200, "request_id": f"req_{digest[48:64]}", "body": body}
    if row["error_type"] is not None:
        line["error"] = {"code": row["error_type"], "message": row["error"]}
    return line


def _choice_logprobs(tokens: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """A row's `logprobs` column as a chat completion choice's `logprobs` (tokens with their UTF-8 bytes)."""
    if tokens is None:
        return None

    def entry(token: dict[str, Any]) -> dict[str, Any]:
        return {"token": token["token"], "logprob": token["logprob"], "bytes": list(token["token"].encode())}

    return {"content": [{**entry(token), "top_logprobs": [entry(top) for top in token["top_logprobs"]]}
                        for token in tokens], "refusal": None}
