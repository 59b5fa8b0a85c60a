"""The rows of a dataset of contrastive pairs, each checked and made a :class:`Pair`.

A file is read as raw records by :func:`caa.store.records.read_records` (A/B JSON array, JSONL, CSV
or Parquet; a problem with the whole file raises at once); a record, from a file or from memory,
becomes a pair with the paper's A/B fields or the free-form ones, its texts checked and its answer
letters normalised. A pair's id is a hash of its fields, and its split follows from that id alone.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caa.errors import InputError
from caa.store.records import BadRow, read_records
from caa.store.text import check_text, json_type

AB_FIELDS = ("question", "answer_matching_behavior", "answer_not_matching_behavior")
FREEFORM_FIELDS = ("prompt", "positive", "negative")
EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet")
_CHOICE = re.compile(r"(?m)^[ \t]*\(([A-Z])\)")
_ANSWER = re.compile(r"\s*\(([A-Z])\)(?:\s.*)?|\s*([A-Z])\s*", re.S)


@dataclass(frozen=True)
class Pair:
    """One contrastive pair. For A/B pairs ``prompt`` is the question and the completions are
    the answer letters, normalised to ``(A)``/``(B)``."""

    pair_id: str
    behavior: str
    format: str  # "ab" or "freeform"
    prompt: str
    positive: str
    negative: str
    split: str  # "train" or "test"
    source: str
    source_row: str


def records(path: Path, skip_invalid: bool, rejected: list[InputError]) -> Iterator[tuple[str, Any]]:
    """(where, raw record) for every row of a dataset file; file-level problems raise at once."""
    hint = f"caa ingest reads {', '.join(EXTENSIONS)}"
    return read_records(path, EXTENSIONS, hint, skip_invalid=skip_invalid, rejected=rejected)


def to_pair(
    path: Path,
    where: str,
    record: Any,
    behavior: str,
    mapping: Mapping[str, str],
    test_fraction: float,
    seed: int,
) -> Pair:
    if isinstance(record, BadRow):
        raise InputError(path, record.problem, where=where)
    if not isinstance(record, dict):
        raise InputError(path, f"expected an object, found a JSON {json_type(record)}", where=where)
    record = {**record, **{ours: record[theirs] for ours, theirs in mapping.items() if theirs in record}}
    fmt, names = _format_of(path, where, record, mapping)
    texts = [_text(path, where, record, n, mapping) for n in names]
    prompt, positive, negative = texts
    if fmt == "ab":
        choices = _CHOICE.findall(prompt)
        if not choices:
            raise InputError(
                path,
                "no lettered choices like '(A) ...' on their own lines",
                where=where,
                field=_column("question", mapping),
            )
        positive = _answer(path, where, positive, choices, _column(names[1], mapping))
        negative = _answer(path, where, negative, choices, _column(names[2], mapping))
    if positive == negative:
        raise InputError(
            path,
            "the positive and negative completions are identical",
            where=where,
            field=_column(names[2], mapping),
        )
    pair_id = make_pair_id((behavior, fmt, prompt, positive, negative))
    return Pair(
        pair_id,
        behavior,
        fmt,
        prompt,
        positive,
        negative,
        assign_split(pair_id, test_fraction, seed),
        path.name,
        where,
    )


def _column(name: str, mapping: Mapping[str, str]) -> str:
    return mapping.get(name, name)


def _format_of(
    path: Path, where: str, record: dict[str, Any], mapping: Mapping[str, str]
) -> tuple[str, tuple[str, ...]]:
    for fmt, names in (("ab", AB_FIELDS), ("freeform", FREEFORM_FIELDS)):
        if all(n in record for n in names):
            return fmt, names
    for names in (AB_FIELDS, FREEFORM_FIELDS):
        present = [n for n in names if n in record]
        if present:
            missing = next(n for n in names if n not in record)
            raise InputError(path, "missing field", where=where, field=_column(missing, mapping))
    raise InputError(
        path,
        f"has neither the A/B fields ({', '.join(AB_FIELDS)}) nor the free-form fields "
        f"({', '.join(FREEFORM_FIELDS)}); use --map FIELD=COLUMN for other names",
        where=where,
    )


def _text(path: Path, where: str, record: dict[str, Any], name: str, mapping: Mapping[str, str]) -> str:
    value = record[name]
    column = _column(name, mapping)
    if value is None:
        raise InputError(path, "missing value (null)", where=where, field=column)
    if not isinstance(value, str):
        shown = f" {value!r:.40}" if isinstance(value, (int, float)) else ""
        raise InputError(path, f"expected text, found {json_type(value)}{shown}", where=where, field=column)
    if not value.strip():
        raise InputError(path, "empty text", where=where, field=column)
    return check_text(value, path, where, column)


def _answer(path: Path, where: str, answer: str, choices: list[str], column: str) -> str:
    match = _ANSWER.fullmatch(answer)
    letter = (match.group(1) or match.group(2)) if match else None
    listed = ", ".join(f"({c})" for c in choices)
    if letter is None:
        raise InputError(
            path,
            f"'{answer:.40}' is not an answer letter like '(A)'; the choices are {listed}",
            where=where,
            field=column,
        )
    if letter not in choices:
        raise InputError(
            path, f"answer '({letter})' is not one of the choices {listed}", where=where, field=column
        )
    return f"({letter})"


def make_pair_id(fields: tuple[str, ...]) -> str:
    """A pair's id: a hash of its fields, joined by the unit separator \x1f.

    Fields holding \x1f themselves are encoded as a JSON list instead (which holds no raw \x1f), so
    different pairs never share an id and the ids of ordinary pairs stay as they were."""
    text = json.dumps(list(fields)) if any("\x1f" in f for f in fields) else "\x1f".join(fields)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def assign_split(pair_id: str, test_fraction: float, seed: int) -> str:
    """A pair's split from its id alone, so it keeps its split when other pairs are added."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{pair_id}".encode()).digest()[:8], "big") / 2.0**64
    return "test" if u < test_fraction else "train"
