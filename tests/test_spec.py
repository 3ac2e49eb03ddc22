"""Tests for schemas.spec: loading a job spec and the SpecError every problem gives."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from qwen_batch.schemas.errors import SpecError
from qwen_batch.schemas.spec import JobSpec, load_spec, template_columns

SPEC: dict[str, Any] = {
    "name": "reviews-2024.v1",
    "input": {"path": "s3://bucket/reviews/", "format": "jsonl", "carry_columns": ["stars"]},
    "prompt": {"system": "You are terse.", "template": "Summarise: {review}"},
    "model": {"variant": "qwen2.5-7b-instruct"},
    "sampling": {"max_tokens": 64, "temperature": 0.0},
    "output": {"path": "s3://bucket/out/"},
}

SPEC_YAML = """\
name: reviews-2024.v1
input:
  path: s3://bucket/reviews/
  format: jsonl
  carry_columns: [stars]
prompt:
  system: You are terse.
  template: "Summarise: {review}"
model:
  variant: qwen2.5-7b-instruct
sampling:
  max_tokens: 64
  temperature: 0.0
output:
  path: s3://bucket/out/
"""


def changed(**sections: dict[str, Any]) -> dict[str, Any]:
    """SPEC with the given sections' fields updated (a value of None removes the field)."""
    spec = copy.deepcopy(SPEC)
    for section, fields in sections.items():
        if not isinstance(fields, dict):
            spec[section] = fields
            continue
        target = spec.setdefault(section, {})
        for name, value in fields.items():
            if value is None:
                target.pop(name, None)
            else:
                target[name] = value
    return spec


