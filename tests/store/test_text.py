"""caa.store.text: untrusted text checked where it enters (surrogates, depth, long integers) and
made harmless where it is printed (control characters as escapes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from caa.errors import InputError
from caa.store.text import MAX_JSON_DEPTH, check_text, clean, first_line, json_type, load_json, text_problem


def test_clean_escapes_control_characters_and_keeps_printable_text() -> None:
    assert clean("plain text") == "plain text"
    assert clean("caf\u00e9 \u2603") == "caf\u00e9 \u2603"  # printable non-ASCII is left alone
    assert clean("\x1b[31mred\x07") == "\\x1b[31mred\\x07"
    assert clean("a\nb\rc\td") == "a\\nb\\rc\\td"
    assert clean("x\u202ey\x9b") == "x\\u202ey\\x9b"  # a bidi override and a one-byte CSI
    assert clean("a\nb\tc", keep="\n") == "a\nb\\tc"


def test_text_problem_names_lone_surrogates_and_undecodable_bytes() -> None:
    assert text_problem("ascii") is None
    assert text_problem("\u00e9\U0001f600") is None  # a real astral character is no surrogate
    assert text_problem("ab\ud800") == "not valid Unicode: a lone surrogate U+D800 at character 3"
    # a byte that was not UTF-8, decoded with surrogateescape
    bad = b"x\xff".decode("utf-8", "surrogateescape")
    assert text_problem(bad) == "not valid UTF-8 (byte 0xff at character 2)"


def test_check_text_raises_naming_file_row_and_field() -> None:
    assert check_text("fine", "data.jsonl") == "fine"
    with pytest.raises(InputError) as e:
        check_text("\udc80", "data.jsonl", where="line 4", field="prompt")
    assert (e.value.path, e.value.where, e.value.field) == ("data.jsonl", "line 4", "prompt")
    assert str(e.value).startswith("data.jsonl: line 4: field 'prompt': not valid UTF-8")


def test_load_json_parses_and_names_the_field_holding_a_bad_string(tmp_path: Path) -> None:
    assert load_json('{"a": [1, "b"]}', "f.json") == {"a": [1, "b"]}
    with pytest.raises(InputError) as e:
        load_json('{"model": {"layers": [1, 2, "\\ud800"]}}', "f.json")
    assert e.value.field == "model.layers[2]"
    assert "lone surrogate U+D800" in e.value.problem
    # with rows, a problem inside one row is placed at that row's index
    with pytest.raises(InputError) as e:
        load_json('[{"p": "ok"}, {"p": "\\udfff"}]', "rows.json", rows=True)
    assert (e.value.where, e.value.field) == ("index 1", "p")


def test_load_json_malformed_names_line_and_column() -> None:
    with pytest.raises(InputError) as e:
        load_json('{"a": 1,\n oops}', "bad.json")
    assert e.value.where == "line 2"
    assert e.value.problem.startswith("malformed JSON: ")
    assert "(column 2)" in e.value.problem


def test_load_json_refuses_too_deep_nesting_and_too_long_integers() -> None:
    ok = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert load_json(ok, "ok.json") is not None
    deep = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
    with pytest.raises(InputError, match=f"nested more than {MAX_JSON_DEPTH} levels deep"):
        load_json(deep, "deep.json")
    with pytest.raises(InputError, match="nested more than"):
        load_json("[" * 100_000 + "]" * 100_000, "deeper.json")  # past the interpreter's recursion
    with pytest.raises(InputError, match="an integer of 5000 digits"):
        load_json("[" + "9" * 5000 + "]", "big.json")


def test_load_json_bad_key_and_invalid_utf8_bytes() -> None:
    with pytest.raises(InputError, match="a key is not valid Unicode"):
        load_json(json.dumps({"\ud800": 1}), "k.json")
    with pytest.raises(InputError, match=r"not valid UTF-8 \(byte offset"):
        load_json(b'{"a": "\xff"}', "b.json")


def test_first_line_and_json_type() -> None:
    assert first_line(ValueError("one\ntwo")) == "one"
    assert first_line(KeyError()) == "KeyError"
    assert [json_type(v) for v in ({}, [], "", True, None, 1, 1.5)] == [
        "object",
        "array",
        "string",
        "boolean",
        "null",
        "number",
        "number",
    ]
