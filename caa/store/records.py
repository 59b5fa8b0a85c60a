"""Raw records from a file, by its suffix: the one dispatcher for every dataset and text list.

A JSON array, JSONL, CSV, Parquet or plain-text (``.txt``, one text a line) file becomes
``(where, record)`` rows: ``where`` names the row (``index 3``, ``line 4``, ``row 2``) and a record is
what the row holds (a parsed JSON value, a dict of a CSV or Parquet row; a ``.txt`` line, stripped of
its blanks, is a dict of one field, ``line_field``). Problems with the whole file raise at once,
naming the file; a problem with one row names the row (and, inside a JSON value, the field).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caa.errors import InputError
from caa.store.artifacts import read_table, require_file
from caa.store.text import check_text, json_type, load_json

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")


@dataclass(frozen=True)
class BadRow:
    """A row that could not become a record (a CSV row of the wrong width): its problem, left to
    the reader of records to raise or to skip."""

    problem: str


def read_records(
    path: Path,
    suffixes: Sequence[str],
    hint: str,
    *,
    skip_invalid: bool = False,
    rejected: list[InputError] | None = None,
    allow_empty: bool = False,
    line_field: str = "text",
) -> Iterator[tuple[str, Any]]:
    """(where, raw record) for every row of ``path``, read by its suffix (one of ``suffixes``; another
    is refused with ``hint`` saying what is read). Blank lines are skipped. A JSONL line that does not
    parse raises, or with ``skip_invalid`` goes to ``rejected``. An empty file (no bytes but blanks,
    an empty JSON array, a table without rows) raises unless ``allow_empty``. A ``.txt`` line is
    the record ``{line_field: line}``."""
    suffix = path.suffix.lower()
    if suffix not in suffixes or suffix not in SUFFIXES:
        raise InputError(path, f"unknown file type '{suffix or path.name}': {hint}")
    require_file(path)
    if suffix == ".parquet":
        yield from _parquet_records(path, allow_empty)
        return
    data = path.read_bytes()
    if not data.strip():
        if allow_empty:
            return
        raise InputError(path, "file is empty")
    if suffix == ".jsonl":
        yield from _jsonl_records(path, data, skip_invalid, rejected if rejected is not None else [])
    elif suffix == ".txt":
        yield from _txt_records(path, data, line_field)
    elif suffix == ".json":
        yield from _json_records(path, decode(path, data), allow_empty)
    else:
        yield from _csv_records(path, decode(path, data))


def decode(path: Path, data: bytes, where: str | None = None) -> str:
    """``data`` as UTF-8 (a byte-order mark dropped), or an error naming the line of the bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(
            path, f"not valid UTF-8 (byte 0x{data[e.start]:02x})", where=where or f"line {line}"
        ) from None


def _lines(data: bytes) -> Iterator[tuple[str, bytes]]:
    """(``line N``, bytes) of every line that is not blank; lines end at \\n only (str.splitlines
    also splits at U+2028 and other characters that a JSON string may hold)."""
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if raw.strip():
            yield f"line {number}", raw


def _txt_records(path: Path, data: bytes, field: str) -> Iterator[tuple[str, dict[str, str]]]:
    for where, raw in _lines(data):
        text = decode(path, raw, where).strip()
        if text:
            yield where, {field: check_text(text, path, where)}


def _jsonl_records(
    path: Path, data: bytes, skip_invalid: bool, rejected: list[InputError]
) -> Iterator[tuple[str, Any]]:
    for where, raw in _lines(data):
        try:
            record = load_json(decode(path, raw, where), path, where=where)
        except InputError as e:
            if not skip_invalid:
                raise
            rejected.append(e)
            continue
        yield where, record


def _json_records(path: Path, text: str, allow_empty: bool) -> Iterator[tuple[str, Any]]:
    doc = load_json(text, path, rows=True)
    if not isinstance(doc, list):
        raise InputError(path, f"expected a JSON array of objects, found a JSON {json_type(doc)}")
    if not doc and not allow_empty:
        raise InputError(path, "the JSON array is empty: no pairs")
    for i, record in enumerate(doc):
        yield f"index {i}", record


def _csv_records(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
        width = len(header)
        seen = set()
        for name in header:
            if name in seen:
                raise InputError(path, f"duplicate column '{name}' in the header", where="line 1")
            seen.add(name)
        for row in reader:
            where = f"line {reader.line_num}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != width:
                yield where, BadRow(f"row has {len(row)} fields, the header has {width}")
                continue
            yield where, dict(zip(header, row, strict=True))
    except csv.Error as e:
        raise InputError(path, f"malformed CSV: {e}", where=f"line {reader.line_num}") from None


def _parquet_records(path: Path, allow_empty: bool) -> Iterator[tuple[str, Any]]:
    table = read_table(path)
    if table.num_rows == 0 and not allow_empty:
        raise InputError(path, "file is empty: the table has no rows")
    for i, record in enumerate(table.to_pylist()):
        yield f"row {i}", record