def spec_error(raw: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as caught:
        load_spec(raw)
    return str(caught.value)


def test_load_spec_from_dict_yaml_and_json_agree(tmp_path: Path) -> None:
    yaml_file = tmp_path / "job.yaml"
    yaml_file.write_text(SPEC_YAML)
    json_file = tmp_path / "job.json"
    json_file.write_text(json.dumps(SPEC))

    from_dict, from_yaml, from_json = load_spec(SPEC), load_spec(yaml_file), load_spec(str(json_file))

    assert from_dict == from_yaml == from_json
    assert from_yaml.input.format == "jsonl"
    assert from_yaml.input.carry_columns == ["stars"]
    assert from_yaml.prompt.columns == ["review"]
    assert from_yaml.sampling.max_tokens == 64
    assert from_yaml.resources.replicas == "auto"


def test_load_spec_fills_defaults() -> None:
    spec = load_spec(SPEC)

    assert spec.input.rows_per_shard == 512
    assert spec.input.on_bad_file == "fail"
    assert spec.input.id_column is None
    assert spec.sampling.top_p is None
    assert spec.sampling.seed == 0
    assert spec.model.catalog_name == "qwen2.5-7b-instruct"


def test_invalid_yaml_names_the_file_and_the_position(tmp_path: Path) -> None:
    bad = tmp_path / "job.yaml"
    bad.write_text("name: x\ninput: [unclosed\n")

    with pytest.raises(SpecError) as caught:
        load_spec(bad)

    message = str(caught.value)
    assert str(bad) in message
    assert "not valid YAML or JSON" in message
    assert "line" in message


def test_spec_file_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    listing = tmp_path / "job.yaml"
    listing.write_text("- a\n- b\n")

    with pytest.raises(SpecError, match=r"must hold a mapping of spec fields, found list") as caught:
        load_spec(listing)
    assert str(listing) in str(caught.value)


def test_missing_spec_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"

    with pytest.raises(SpecError, match="cannot read the spec file") as caught:
        load_spec(missing)
    assert str(missing) in str(caught.value)


def test_unknown_field_names_its_path() -> None:
    message = spec_error(changed(input={"formt": "jsonl"}))

    assert message.startswith("input.formt: unknown field")
    assert "check its spelling" in message


def test_unknown_top_level_field_names_it() -> None:
    assert spec_error(changed(outptu={"path": "x"})).startswith("outptu: unknown field")


def test_missing_required_field_names_its_path() -> None:
    assert spec_error(changed(input={"path": None})) == "input.path: required field is missing"


def test_missing_required_section_names_it() -> None:
    raw = copy.deepcopy(SPEC)
    del raw["output"]

    assert spec_error(raw) == "output: required field is missing"


def test_unknown_format_names_the_value_and_the_choices() -> None:
    message = spec_error(changed(input={"format": "xml"}))

    assert message.startswith("input.format: found 'xml'")
    for choice in ("parquet", "jsonl", "csv"):
        assert choice in message


@pytest.mark.parametrize("max_tokens", [0, -5])
def test_non_positive_max_tokens_is_refused(max_tokens: int) -> None:
    message = spec_error(changed(sampling={"max_tokens": max_tokens}))

    assert message.startswith(f"sampling.max_tokens: found {max_tokens}")
    assert "greater than 0" in message


def test_negative_temperature_is_refused() -> None:
    message = spec_error(changed(sampling={"temperature": -0.5}))

    assert message.startswith("sampling.temperature: found -0.5")
    assert "greater than or equal to 0" in message


@pytest.mark.parametrize(("top_p", "expected"), [(0, "greater than 0"), (1.5, "less than or equal to 1")])
def test_top_p_outside_zero_to_one_is_refused(top_p: float, expected: str) -> None:
    message = spec_error(changed(sampling={"top_p": top_p}))

    assert message.startswith(f"sampling.top_p: found {top_p}")
    assert expected in message


def test_top_p_of_one_is_accepted() -> None:
    assert load_spec(changed(sampling={"top_p": 1})).sampling.top_p == 1


def test_top_k_zero_is_refused() -> None:
    message = spec_error(changed(sampling={"top_k": 0}))

    assert message.startswith("sampling.top_k: found 0")
    assert "-1 (keep all) or at least 1" in message


@pytest.mark.parametrize("top_k", [-1, 1, 40])
def test_top_k_minus_one_or_positive_is_accepted(top_k: int) -> None:
    assert load_spec(changed(sampling={"top_k": top_k})).sampling.top_k == top_k


def test_both_template_and_messages_column_is_refused() -> None:
    message = spec_error(changed(prompt={"messages_column": "chat"}))

    assert message.startswith("prompt: found an object with fields")
    assert "'messages_column'" in message and "'template'" in message
    assert "give exactly one of `template`" in message


def test_neither_template_nor_messages_column_is_refused() -> None:
    message = spec_error(changed(prompt={"template": None, "system": None}))

    assert message.startswith("prompt: found an object with fields []")
    assert "give exactly one of `template`" in message


def test_messages_column_alone_is_accepted() -> None:
    spec = load_spec(changed(prompt={"template": None, "messages_column": "chat"}))

    assert spec.prompt.columns == ["chat"]


@pytest.mark.parametrize(
    ("template", "complaint"),
    [
        ("Say {a.b}", "is not a plain column name"),
        ("Say {0}", "is not a plain column name"),
        ("Say {}", "is not a plain column name"),
        ("Say {a[0]}", "is not a plain column name"),
        ("Say {x!r}", "has a format spec or conversion"),
        ("Say {x:>10}", "has a format spec or conversion"),
    ],
)
def test_template_placeholder_that_is_not_a_plain_column_is_refused(template: str, complaint: str) -> None:
    message = spec_error(changed(prompt={"template": template}))

    placeholder = template.removeprefix("Say ")
    assert message.startswith(f"prompt.template: found {template!r}")
    assert f"template placeholder {placeholder} {complaint}" in message
    assert "{column}" in message


def test_template_with_an_unbalanced_brace_explains_literal_braces() -> None:
    message = spec_error(changed(prompt={"template": "Say {x"}))

    assert message.startswith("prompt.template: found 'Say {x'")
    assert "write literal braces as {{ and }}" in message


@pytest.mark.parametrize("name", ["", "has space", "-leading-dash", "slash/name", "x" * 129])
def test_bad_job_name_is_refused(name: str) -> None:
    message = spec_error(changed(name=name))

    assert message.startswith(f"name: found {name!r}")
    assert "should match pattern" in message


def test_every_problem_is_reported_in_one_error() -> None:
    with pytest.raises(SpecError) as caught:
        load_spec(changed(name="bad name", sampling={"max_tokens": 0, "top_k": 0}))

    problems = caught.value.problems
    assert len(problems) == 3
    assert [p.split(":")[0] for p in problems] == ["name", "sampling.max_tokens", "sampling.top_k"]
    assert str(caught.value).splitlines() == [f"- {p}" for p in problems]


def test_template_columns_are_named_in_order_of_first_use() -> None:
    assert template_columns("{b} and {a}, then {b} again; {{literal}} {c}") == ["b", "a", "c"]
    assert template_columns("no placeholders") == []


def hash_of(raw: dict[str, Any]) -> str:
    return JobSpec.model_validate(raw).output_hash()


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": {"template": "Summarise briefly: {review}"}},
        {"prompt": {"system": "You are verbose."}},
        {"model": {"variant": "qwen2.5-3b-instruct"}},
        {"model": {"max_model_len": 2048}},
        {"sampling": {"max_tokens": 65}},
        {"sampling": {"temperature": 0.7}},
        {"sampling": {"seed": 1}},
        {"input": {"path": "s3://bucket/reviews-v2/"}},
        {"input": {"rows_per_shard": 100}},
        {"prices": {"output_per_mtok": 1.0}},
    ],
)
def test_output_hash_changes_with_what_decides_the_rows(change: dict[str, Any]) -> None:
    assert hash_of(changed(**change)) != hash_of(SPEC)


