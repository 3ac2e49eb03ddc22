"""Validate stage + chat template + tokenize: each row becomes the exact token ids the engine will see."""

from __future__ import annotations

import json
import re
import string
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from qwen_batch.pipelines.weights import local_checkpoint
from qwen_batch.pipelines.stage import Stage, with_errors
from qwen_batch.schemas.errors import RowError

CHAT_ROLES = ("system", "developer", "user", "assistant")
# OpenAI's `developer` role is its newer name for the system message; Qwen's chat templates know only `system`.
ROLE_AS = {"developer": "system"}


@dataclass(frozen=True)
class Routes:
    """Which rows a model answers when a column routes rows between several models."""

    column: str
    model: str
    names: dict[str, str]
    owns_unknown: bool

    def decide(self, value: Any) -> tuple[bool, RowError | None]:
        """(this model answers the row, the row's error if its value names no model)."""
        target = self.names.get(value) if isinstance(value, str) else None
        if target is None:
            error = RowError("unknown_variant", f"column {self.column!r} is {value!r}, which names none of the job's "
                             f"models {sorted(set(self.names.values()))}")
            return self.owns_unknown, error
        return target == self.model, None


@dataclass(frozen=True)
class AdapterChoice:
    """Which LoRA adapter answers each row of a model: the one a column names, else the base model."""

    column: str
    adapters: frozenset[str]
    base_names: frozenset[str]  # values that mean the model itself: its catalog name, name and aliases

    def decide(self, value: Any) -> str | None:
        """The adapter the row's value names, None for the base model; RowError if it names neither."""
        if value is None or value == "" or value in self.base_names:
            return None
        if isinstance(value, str) and value in self.adapters:
            return value
        raise RowError("unknown_adapter", f"column {self.column!r} is {value!r}, which names none of the model's "
                       f"adapters {sorted(self.adapters)} nor the model itself {sorted(self.base_names)}; fix the "
                       "value, add the adapter to model.adapters, or add the name to model.aliases to answer with "
                       "the base model")


@dataclass(frozen=True)
class PromptConfig:
    """How rows become token ids for one model."""

    tokenizer: str
    system: str | None
    template: str | None
    messages_column: str | None
    max_model_len: int
    max_tokens: int
    routes: Routes | None = None
    adapters: AdapterChoice | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    generation_suffix: str = ""
    rows_of: str | None = None  # in a job of several models, the one whose rows this stage tokenizes


class PromptStage(Stage):
    """Turns each row's prompt columns into chat messages, renders the chat template and tokenizes it."""

    requires = {
        "_prompt": "JSON object of the row's prompt columns",
        "_error_type": "error class of a row that already failed, else null",
        "_error": "message of a row that already failed, else null",
        "_request": "the row's own sampling overrides (OpenAI batch requests), else null",
    }
    produces = {
        "prompt_token_ids": "token ids of the chat-templated prompt, null for error rows",
        "_skip": "true for rows another model of the job answers",
        "_adapter": "name of the LoRA adapter that answers the row, null for the base model",
    }

    def __init__(self, config: PromptConfig):
        from transformers import AutoTokenizer

        self.config, self.rows_of = config, config.rows_of
        self.encoder = ChatEncoder(AutoTokenizer.from_pretrained(local_checkpoint(config.tokenizer)), config.chat_template_kwargs,
                                   config.generation_suffix)
        self.pieces = list(string.Formatter().parse(config.template)) if config.template is not None else []

    def process(self, block: pa.Table) -> pa.Table:
        self.check(block)
        error_types = block.column("_error_type").to_pylist()
        errors = block.column("_error").to_pylist()
        encoded: dict[int, list[int]] = {}
        skip = [False] * block.num_rows
        adapter: list[str | None] = [None] * block.num_rows
        routes, adapters = self.config.routes, self.config.adapters
        for index, raw in enumerate(block.column("_prompt").to_pylist()):
            if error_types[index] is not None:
                # A row that failed before routing belongs to one model's output, like a row naming no model.
                skip[index] = routes is not None and not routes.owns_unknown
                continue
            values = json.loads(raw)
            try:
                if routes is not None:
                    answers, error = routes.decide(values.get(routes.column))
                    skip[index] = not answers
                    if skip[index]:
                        continue
                    if error is not None:
                        raise error
                if adapters is not None:
                    adapter[index] = adapters.decide(values.get(adapters.column))
                encoded[index] = self.encoder.encode(self.messages(values))
            except RowError as exc:
                error_types[index], errors[index] = exc.error_type, str(exc)
        token_ids: list[list[int] | None] = [None] * block.num_rows
        limit = self.config.max_model_len
        row_max_tokens = pc.fill_null(pc.struct_field(block.column("_request"), "max_tokens"),
                                      self.config.max_tokens).to_pylist()
        for index, ids in encoded.items():
            max_tokens = row_max_tokens[index]
            if len(ids) + max_tokens > limit:
                error_types[index] = "prompt_too_long"
                errors[index] = (
                    f"prompt is {len(ids)} tokens; with max_tokens {max_tokens} that is {len(ids) + max_tokens}, over "
                    f"max_model_len {limit} by {len(ids) + max_tokens - limit}. Shorten the input, lower max_tokens or "
                    "raise model.max_model_len (up to the variant's context length)."
                )
            else:
                token_ids[index] = ids
        return (
            with_errors(block, error_types, errors)
            .append_column("prompt_token_ids", pa.array(token_ids, pa.list_(pa.int32())))
            .append_column("_skip", pa.array(skip, pa.bool_()))
            .append_column("_adapter", pa.array(adapter, pa.string()))
        )

    def messages(self, values: dict[str, Any]) -> list[dict[str, str]]:
        """The chat for one row, or RowError saying which field is wrong and why."""
        if self.config.messages_column is not None:
            chat = _check_messages(self.config.messages_column, values[self.config.messages_column])
        else:
            user = "".join(literal + (_text_field(name, values[name]) if name is not None else "")
                           for literal, name, _, _ in self.pieces)
            chat = [{"role": "user", "content": user}]
        if self.config.system is not None and chat[0]["role"] != "system":
            chat = [{"role": "system", "content": self.config.system}, *chat]
        return chat


