"""caa.errors: one exception family; its messages name the file, row and field, or the option."""

from __future__ import annotations

import pytest

from caa.errors import CaaError, InputError, MismatchError, ModelError, OptionError


def test_input_error_names_the_file_the_row_and_the_field() -> None:
    e = InputError("data/x.jsonl", "empty text", where="line 12", field="positive")
    assert str(e) == "data/x.jsonl: line 12: field 'positive': empty text"
    assert (e.path, e.where, e.field, e.problem) == ("data/x.jsonl", "line 12", "positive", "empty text")
    assert str(InputError("x.csv", "file is empty")) == "x.csv: file is empty"


def test_option_error_names_the_parameter_and_keeps_its_parts() -> None:
    e = OptionError("batch_size", 0, "must be at least 1")
    assert str(e) == "batch_size=0: must be at least 1"
    assert (e.option, e.value, e.problem) == ("batch_size", 0, "must be at least 1")
    assert str(OptionError("engine", "turbo", "use one of fast, naive")) == (
        "engine='turbo': use one of fast, naive"
    )


@pytest.mark.parametrize("kind", [InputError, ModelError, MismatchError, OptionError])
def test_every_error_is_a_caa_error(kind: type) -> None:
    assert issubclass(kind, CaaError) and issubclass(CaaError, Exception)
