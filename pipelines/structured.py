"""Structured output, one owner: what the engine is constrained to (`to_vllm`) and whether an answer satisfies it
(`check`), for the job's `response_format` and for an OpenAI request's own."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["labels", "regex", "json_schema", "json_object"]


@dataclass(frozen=True)
class StructuredOutput:
    """An answer format: one of a set of labels, a regex match, JSON valid against a schema, or any JSON object."""

    kind: Kind
    labels: tuple[str, ...] = ()
    regex: str | None = None
    json_schema: dict[str, Any] | None = None

    @classmethod
    def from_spec(cls, spec: Any) -> StructuredOutput:
        """From the job spec's `response_format` (schemas.spec.ResponseFormatSpec)."""
        if spec.labels:
            return cls("labels", labels=tuple(spec.labels))
        if spec.json_schema is not None:
            return cls("json_schema", json_schema=spec.json_schema)
        return cls("regex", regex=spec.regex)

    @classmethod
    def from_json(cls, text: str) -> StructuredOutput:
        """From `to_json`'s text, as it travels in a row's request column."""
        fields = json.loads(text)
        return cls(fields["kind"], labels=tuple(fields.get("labels", ())), regex=fields.get("regex"),
                   json_schema=fields.get("json_schema"))

    def to_json(self) -> str:
        fields: dict[str, Any] = {"kind": self.kind}
        if self.labels:
            fields["labels"] = list(self.labels)
        if self.regex is not None:
            fields["regex"] = self.regex
        if self.json_schema is not None:
            fields["json_schema"] = self.json_schema
        return json.dumps(fields)

    def to_vllm(self) -> Any:
        """vLLM's StructuredOutputsParams for this format."""
        from vllm.sampling_params import StructuredOutputsParams

        if self.kind == "labels":
            return StructuredOutputsParams(choice=list(self.labels))
        if self.kind == "regex":
            return StructuredOutputsParams(regex=self.regex)
        if self.kind == "json_schema":
            return StructuredOutputsParams(json=self.json_schema)
        return StructuredOutputsParams(json_object=True)

    def check(self, text: str) -> tuple[str | None, str | None]:
        """(the validated value, None) or (None, why the answer does not satisfy the format)."""
        if self.kind == "labels":
            label = text.strip()
            if label in self.labels:
                return label, None
            return None, f"answer {text[:80]!r} is not one of the labels {list(self.labels)}"
        if self.kind == "regex":
            if re.fullmatch(self.regex or "", text):
                return text, None
            return None, f"answer {text[:80]!r} does not match the regex {self.regex!r}"
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            return None, (f"answer is not complete JSON ({exc.msg} at column {exc.colno}); raise max_tokens if it was "
                          "cut off")
        if self.kind == "json_object":
            return (text, None) if isinstance(value, dict) else (None, "answer is JSON but not an object")
        from jsonschema import Draft202012Validator

        problems = sorted(Draft202012Validator(self.json_schema).iter_errors(value), key=str)
        if problems:
            return None, f"answer does not satisfy the JSON schema: {problems[0].message}"
        return text, None
