"""Stages declare the columns they need and add, so a wiring mistake fails before any engine starts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import pyarrow as pa


class Stage:
    """A callable over one shard's Arrow block; subclasses name their input and output columns."""

    requires: ClassVar[dict[str, str]] = {}
    produces: ClassVar[dict[str, str]] = {}

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
