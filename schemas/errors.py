"""The two errors a user acts on. Infrastructure errors stay Ray's and are retried by it."""

from __future__ import annotations


class SpecError(Exception):
    """The job cannot start: a bad spec, missing input, unknown variant, unreachable storage.

    Carries every problem found, one per line, each naming the field or file, what was found and what to do.
    """

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(f"- {p}" for p in self.problems) if len(self.problems) > 1 else self.problems[0])


class RowError(ValueError):
    """One row cannot be processed; it becomes an error row in the output and the job goes on."""

    def __init__(self, error_type: str, message: str):
        self.error_type = error_type
        super().__init__(message)
