"""The one exception family of caa: every problem a user can fix is a `CaaError`."""

from __future__ import annotations

from pathlib import Path


class CaaError(Exception):
    """A problem with the user's input, options or environment; the CLI turns it into exit code 2."""


class InputError(CaaError):
    """A bad input file, pinned to the file, the row and the field where the problem was found."""

    def __init__(self, path: Path | str, problem: str, where: str | None = None, field: str | None = None):
        self.path = str(path)
        self.where = where
        self.field = field
        self.problem = problem
        parts = [self.path]
        if where:
            parts.append(where)
        if field:
            parts.append(f"field '{field}'")
        super().__init__(": ".join([*parts, problem]))


class ModelError(CaaError):
    """A model that cannot be found, loaded or driven."""


class MismatchError(CaaError):
    """Artifacts or options that do not belong together (another model, another hidden size, ...)."""


class OptionError(CaaError):
    """A refused option value. ``option`` is the parameter's name, as a Python caller passes it
    (``batch_size``); the command line shows the flag it maps to (``--batch-size``) instead."""

    def __init__(self, option: str, value: object, problem: str):
        self.option = option
        self.value = value
        self.problem = problem
        super().__init__(f"{option}={value!r}: {problem}")