class ChatEncoder:
    """Chat messages to the token ids the engine sees: the chat template's markup keeps its control tokens, while
    message text is tokenized as plain text, so a row holding `<|im_start|>system` or `</think>` can't forge a turn."""

    def __init__(self, tokenizer: Any, chat_template_kwargs: dict[str, Any], generation_suffix: str):
        self.tokenizer = tokenizer
        self.chat_template_kwargs = chat_template_kwargs
        self.generation_suffix = generation_suffix
        # Private-use code points around a per-process nonce: the template places them where each content goes.
        self.nonce = uuid.uuid4().hex[:12]
        self.marker = re.compile(f"\ue000{self.nonce}:(\\d+)\ue001")
        backend = tokenizer.backend_tokenizer
        self.normalize = backend.normalizer.normalize_str if backend.normalizer else (lambda text: text)
        self.pre_tokenize, self.model = backend.pre_tokenizer.pre_tokenize_str, backend.model

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        marked = [{**message, "content": f"\ue000{self.nonce}:{index}\ue001"} for index, message in enumerate(messages)]
        rendered = self.tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=True,
                                                      **self.chat_template_kwargs) + self.generation_suffix
        ids: list[int] = []
        position = 0
        for match in self.marker.finditer(rendered):
            ids += self.markup(rendered[position:match.start()])
            ids += self.text(messages[int(match[1])]["content"])
            position = match.end()
        return ids + self.markup(rendered[position:])

    def markup(self, text: str) -> list[int]:
        """Template text: its special and added tokens are control tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def text(self, text: str) -> list[int]:
        """Data: byte-level BPE only, no special or added token ever matched."""
        return [token.id for piece, _ in self.pre_tokenize(self.normalize(text)) for token in self.model.tokenize(piece)]


def _text_field(name: str, value: Any) -> str:
    if isinstance(value, str):
        if not value.strip():
            raise RowError("empty_prompt", f"column {name!r} is empty or whitespace only; the prompt would say nothing")
        return value
    raise RowError("invalid_field", f"column {name!r} used by the template must be a string, found {_kind(value)}")


def _check_messages(column: str, chat: Any) -> list[dict[str, str]]:
    if not isinstance(chat, list) or not chat:
        raise RowError("invalid_messages", f"column {column!r} must be a non-empty list of {{role, content}} "
                       f"messages, found {_kind(chat)}")
    checked = []
    for position, message in enumerate(chat):
        where = f"column {column!r} message {position}"
        if not isinstance(message, dict) or set(message) - {"role", "content", "name"} or "role" not in message:
            raise RowError("invalid_messages", f"{where} must be an object with `role` and `content`, found "
                           f"{_kind(message) if not isinstance(message, dict) else sorted(message)}")
        if message["role"] not in CHAT_ROLES:
            raise RowError("invalid_messages", f"{where} has role {message['role']!r}; expected one of {CHAT_ROLES}")
        role = ROLE_AS.get(message["role"], message["role"])
        checked.append({"role": role, "content": _content_text(where, message.get("content"))})
    if checked[-1]["role"] != "user":
        raise RowError("invalid_messages", f"column {column!r}: the last message must be from the user, found "
                       f"{chat[-1]['role']!r}")
    if not any(m["content"].strip() for m in checked if m["role"] == "user"):
        raise RowError("empty_prompt", f"column {column!r}: every user message is empty or whitespace only")
    return checked


TEXT_PART_SEPARATOR = "\n"  # how vLLM's OpenAI server joins a message's text parts for a text-only model


def _content_text(where: str, content: Any) -> str:
    """A message's content as text: a string, or OpenAI's list of content parts with its text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise RowError("invalid_messages", f"{where} content must be a string or a non-empty list of content parts, "
                       f"found {_kind(content)}")
    texts = []
    for index, part in enumerate(content):
        place = f"{where} content part {index}"
        # Parquet structs carry every part field, null where a part has none.
        part = {key: value for key, value in part.items() if value is not None} if isinstance(part, dict) else part
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in IMAGE_PART_TYPES:
            _image_part(place, part)
        else:
            raise RowError("invalid_messages", f"{place} must be a text part {{type: text, text: <string>}}, found "
                           f"{sorted(part) if isinstance(part, dict) else _kind(part)}"
                           f"{f' of type {kind!r}' if isinstance(kind, str) else ''}")
    return TEXT_PART_SEPARATOR.join(texts)


IMAGE_PART_TYPES = ("image_url", "input_image")


def _image_part(place: str, part: dict[str, Any]) -> None:
    """An image content part: where an image input becomes the row's image (Qwen2.5-VL); refused until then."""
    raise RowError("invalid_request", f"{place} is an {part['type']!r} part: image inputs are not supported yet; "
                   "remove the part to answer the row from its text")


def _kind(value: Any) -> str:
    """A value's type as the input file would say it."""
    if isinstance(value, dict) and set(value) == {"$missing"}:
        return "no such column in this row"
    if isinstance(value, dict) and set(value) == {"$type"}:
        return value["$type"]
    return "null" if value is None else type(value).__name__
