"""Tests for pipelines.stage: a wiring mistake fails naming the stage and the columns, before any engine starts."""

from __future__ import annotations

import re

import pyarrow as pa
import pytest

from qwen_batch.pipelines.engine import EngineStage
from qwen_batch.pipelines.prompts import PromptStage
from qwen_batch.pipelines.read import BLOCK_SCHEMA
from qwen_batch.pipelines.stage import Stage, check_wiring
from qwen_batch.pipelines.write import WriteStage

SOURCE = [*BLOCK_SCHEMA.names, "stars"]


def test_the_pipeline_wiring_passes_from_the_block_schema_and_needs_each_column_it_reads() -> None:
    stages = [PromptStage, EngineStage, WriteStage]
    check_wiring(SOURCE, stages)
    read = sorted({name for stage in stages for name in stage.requires} & set(BLOCK_SCHEMA.names))
    assert read, "no stage reads a column of the block schema"
    for column in read:  # each column a stage reads from the source is checked for
        with pytest.raises(KeyError, match=re.escape(f"{column!r}")):
            check_wiring([name for name in SOURCE if name != column], stages)


def test_wiring_without_the_prompt_stage_names_the_engine_stage_and_its_missing_column() -> None:
    with pytest.raises(KeyError) as caught:
        check_wiring(SOURCE, [EngineStage, WriteStage])

    message = caught.value.args[0]
    missing = sorted(set(EngineStage.requires) - set(SOURCE))
    assert "prompt_token_ids" in missing
    assert message.startswith(f"Required input columns {missing} not found at the input of EngineStage")
    assert f"prompt_token_ids: {EngineStage.requires['prompt_token_ids']}" in message
    assert f"Input columns: {sorted(SOURCE)}" in message


def test_wiring_without_the_engine_stage_names_every_column_the_write_stage_misses() -> None:
    with pytest.raises(KeyError) as caught:
        check_wiring(SOURCE, [PromptStage, WriteStage])

    message = caught.value.args[0]
    missing = sorted(set(WriteStage.requires) - set(SOURCE) - set(PromptStage.produces))
    assert missing == sorted(set(EngineStage.produces))
    assert message.startswith(f"Required input columns {missing} not found at the input of WriteStage")
    assert "prompt_token_ids" in message.split("Input columns: ")[1]


def test_wiring_in_the_wrong_order_fails_at_the_first_stage_short_of_columns() -> None:
    with pytest.raises(KeyError, match="not found at the input of EngineStage"):
        check_wiring(SOURCE, [EngineStage, PromptStage, WriteStage])


def test_wiring_from_a_source_without_the_read_columns_names_them() -> None:
    with pytest.raises(KeyError, match=r"\['_error', '_error_type', '_request'\] not found at the input of PromptStage"):
        check_wiring(["_shard", "id", "source_file", "source_row", "_prompt"], [PromptStage, EngineStage, WriteStage])


class Upper(Stage):
    requires = {"text": "text to upper-case"}
    produces = {"upper": "the text in capitals"}

    def __call__(self, block: pa.Table) -> pa.Table:
        self.check(block)
        return block.append_column("upper", pa.array([t.upper() for t in block.column("text").to_pylist()]))


def test_stage_check_names_the_stage_and_the_columns_it_has() -> None:
    with pytest.raises(KeyError) as caught:
        Upper()(pa.table({"other": ["x"]}))

    assert caught.value.args[0] == (
        "Required input columns ['text'] not found at the input of Upper. Input columns: ['other']"
    )


def test_stage_check_passes_when_the_columns_are_there() -> None:
    assert Upper()(pa.table({"text": ["x"]})).column("upper").to_pylist() == ["X"]
    check_wiring(["text"], [Upper])


class Tagged(Stage):
    """Upper-cases its own model's rows, as a model's prompt or engine stage works on its rows only."""

    requires = {"text": "text to upper-case"}
    produces = {"upper": "the text in capitals", "length": "characters"}

    def __init__(self, model: str):
        self.rows_of = model
        self.seen: list[list[str]] = []

    def process(self, block: pa.Table) -> pa.Table:
        self.seen.append(block.column("text").to_pylist())
        texts = block.column("text").to_pylist()
        return (block.append_column("upper", pa.array([t.upper() for t in texts]))
                .append_column("length", pa.array([len(t) for t in texts], pa.int64())))


def test_a_model_stage_works_on_its_own_rows_and_passes_the_others_on() -> None:
    block = pa.table({"text": ["a", "bb", "ccc", "dd"], "_model": ["m1", "m2", "m1", "m2"]})
    first, second = Tagged("m1"), Tagged("m2")

    after_first = first(block)
    done = second(after_first)

    assert first.seen == [["a", "ccc"]] and second.seen == [["bb", "dd"]]
    assert after_first.filter(pa.compute.equal(after_first["_model"], "m2"))["upper"].null_count == 2
    rows = sorted(done.to_pylist(), key=lambda r: r["text"])
    assert [(r["text"], r["_model"], r["upper"], r["length"]) for r in rows] == [
        ("a", "m1", "A", 1), ("bb", "m2", "BB", 2), ("ccc", "m1", "CCC", 3), ("dd", "m2", "DD", 2)]


def test_a_model_stage_passes_a_block_without_its_rows_through_untouched() -> None:
    block = pa.table({"text": ["a"], "_model": ["m2"]})
    stage = Tagged("m1")
    assert stage(block) is block and stage.seen == []


def test_a_block_of_one_models_rows_is_processed_whole() -> None:
    block = pa.table({"text": ["a", "bb"], "_model": ["m1", "m1"], "upper": pa.nulls(2, pa.string())})
    stage = Tagged("m1")
    done = stage(block)
    assert stage.seen == [["a", "bb"]] and done.column("upper").to_pylist() == ["A", "BB"]
