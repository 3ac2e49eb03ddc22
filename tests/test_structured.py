"""Tests for pipelines.structured: one format object constrains the engine and checks its answers."""

from __future__ import annotations

import pytest

from qwen_batch.pipelines.structured import StructuredOutput
from qwen_batch.schemas.spec import ResponseFormatSpec

SCHEMA = {"type": "object", "properties": {"mood": {"enum": ["happy", "sad"]}}, "required": ["mood"]}


@pytest.mark.parametrize("fmt,text,parsed,problem", [
    (StructuredOutput("labels", labels=("yes", "no")), " yes\n", "yes", None),
    (StructuredOutput("labels", labels=("yes", "no")), "maybe", None, "is not one of the labels ['yes', 'no']"),
    (StructuredOutput("regex", regex=r"\d{3}"), "123", "123", None),
    (StructuredOutput("regex", regex=r"\d{3}"), "1234", None, "does not match the regex"),
    (StructuredOutput("json_schema", json_schema=SCHEMA), '{"mood": "sad"}', '{"mood": "sad"}', None),
    (StructuredOutput("json_schema", json_schema=SCHEMA), '{"mood": "meh"}', None, "does not satisfy the JSON schema"),
    (StructuredOutput("json_schema", json_schema=SCHEMA), '{"mood": "sa', None, "raise max_tokens if it was cut off"),
    (StructuredOutput("json_object"), '{"a": 1}', '{"a": 1}', None),
    (StructuredOutput("json_object"), "[1]", None, "JSON but not an object"),
])
def test_check_accepts_what_satisfies_the_format_and_says_why_not_otherwise(fmt, text, parsed, problem):
    value, why = fmt.check(text)
    assert value == parsed
    assert (why is None) if problem is None else (problem in why)


@pytest.mark.parametrize("spec,expected", [
    ({"labels": ["a", "b"]}, StructuredOutput("labels", labels=("a", "b"))),
    ({"regex": "x+"}, StructuredOutput("regex", regex="x+")),
    ({"json_schema": SCHEMA}, StructuredOutput("json_schema", json_schema=SCHEMA)),
])
def test_the_spec_and_the_row_column_carry_the_same_format(spec, expected):
    fmt = StructuredOutput.from_spec(ResponseFormatSpec(**spec))
    assert fmt == expected
    assert StructuredOutput.from_json(fmt.to_json()) == fmt


def test_to_vllm_gives_vllms_structured_outputs_params():
    assert StructuredOutput("labels", labels=("a", "b")).to_vllm().choice == ["a", "b"]
    assert StructuredOutput("regex", regex="x+").to_vllm().regex == "x+"
    assert StructuredOutput("json_schema", json_schema=SCHEMA).to_vllm().json == SCHEMA
    assert StructuredOutput("json_object").to_vllm().json_object is True
