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
from qwen_batch.pipelines.images import IMAGES_TYPE, ImageConfig, LoadedImage, VisionGrid, image_data_column
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
    images: ImageConfig | None = None  # how to load images; None for a model without a vision tower
    generation_suffix: str = ""
    rows_of: str | None = None  # in a job of several models, the one whose rows this stage tokenizes


class PromptStage(Stage):
    """Turns each row's prompt columns into chat messages, renders the chat template and tokenizes it."""

    requires = {
        "_prompt": "JSON object of the row's prompt columns",
        "source_file": "the row's input file, where relative image paths start",
        "_error_type": "error class of a row that already failed, else null",
        "_error": "message of a row that already failed, else null",
        "_request": "the row's own sampling overrides (OpenAI batch requests), else null",
    }
    produces = {
        "prompt_token_ids": "token ids of the chat-templated prompt, null for error rows",
        "_skip": "true for rows another model of the job answers",
        "_images": "the row's images as their encoded bytes, in prompt order; null without images",
        "_image_info": "source, format, size and bytes of each of the row's images (tokens 0); null without images",
        "_adapter": "name of the LoRA adapter that answers the row, null for the base model",
    }

    def __init__(self, config: PromptConfig):
        from transformers import AutoTokenizer

        self.config, self.rows_of = config, config.rows_of
        self.encoder = ChatEncoder(AutoTokenizer.from_pretrained(local_checkpoint(config.tokenizer)), config.chat_template_kwargs,
                                   config.generation_suffix)
        self.pieces = list(string.Formatter().parse(config.template)) if config.template is not None else []
        self.grid = VisionGrid.of_checkpoint(config.tokenizer) if config.images is not None else None

    def process(self, block: pa.Table) -> pa.Table:
        self.check(block)
        error_types = block.column("_error_type").to_pylist()
        errors = block.column("_error").to_pylist()
        source_files = block.column("source_file").to_pylist()
        encoded: dict[int, list[int]] = {}
        images: list[list[LoadedImage] | None] = [None] * block.num_rows
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
                chat, images[index] = self.images(self.messages(values), values, source_files[index])
                encoded[index] = self.encoder.encode(chat)
            except RowError as exc:
                error_types[index], errors[index] = exc.error_type, str(exc)
        token_ids: list[list[int] | None] = [None] * block.num_rows
        limit = self.config.max_model_len
        row_max_tokens = pc.fill_null(pc.struct_field(block.column("_request"), "max_tokens"),
                                      self.config.max_tokens).to_pylist()
        for index, ids in encoded.items():
            max_tokens = row_max_tokens[index]
            # Each image's one placeholder token becomes its image tokens in the engine.
            image_tokens = sum(self.grid.tokens(image) for image in images[index] or []) if self.grid else 0
            length = len(ids) - len(images[index] or []) + image_tokens
            if length + max_tokens > limit:
                error_types[index] = "prompt_too_long"
                of_images = f" ({image_tokens} of them for its images)" if image_tokens else ""
                errors[index] = (
                    f"prompt is {length} tokens{of_images}; with max_tokens {max_tokens} that is {length + max_tokens}, "
                    f"over max_model_len {limit} by {length + max_tokens - limit}. Shorten the input, lower max_tokens "
                    "or raise model.max_model_len (up to the variant's context length)."
                )
            else:
                token_ids[index] = ids
        return (
            with_errors(block, error_types, errors)
            .append_column("prompt_token_ids", pa.array(token_ids, pa.list_(pa.int32())))
            .append_column("_skip", pa.array(skip, pa.bool_()))
            .append_column("_images", image_data_column(images))
            .append_column("_image_info", pa.array([None if row is None else [image.info() for image in row]
                                                    for row in images], IMAGES_TYPE))
            .append_column("_adapter", pa.array(adapter, pa.string()))
        )

    def messages(self, values: dict[str, Any]) -> list[dict[str, str]]:
        """The chat for one row, or RowError saying which field is wrong and why."""
        if self.config.messages_column is not None:
            chat = _check_messages(self.config.messages_column, values[self.config.messages_column])
        else:
            user = "".join(literal + (_text_field(name, values[name]) if name is not None else "")
                           for literal, name, _, _ in self.pieces)
            columns = self.config.images.columns if self.config.images is not None else ()
            content = [*({"type": "image", "column": c, "where": f"column {c!r}"} for c in columns),
                       {"type": "text", "text": user}] if columns else user
            chat = [{"role": "user", "content": content}]
        if self.config.system is not None and chat[0]["role"] != "system":
            chat = [{"role": "system", "content": self.config.system}, *chat]
        return chat

    def images(self, chat: list[dict[str, Any]], values: dict[str, Any],
               source_file: str | None) -> tuple[list[dict[str, Any]], list[LoadedImage] | None]:
        """The chat as the chat template takes it (each image part a bare `{type: image}`) and the row's images,
        fetched and checked (None when it has none); RowError for the first bad one."""
        parts = [part for message in chat if isinstance(message["content"], list)
                 for part in message["content"] if part["type"] == "image"]
        if not parts:
            return chat, None
        config = self.config.images
        if config is None:
            raise RowError("invalid_request", f"{parts[0]['where']} is an image, but the model has no vision tower; "
                           "use a Qwen2.5-VL variant, or remove the image parts to answer from the text")
        if len(parts) > config.limits.max_per_row:
            raise RowError("invalid_request", f"the row has {len(parts)} images, over images.max_per_row "
                           f"({config.limits.max_per_row}); split the row or raise the limit")
        loaded = [config.load(values[part["column"]] if "column" in part else part["url"], part["where"], source_file)
                  for part in parts]
        bare = [{**message, "content": [{"type": "image"} if part["type"] == "image" else part
                                        for part in message["content"]]}
                if isinstance(message["content"], list) else message for message in chat]
        return bare, loaded


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

    def encode(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of a chat whose contents are strings or lists of parts (text parts, and `{type: image}` parts
        the template turns into the image's vision tokens)."""
        texts: list[str] = []

        def marked(text: str) -> str:
            texts.append(text)
            return f"\ue000{self.nonce}:{len(texts) - 1}\ue001"

        marked_chat = [{**message, "content": marked(message["content"]) if isinstance(message["content"], str) else
                        [{**part, "text": marked(part["text"])} if part["type"] == "text" else part
                         for part in message["content"]]} for message in messages]
        rendered = self.tokenizer.apply_chat_template(marked_chat, tokenize=False, add_generation_prompt=True,
                                                      **self.chat_template_kwargs) + self.generation_suffix
        ids: list[int] = []
        position = 0
        for match in self.marker.finditer(rendered):
            ids += self.markup(rendered[position:match.start()])
            ids += self.text(texts[int(match[1])])
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
        checked.append({"role": role, "content": _content(where, message.get("content"))})
    if checked[-1]["role"] != "user":
        raise RowError("invalid_messages", f"column {column!r}: the last message must be from the user, found "
                       f"{chat[-1]['role']!r}")
    if not any(_says_something(m["content"]) for m in checked if m["role"] == "user"):
        raise RowError("empty_prompt", f"column {column!r}: every user message is empty or whitespace only")
    return checked


TEXT_PART_SEPARATOR = "\n"  # how vLLM's OpenAI server joins a message's text parts for a text-only model


def _content(where: str, content: Any) -> str | list[dict[str, str]]:
    """A message's content: a string, or from OpenAI's list of content parts the text parts joined, or, when it has
    image parts, the list of its text and image parts in order (as the Qwen2.5-VL template takes them)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise RowError("invalid_messages", f"{where} content must be a string or a non-empty list of content parts, "
                       f"found {_kind(content)}")
    texts, parts = [], []
    for index, part in enumerate(content):
        place = f"{where} content part {index}"
        # Parquet structs carry every part field, null where a part has none.
        part = {key: value for key, value in part.items() if value is not None} if isinstance(part, dict) else part
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
            parts.append({"type": "text", "text": part["text"]})
        elif kind in IMAGE_PART_TYPES:
            parts.append(_image_part(place, part))
        else:
            raise RowError("invalid_messages", f"{place} must be a text part {{type: text, text: <string>}}, found "
                           f"{sorted(part) if isinstance(part, dict) else _kind(part)}"
                           f"{f' of type {kind!r}' if isinstance(kind, str) else ''}")
    return parts if len(parts) > len(texts) else TEXT_PART_SEPARATOR.join(texts)


def _says_something(content: str | list[dict[str, str]]) -> bool:
    """Whether a message's content has an image or some non-blank text."""
    if isinstance(content, str):
        return bool(content.strip())
    return any(part["type"] == "image" or part["text"].strip() for part in content)


IMAGE_PART_TYPES = ("image_url", "input_image")


def _image_part(place: str, part: dict[str, Any]) -> dict[str, str]:
    """An image content part as `{type: image, url, where}`: OpenAI chat's `{type: image_url, image_url: {url}}` or
    the Responses API's `{type: input_image, image_url: <url>}`; the URL is loaded by PromptStage.images."""
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url.strip():
        raise RowError("invalid_messages", f"{place} is an {part['type']!r} part without an image URL; give "
                       "{type: image_url, image_url: {url: <https://, s3:// or data: URL>}}")
    return {"type": "image", "url": url, "where": place}


def _kind(value: Any) -> str:
    """A value's type as the input file would say it."""
    if isinstance(value, dict) and set(value) == {"$missing"}:
        return "no such column in this row"
    if isinstance(value, dict) and set(value) == {"$type"}:
        return value["$type"]
    if isinstance(value, dict) and set(value) == {"$bytes"}:
        return "bytes"
    return "null" if value is None else type(value).__name__