@pytest.mark.parametrize(
    "change",
    [
        {"resources": {"replicas": 4, "tensor_parallel_size": 2}},
        {"engine": {"enforce_eager": True, "max_num_seqs": 8, "env": {"X": "1"}}},
        {"prices": {"accelerator_hour": 9.0}},
        {"input": {"on_bad_file": "skip", "storage_options": {"anon": True}}},
        {"output": {"path": "s3://elsewhere/"}},
    ],
)
def test_output_hash_ignores_how_and_where_the_job_runs(change: dict[str, Any]) -> None:
    assert hash_of(changed(**change)) == hash_of(SPEC)


def test_output_hash_is_stable_across_loads(tmp_path: Path) -> None:
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(SPEC_YAML)

    assert load_spec(spec_file).output_hash() == load_spec(SPEC).output_hash()
    assert len(load_spec(SPEC).output_hash()) == 16


@pytest.mark.parametrize(
    ("sampling", "expected"),
    [
        ({"temperature": 2.5}, "sampling.temperature: found 2.5; Input should be less than or equal to 2"),
        ({"temperature": float("inf")}, "sampling.temperature: found inf; Input should be a finite number"),
        ({"top_p": float("nan")}, "sampling.top_p: found nan; Input should be a finite number"),
        ({"repetition_penalty": float("inf")}, "sampling.repetition_penalty: found inf; Input should be a finite number"),
        ({"seed": 2**64}, "sampling.seed: found 18446744073709551616; Input should be less than 9223372036854775808"),
        ({"stop": ["END", ""]}, "sampling.stop.1: found ''; String should have at least 1 character"),
    ],
)
def test_sampling_outside_vllms_own_ranges_is_refused(sampling: dict[str, Any], expected: str) -> None:
    assert spec_error(changed(sampling=sampling)) == expected


def test_pipeline_columns_cover_every_column_a_stage_adds_or_reads() -> None:
    """A carried column may not take the name of a column the stages use: the reserved set must name them all."""
    from qwen_batch.pipelines.engine import EngineStage
    from qwen_batch.pipelines.prompts import PromptStage
    from qwen_batch.pipelines.read import BLOCK_SCHEMA
    from qwen_batch.pipelines.write import WriteStage
    from qwen_batch.schemas.spec import PIPELINE_COLUMNS

    used = {*BLOCK_SCHEMA.names, *PromptStage.requires, *PromptStage.produces, *EngineStage.requires,
            *EngineStage.produces, *WriteStage.requires}
    assert {name for name in used if not name.startswith("_")} <= PIPELINE_COLUMNS


def test_logical_date_is_part_of_the_job_identity_only_where_placeholders_are() -> None:
    from datetime import datetime

    dated = changed(output={"path": "s3://b/out/{ds}"})
    hashes = {day: load_spec(dated, datetime(2026, 11, day)).output_hash() for day in (27, 28)}
    assert hashes[27] != hashes[28] == load_spec(dated, datetime(2026, 11, 28)).output_hash()
    assert load_spec(changed()).output_hash() == load_spec(changed(), datetime(2026, 11, 27)).output_hash()


def test_the_readme_spec_reference_names_every_field() -> None:
    """Every field a user can set has a row in README.md's spec reference (names only: descriptions may be shorter)."""
    from pydantic import BaseModel

    from qwen_batch.schemas.spec import JobSpec

    def paths(model: type[BaseModel], prefix: str = "") -> list[str]:
        found = []
        for name, field in model.model_fields.items():
            nested = [t for t in getattr(field.annotation, "__args__", (field.annotation,))
                      if isinstance(t, type) and issubclass(t, BaseModel)]
            if nested and name not in ("models", "replicas"):
                found += paths(nested[0], f"{prefix}{name}.")
            else:
                found.append(prefix + (field.alias or name))
        return found

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [path for path in paths(JobSpec) if f"| `{path}` |" not in readme]
    assert not missing, f"README.md's spec reference lacks {missing}"
