"""`caa ingest`: contrastive pairs from A/B JSON, JSONL, CSV or Parquet into one validated table."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from caa.artifacts import PAIRS, make_meta, require_file, write_artifact
from caa.errors import CaaError, InputError

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


@dataclass
class IngestResult:
    """The pairs kept, the rows rejected (with ``skip_invalid``) and the duplicates dropped."""

    pairs: list[Pair] = field(default_factory=list)
    rejected: list[InputError] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        """Pairs per behavior and split."""
        out: dict[str, dict[str, int]] = {}
        for p in self.pairs:
            per = out.setdefault(p.behavior, {"train": 0, "test": 0})
            per[p.split] += 1
        return out


def parse_mapping(items: Sequence[str]) -> dict[str, str]:
    """``["prompt=instruction", ...]`` -> ``{"prompt": "instruction"}`` (our field = their column)."""
    known = set(AB_FIELDS) | set(FREEFORM_FIELDS)
    mapping: dict[str, str] = {}
    for item in items:
        ours, sep, theirs = item.partition("=")
        ours, theirs = ours.strip(), theirs.strip()
        if not sep or not ours or not theirs:
            raise CaaError(f"--map '{item}': expected FIELD=COLUMN, e.g. prompt=instruction")
        if ours not in known:
            raise CaaError(
                f"--map '{item}': '{ours}' is not a caa field; use one of {', '.join(sorted(known))}"
            )
        mapping[ours] = theirs
    return mapping


def ingest(
    paths: Sequence[Path],
    *,
    behavior: str | None = None,
    mapping: Mapping[str, str] | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    skip_invalid: bool = False,
) -> IngestResult:
    """Read, validate and split contrastive pairs from ``paths``.

    A bad row raises an :class:`InputError` naming the file, row and field, unless ``skip_invalid``
    is set: then it is recorded in ``result.rejected`` and the valid rows are kept. Problems with a
    whole file (unreadable, empty, malformed JSON array) always raise.
    """
    if not paths:
        raise CaaError("no input files given")
    if not 0.0 <= test_fraction < 1.0:
        raise CaaError(f"--test-fraction {test_fraction}: must be at least 0 and below 1")
    if behavior is not None and not behavior.strip():
        raise CaaError("--behavior must not be empty")
    result = IngestResult()
    seen: dict[str, str] = {}
    for path in paths:
        path = Path(path)
        name = behavior or path.stem
        for where, record in _records(path, skip_invalid, result.rejected):
            try:
                pair = _to_pair(path, where, record, name, mapping or {}, test_fraction, seed)
            except InputError as e:
                if not skip_invalid:
                    raise
                result.rejected.append(e)
                continue
            first = seen.get(pair.pair_id)
            if first is not None:
                result.duplicates.append(f"{path}: {where}: exact duplicate of {first} (dropped)")
                continue
            seen[pair.pair_id] = f"{path}: {where}"
            result.pairs.append(pair)
    if not result.pairs:
        raise CaaError("no valid pairs in " + ", ".join(str(p) for p in paths))
    return result


def _records(path: Path, skip_invalid: bool, rejected: list[InputError]) -> Iterator[tuple[str, Any]]:
    """(where, raw record) for every row of a file; file-level problems raise at once."""
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise InputError(
            path, f"unknown file type '{suffix or path.name}': caa ingest reads {', '.join(EXTENSIONS)}"
        )
    require_file(path)
    if suffix == ".parquet":
        yield from _parquet_records(path)
        return
    data = path.read_bytes()
    if not data.strip():
        raise InputError(path, "file is empty")
    if suffix == ".jsonl":
        yield from _jsonl_records(path, data, skip_invalid, rejected)
        return
    text = _decode(path, data)
    if suffix == ".json":
        yield from _json_records(path, text)
    else:
        yield from _csv_records(path, text)


def _decode(path: Path, data: bytes, where: str | None = None) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(
            path, f"not valid UTF-8 (byte 0x{data[e.start]:02x})", where=where or f"line {line}"
        ) from None


def _json_records(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(
            path, f"malformed JSON: {e.msg} (column {e.colno})", where=f"line {e.lineno}"
        ) from None
    if not isinstance(doc, list):
        raise InputError(path, f"expected a JSON array of objects, found a JSON {_json_type(doc)}")
    if not doc:
        raise InputError(path, "the JSON array is empty: no pairs")
    for i, record in enumerate(doc):
        yield f"index {i}", record


def _jsonl_records(
    path: Path, data: bytes, skip_invalid: bool, rejected: list[InputError]
) -> Iterator[tuple[str, Any]]:
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"line {number}"
        try:
            line = _decode(path, raw, where)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(path, f"malformed JSON: {e.msg} (column {e.colno})", where=where) from None
        except InputError as e:
            if not skip_invalid:
                raise
            rejected.append(e)
            continue
        yield where, record


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
                yield where, _BadRow(f"row has {len(row)} fields, the header has {width}")
                continue
            yield where, dict(zip(header, row, strict=True))
    except csv.Error as e:
        raise InputError(path, f"malformed CSV: {e}", where=f"line {reader.line_num}") from None


def _parquet_records(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(path, f"not a readable Parquet file ({e})") from None
    if table.num_rows == 0:
        raise InputError(path, "file is empty: the table has no rows")
    for i, record in enumerate(table.to_pylist()):
        yield f"row {i}", record


@dataclass(frozen=True)
class _BadRow:
    problem: str


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _to_pair(
    path: Path,
    where: str,
    record: Any,
    behavior: str,
    mapping: Mapping[str, str],
    test_fraction: float,
    seed: int,
) -> Pair:
    if isinstance(record, _BadRow):
        raise InputError(path, record.problem, where=where)
    if not isinstance(record, dict):
        raise InputError(path, f"expected an object, found a JSON {_json_type(record)}", where=where)
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
        raise InputError(
            path, f"expected text, found {_json_type(value)} {value!r:.40}", where=where, field=column
        )
    if not value.strip():
        raise InputError(path, "empty text", where=where, field=column)
    return value


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


def pairs_table(pairs: Sequence[Pair]) -> pa.Table:
    """The pairs as an Arrow table in the PAIRS schema."""
    columns = {f.name: [getattr(p, f.name) for p in pairs] for f in PAIRS.fields}
    return pa.table(columns).cast(PAIRS.schema())


def write_pairs(result: IngestResult, out: Path, paths: Sequence[Path], options: Mapping[str, Any]) -> None:
    """Write ``pairs.parquet`` atomically with provenance (options, input hashes, counts)."""
    meta = make_meta(PAIRS, options, inputs={str(p): Path(p) for p in paths}, counts=result.counts())
    write_artifact(pairs_table(result.pairs), out, PAIRS, meta)
