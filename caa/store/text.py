"""Untrusted text: checked once where it enters caa, made harmless where it reaches the terminal.

Text enters from files (datasets, prompt and neutral files, artifact metadata, model configs) and from
the command line. Every JSON document goes through :func:`load_json` and every string through
:func:`text_problem`, so that what caa accepts it can also write, print and hash: no lone surrogates
(``json.loads`` accepts ``"\\ud800"``; Python decodes argv bytes that are not UTF-8 as surrogates),
no nesting deep enough to exhaust the stack, no integer too long to convert. :func:`clean` shows
control characters (ANSI escapes, carriage returns, bells) as visible escapes before text is printed.

Behavior names are looked up, so two spellings of one name must be one name: :func:`behavior_name`
brings every name to Unicode NFC where it enters (a file's stem, an option, a row's field, an
artifact's column, a lookup), so that ``café`` typed (NFC) finds ``café`` from a file name stored
decomposed (NFD, as macOS does), and refuses a name that shows nothing (empty, spaces, U+200B).
"""

from __future__ import annotations

import json
import re
import sys
import unicodedata
from pathlib import Path
from typing import Any

from caa.errors import InputError

MAX_JSON_DEPTH = 64  # far above any caa document or dataset row; far below the interpreter's stack
_SURROGATE = re.compile("[\ud800-\udfff]")
# C0 controls, DEL, C1 controls (0x9b is a one-byte CSI in some terminals), the bidirectional
# overrides and isolates that reorder what a reader sees, and surrogates (which cannot be printed).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# What draws nothing: separators (spaces), controls, format characters (U+200B, U+FEFF, U+2060),
# marks with no base to sit on, and the letters that are blank by design (Hangul fillers, braille blank).
_UNSEEN_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf", "Mn", "Me"})
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
NAME_PROBLEM = (
    "a behavior name must have a visible character: this one is empty, or only spaces or invisible "
    "characters such as U+200B"
)


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be used as text, or None. Bytes that were not UTF-8 (a surrogate from
    Python's surrogateescape, U+DC80-U+DCFF) are named as bytes; other surrogates as code points."""
    if value.isascii():
        return None
    match = _SURROGATE.search(value)
    if match is None:
        return None
    code = ord(match.group())
    at = f"at character {match.start() + 1}"
    if 0xDC80 <= code <= 0xDCFF:
        return f"not valid UTF-8 (byte 0x{code - 0xDC00:02x} {at})"
    return f"not valid Unicode: a lone surrogate U+{code:04X} {at}"


def check_text(value: str, path: Path | str, where: str | None = None, field: str | None = None) -> str:
    """``value`` if it is usable text, else an error naming the file, row and field."""
    problem = text_problem(value)
    if problem is not None:
        raise InputError(path, problem, where=where, field=field)
    return value


def behavior_name(value: str) -> str | None:
    """``value`` as caa keeps a behavior name (Unicode NFC), or None when it is not one: empty, or
    only characters that draw nothing (spaces, U+200B, U+FEFF, ...), which :data:`NAME_PROBLEM` says.
    Check :func:`text_problem` first: a lone surrogate cannot be normalised meaningfully."""
    name = unicodedata.normalize("NFC", value)
    if all(c.isspace() or c in _BLANK_LETTERS or unicodedata.category(c) in _UNSEEN_CATEGORIES for c in name):
        return None
    return name


def check_name(value: str, path: Path | str, where: str | None = None, field: str | None = None) -> str:
    """``value`` as a behavior name (NFC), else an error naming the file, row and field."""
    name = behavior_name(check_text(value, path, where, field))
    if name is None:
        raise InputError(path, NAME_PROBLEM, where=where, field=field)
    return name


def same_name(value: str) -> str:
    """A behavior name to look up, in the form names are kept (NFC); no check (a name that is not
    there is simply not found)."""
    return unicodedata.normalize("NFC", value) if not value.isascii() else value


class _TooLong(ValueError):
    def __init__(self, digits: int):
        super().__init__(digits)
        self.digits = digits


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > _max_digits():
        raise _TooLong(digits)
    return int(text)


def _max_digits() -> int:
    return sys.get_int_max_str_digits() or 4300


def load_json(
    text: str | bytes,
    path: Path | str,
    *,
    where: str | None = None,
    field: str | None = None,
    rows: bool = False,
    what: str = "malformed JSON",
) -> Any:
    """Parse one JSON document from ``path`` and check every string and key in it (see
    :func:`text_problem`) and its depth, with errors naming the file, ``where`` and the field.

    ``where`` is the row (``line 3``) the document came from, if any; ``field`` the field that holds
    it. With ``rows``, the document is a list of rows: a problem inside one is placed at its index.
    ``what`` opens the message for a document that does not parse.
    """
    try:
        doc = json.loads(text, parse_int=_parse_int)
    except json.JSONDecodeError as e:
        place = where or f"line {e.lineno}"
        raise InputError(path, f"{what}: {e.msg} (column {e.colno})", where=place, field=field) from None
    except _TooLong as e:
        problem = f"{what}: an integer of {e.digits} digits (at most {_max_digits()})"
        raise InputError(path, problem, where=where, field=field) from None
    except RecursionError:
        problem = f"{what}: nested more than {MAX_JSON_DEPTH} levels deep"
        raise InputError(path, problem, where=where, field=field) from None
    except UnicodeDecodeError as e:
        raise InputError(path, f"not valid UTF-8 (byte offset {e.start})", where=where, field=field) from None
    found = _first_problem(doc)
    if found is not None:
        keys, problem = found
        if rows and isinstance(doc, list) and keys:
            where, keys = f"index {keys[0]}", keys[1:]
        name = _field_name([field, *keys] if field else keys)
        raise InputError(path, problem, where=where, field=name or None)
    return doc


def _first_problem(doc: Any) -> tuple[list[str | int], str] | None:
    """(the keys leading to it, the problem) of the first bad string or too-deep value, found
    without recursion (a document nested to the stack's limit must not exhaust it here)."""
    stack: list[tuple[Any, list[str | int]]] = [(doc, [])]
    while stack:
        value, keys = stack.pop()
        if len(keys) >= MAX_JSON_DEPTH and isinstance(value, (dict, list)):  # level MAX_JSON_DEPTH + 1
            return keys[:1], f"nested more than {MAX_JSON_DEPTH} levels deep"
        if isinstance(value, str):
            problem = text_problem(value)
            if problem:
                return keys, problem
        elif isinstance(value, dict):
            for key in value:
                problem = text_problem(key)
                if problem:
                    return keys, f"a key is {problem}"
            stack.extend((v, [*keys, k]) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((v, [*keys, i]) for i, v in reversed(list(enumerate(value))))
    return None


def _field_name(keys: list[Any]) -> str:
    """``["model", "layers", 2]`` -> ``model.layers[2]``."""
    name = ""
    for key in keys:
        if isinstance(key, int):
            name += f"[{key}]"
        else:
            name += ("." if name else "") + clean(str(key))
    return name


def clean(text: str, keep: str = "") -> str:
    """``text`` safe to print on a terminal: every control character except those in ``keep`` is
    shown as an escape (``\\x1b``, ``\\r``, ``\\u202e``), so data cannot move the cursor, recolour,
    retitle or rewrite the screen, or ring the bell."""
    if text.isprintable() and text.isascii():
        return text

    def shown(match: re.Match[str]) -> str:
        char = match.group()
        if char in keep:
            return char
        return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")

    return _CONTROL.sub(shown, text)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for a message."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages: ``a list`` -> ``array``."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")
