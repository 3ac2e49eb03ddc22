"""Stages declare the columns they need and add, so a wiring mistake fails before any engine starts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc

MODEL_COLUMN = "_model"
"""Names the model a row is for: a job's models share one read, each shard's rows copied once per model."""


class Stage:
    """A callable over one shard's Arrow block; subclasses name their input and output columns.

    A stage serving one model of a job (`rows_of` set) processes only that model's rows of a block (by MODEL_COLUMN)
    and passes the other models' rows on unchanged, so one read feeds every model's stages in turn."""

    requires: ClassVar[dict[str, str]] = {}
    produces: ClassVar[dict[str, str]] = {}
    rows_of: str | None = None

    def __call__(self, block: pa.Table) -> pa.Table:
        if self.rows_of is None or MODEL_COLUMN not in block.column_names:
            return self.process(block)
        mine = pc.equal(block.column(MODEL_COLUMN), self.rows_of)
        count = pc.sum(mine).as_py() or 0
        if not count:
            return block
        # Columns this stage adds may be there already, from another model's stage: this one's rows get them anew.
        ours = block if count == block.num_rows else block.filter(mine)  # one model's block is not copied
        done = self.process(ours.drop_columns([c for c in self.produces if c in block.column_names]))
        if count == block.num_rows:
            return done
        others = block.filter(pc.invert(mine))
        for name in self.produces:
            if name not in others.column_names:
                field = done.schema.field(name)
                others = others.append_column(field, pa.nulls(others.num_rows, field.type))
        return pa.concat_tables([done, others.select(done.column_names)])

    def process(self, block: pa.Table) -> pa.Table:
        """The stage's work on a block of rows that are all its own."""
        raise NotImplementedError

    def check(self, block: pa.Table) -> None:
        """Fail naming the missing columns when a block lacks what this stage needs."""
        missing = set(self.requires) - set(block.column_names)
        if missing:
            raise KeyError(
                f"Required input columns {sorted(missing)} not found at the input of {type(self).__name__}. "
                f"Input columns: {sorted(block.column_names)}"
            )


def with_errors(block: pa.Table, error_types: list[str | None], errors: list[str | None]) -> pa.Table:
    """The block with its `_error_type` and `_error` columns replaced."""
    for name, values in (("_error_type", error_types), ("_error", errors)):
        block = block.set_column(block.schema.get_field_index(name), name, pa.array(values, pa.string()))
    return block


def check_wiring(source_columns: Sequence[str], stages: Sequence[type[Stage]]) -> None:
    """Check before running that each stage's required columns come from the source or an earlier stage."""
    available = set(source_columns)
    for stage in stages:
        missing = set(stage.requires) - available
        if missing:
            needs = "; ".join(f"{name}: {stage.requires[name]}" for name in sorted(missing))
            raise KeyError(
                f"Required input columns {sorted(missing)} not found at the input of {stage.__name__} ({needs}). "
                f"Input columns: {sorted(available)}"
            )
        available |= set(stage.produces)
