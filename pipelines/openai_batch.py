"""OpenAI Batch API files: request lines in, response lines out, so a batch file moves over unchanged.

Request line: {"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {"model", "messages", ...}}.
Response line: {"id", "custom_id", "response": {"status_code", "request_id", "body": <chat.completion>}, "error"}.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from qwen_batch.pipelines.structured import StructuredOutput
from qwen_batch.schemas.errors import RowError

CHAT_COMPLETIONS = "/v1/chat/completions"
# Body fields with a meaning here; anything else a model server would act on is refused rather than ignored.
SAMPLING_FIELDS = ("temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty")
IGNORED_FIELDS = ("model", "messages", "user", "metadata", "store", "logprobs", "service_tier", "n",
                  "max_tokens", "max_completion_tokens", "response_format", "stream")


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
    if body.get("n", 1) != 1 or body.get("logprobs") or body.get("stream"):
        raise RowError("invalid_request", "n > 1, logprobs and stream are not supported in batch jobs")
    overrides: dict[str, Any] = {name: body[name] for name in SAMPLING_FIELDS if body.get(name) is not None}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise RowError("invalid_request", f"max_tokens must be a positive integer, found {max_tokens!r}")
        overrides["max_tokens"] = max_tokens
    response_format = _response_format(body.get("response_format"))
    if response_format is not None:
        overrides["response_format"] = response_format
    columns = {"custom_id": line.get("custom_id"), "model": body.get("model"), "messages": body.get("messages")}
    return columns, overrides


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
        "id": f"chatcmpl-{digest[24:48]}", "object": "chat.completion", "created": created, "model": row["variant"],
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": row["finish_reason"]}],
        "usage": usage, "system_fingerprint": None,
    }
    line["response"] = {"status_code": 200, "request_id": f"req_{digest[48:64]}", "body": body}
    if row["error_type"] is not None:
        line["error"] = {"code": row["error_type"], "message": row["error"]}
    return line
