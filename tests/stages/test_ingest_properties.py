"""Property-based tests of `caa ingest`: the same pairs from every file format, stable ids and splits,
and every bad row named by file, row and field.

Hypothesis writes no example database (``database=None``): the tests leave nothing in the work tree.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from caa.cli import app
from caa.errors import CaaError, InputError
from caa.stages.ingest import ingest
from caa.stages.pair_rows import FREEFORM_FIELDS, Pair
from caa.store.artifacts import read_artifact
from caa.store.schemas import PAIRS
from caa.store.text import behavior_name

runner = CliRunner()
FAST = settings(max_examples=40, deadline=None, database=None)
SLOW = settings(max_examples=15, deadline=None, database=None)  # each example runs the CLI or 2000 rows

Row = dict[str, Any]

# --- strategies ----------------------------------------------------------------------------------

# Characters that break naive writers and readers come often; any other UTF-8 character now and
# then. "\x1f" is left to `test_distinct_rows_are_never_dropped_as_duplicates`, where it matters.
_TRICKY = list(" ,;\"'\\\n\r\t\x00\x0b\x85\u00a0\u2028\ufeff{}[]()é漢🙂")
CHARS = st.one_of(st.sampled_from(_TRICKY), st.characters(codec="utf-8", exclude_characters="\x1f"))
TEXT = st.text(CHARS, min_size=1, max_size=20).filter(str.strip)  # ingest rejects blank text
# A behavior name: one that shows something (caa keeps it in NFC; see caa.store.text.behavior_name).
NAME = TEXT.filter(lambda t: behavior_name(t) is not None)
# Text that ingest must reject as empty: str.strip removes all of it.
BLANK = st.text(st.sampled_from(" \t\n\r\x0b\x0c\u00a0\u2003\u3000"), max_size=4)
JUNK = st.one_of(
    st.integers(), st.booleans(), st.floats(allow_nan=False), st.lists(st.integers(), max_size=2)
)
FORMATS = (".jsonl", ".json", ".csv", ".parquet")


def _key(row: Row) -> tuple[str, str, str]:
    return row["prompt"], row["positive"], row["negative"]


@st.composite
def freeform_rows(draw: st.DrawFn, text: st.SearchStrategy[str] = TEXT) -> Row:
    positive = draw(text)
    return {
        "prompt": draw(text),
        "positive": positive,
        "negative": draw(text.filter(lambda t: t != positive)),
    }


def unique_rows(min_size: int = 1, max_size: int = 8) -> st.SearchStrategy[list[Row]]:
    return st.lists(freeform_rows(), min_size=min_size, max_size=max_size, unique_by=_key)


@dataclass(frozen=True)
class AbRow:
    row: Row
    positive: str  # the normalised answers ingest must produce
    negative: str


@st.composite
def ab_rows(draw: st.DrawFn) -> AbRow:
    letters = draw(st.lists(st.sampled_from("ABCDEFGHZ"), min_size=2, max_size=4, unique=True))
    indent = draw(st.sampled_from(["", " ", "  ", "\t"]))
    choices = "\n".join(f"{indent}({letter}) {draw(TEXT)}" for letter in letters)
    question = f"{draw(st.text(CHARS, max_size=20))}\n\nChoices:\n{choices}"
    pos, neg = draw(st.permutations(letters))[:2]
    return AbRow(
        {
            "question": question,
            "answer_matching_behavior": draw(_answer(pos)),
            "answer_not_matching_behavior": draw(_answer(neg)),
        },
        f"({pos})",
        f"({neg})",
    )


def _answer(letter: str) -> st.SearchStrategy[str]:
    """The ways a dataset writes an answer letter: '(A)', ' B ', '(C) the text of the choice'."""
    ws = st.text(st.sampled_from(" \t\n"), max_size=2)
    suffix = st.tuples(st.sampled_from(" \t\n"), st.text(CHARS, max_size=10)).map("".join)
    return st.one_of(
        st.just(f"({letter})"),
        st.tuples(ws, st.just(f"({letter})"), st.one_of(st.just(""), suffix)).map("".join),
        st.tuples(ws, st.just(letter), ws).map("".join),
    )


# --- writing the same rows in every format -----------------------------------------------------


@dataclass(frozen=True)
class Malformed:
    """A JSONL line that is not JSON."""

    text: str


def write_rows(path: Path, rows: Sequence[Any], ensure_ascii: bool = True) -> list[tuple[int, int]]:
    """Write ``rows`` in the format of ``path``'s suffix; return each row's first and last line
    (only meaningful for JSONL and CSV)."""
    suffix = path.suffix
    if suffix == ".jsonl":
        lines = [
            r.text if isinstance(r, Malformed) else json.dumps(r, ensure_ascii=ensure_ascii) for r in rows
        ]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return [(i, i) for i in range(1, len(rows) + 1)]
    if suffix == ".json":
        path.write_text(json.dumps(list(rows), ensure_ascii=ensure_ascii, indent=1), encoding="utf-8")
        return []
    if suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(list(rows)), path)
        return []
    assert suffix == ".csv"
    header = list(rows[0])
    text, spans, line = _csv_line(header), [], 2
    for r in rows:
        record = _csv_line([r[h] for h in header])
        n_lines = len(re.findall(r"\r\n|\r|\n", record))  # the line breaks csv.reader counts
        spans.append((line, line + n_lines - 1))
        text, line = text + record, line + n_lines
    path.write_bytes(text.encode("utf-8"))
    return spans


def _csv_line(cells: list[str]) -> str:
    buf = io.StringIO(newline="")
    csv.writer(buf).writerow(cells)
    return buf.getvalue()


def where_of(suffix: str, index: int, spans: list[tuple[int, int]]) -> list[str]:
    """Every acceptable ``where`` for row ``index`` of a file (a CSV row may span several lines)."""
    if suffix == ".json":
        return [f"index {index}"]
    if suffix == ".parquet":
        return [f"row {index}"]
    first, last = spans[index]
    return [f"line {n}" for n in range(first, last + 1)]


@contextmanager
def workdir() -> Iterator[Path]:
    """A fresh directory per hypothesis example (pytest's tmp_path is shared by all examples)."""
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def content(pairs: Sequence[Pair]) -> list[tuple[str, ...]]:
    """What must not depend on the file format: id, texts, behavior, format and split."""
    return [(p.pair_id, p.behavior, p.format, p.prompt, p.positive, p.negative, p.split) for p in pairs]


def run_cli(*args: str) -> Any:
    return runner.invoke(app, ["ingest", *args])


# --- round trips ---------------------------------------------------------------------------------


@FAST
@given(rows=unique_rows(), ensure_ascii=st.booleans(), test_fraction=st.sampled_from([0.0, 0.2, 0.5, 0.9]))
def test_freeform_rows_are_the_same_pairs_in_every_format(
    rows: list[Row], ensure_ascii: bool, test_fraction: float
) -> None:
    with workdir() as d:
        results, paths = {}, []
        for suffix in FORMATS:
            (d / suffix[1:]).mkdir()
            path = d / suffix[1:] / f"mood{suffix}"  # the same stem, so the same behavior
            spans = write_rows(path, rows, ensure_ascii)
            result = ingest([path], test_fraction=test_fraction)
            assert [_key(r) for r in rows] == [(p.prompt, p.positive, p.negative) for p in result.pairs]
            assert {p.behavior for p in result.pairs} == {"mood"}
            assert {p.format for p in result.pairs} == {"freeform"}
            assert all(p.source == path.name for p in result.pairs)
            for i, p in enumerate(result.pairs):
                assert p.source_row in where_of(suffix, i, spans), (suffix, i, p.source_row)
            assert not result.rejected and not result.duplicates
            results[suffix] = content(result.pairs)
            paths.append(path)
        assert len({tuple(c) for c in results.values()}) == 1, results
        # one call over all four files: the later files only repeat the first one's pairs
        together = ingest(paths, test_fraction=test_fraction)
        assert content(together.pairs) == results[".jsonl"]
        assert len(together.duplicates) == 3 * len(rows)


@FAST
@given(rows=st.lists(ab_rows(), min_size=1, max_size=6, unique_by=lambda r: r.row["question"]))
def test_ab_rows_are_the_same_pairs_in_every_format(rows: list[AbRow]) -> None:
    with workdir() as d:
        results = []
        for suffix in FORMATS:
            path = d / f"syco{suffix}"
            write_rows(path, [r.row for r in rows])
            pairs = ingest([path]).pairs
            assert [(r.row["question"], r.positive, r.negative) for r in rows] == [
                (p.prompt, p.positive, p.negative) for p in pairs
            ]
            assert {p.format for p in pairs} == {"ab"}
            results.append(content(pairs))
        assert all(r == results[0] for r in results)


@SLOW
@given(rows=unique_rows(), suffix=st.sampled_from(FORMATS), behavior=st.one_of(st.none(), NAME))
def test_cli_writes_exactly_the_pairs_of_the_library(
    rows: list[Row], suffix: str, behavior: str | None
) -> None:
    with workdir() as d:
        src, out = d / f"data{suffix}", d / "out" / "pairs.parquet"
        write_rows(src, rows)
        args = [] if behavior is None else ["--behavior", behavior]
        result = run_cli(str(src), "-o", str(out), "--seed", "3", *args)
        assert result.exit_code == 0, result.output
        table = read_artifact(out, PAIRS).table.to_pylist()
        expected = ingest([src], behavior=behavior, seed=3).pairs
        assert table == [{f.name: getattr(p, f.name) for f in PAIRS.fields} for p in expected]
        assert {r["behavior"] for r in table} == {behavior_name(behavior) if behavior else "data"}


@FAST
@given(
    rows=unique_rows(),
    columns=st.permutations(["instruction", "chosen", "rejected", "a column", "ñ"]),
    blank_at=st.one_of(st.none(), st.integers(0, 7)),
    blank_field=st.sampled_from(FREEFORM_FIELDS),
)
def test_mapped_columns_give_the_same_pairs_and_errors_name_their_column(
    rows: list[Row], columns: list[str], blank_at: int | None, blank_field: str
) -> None:
    mapping = dict(zip(FREEFORM_FIELDS, columns, strict=False))
    renamed = [{mapping[k]: v for k, v in r.items()} for r in rows]
    with workdir() as d:
        plain, mapped = d / "a" / "pref.jsonl", d / "b" / "pref.jsonl"
        plain.parent.mkdir()
        mapped.parent.mkdir()
        write_rows(plain, rows)
        write_rows(mapped, renamed)
        assert content(ingest([mapped], mapping=mapping).pairs) == content(ingest([plain]).pairs)
        if blank_at is None or blank_at >= len(rows):
            return
        renamed[blank_at][mapping[blank_field]] = " "
        write_rows(mapped, renamed)
        with pytest.raises(InputError) as e:
            ingest([mapped], mapping=mapping)
        assert (e.value.where, e.value.field) == (f"line {blank_at + 1}", mapping[blank_field])


# --- ids and splits ------------------------------------------------------------------------------


@FAST
@given(
    rows=unique_rows(min_size=2, max_size=10),
    extra=unique_rows(max_size=10),
    order=st.randoms(use_true_random=False),
    test_fraction=st.floats(0.0, 0.99),
    seed=st.integers(-(2**40), 2**40),
)
def test_id_and_split_of_a_pair_do_not_depend_on_the_other_rows(
    rows: list[Row], extra: list[Row], order: Any, test_fraction: float, seed: int
) -> None:
    known = set(map(_key, rows))
    more = rows + [r for r in extra if _key(r) not in known]
    order.shuffle(more)
    with workdir() as d:
        small, big = d / "a" / "b.jsonl", d / "b" / "b.csv"
        small.parent.mkdir()
        big.parent.mkdir()
        write_rows(small, rows)
        write_rows(big, more)
        options = {"test_fraction": test_fraction, "seed": seed}
        before = {_key(r): c for r, c in zip(rows, content(ingest([small], **options).pairs), strict=True)}
        after = {_key(r): c for r, c in zip(more, content(ingest([big], **options).pairs), strict=True)}
        assert all(after[k] == c for k, c in before.items())
        again = content(ingest([small], **options).pairs)
        assert again == list(before.values())
        assert len({c[0] for c in after.values()}) == len(more)  # distinct rows, distinct ids


@FAST
@given(rows=unique_rows(max_size=6), repeats=st.lists(st.integers(0, 5), max_size=6))
def test_repeated_rows_are_dropped_and_named(rows: list[Row], repeats: list[int]) -> None:
    with_repeats = rows + [rows[i % len(rows)] for i in repeats]
    with workdir() as d:
        path = d / "d.jsonl"
        write_rows(path, with_repeats)
        result = ingest([path])
    assert [(p.prompt, p.positive, p.negative) for p in result.pairs] == [_key(r) for r in rows]
    assert len(result.duplicates) == len(repeats)
    for n, i in enumerate(repeats):
        message = result.duplicates[n]
        assert f"line {len(rows) + n + 1}: exact duplicate of " in message
        assert message.endswith(f"line {i % len(rows) + 1} (dropped)")


@st.composite
def same_when_joined(draw: st.DrawFn, sep: str = "\x1f") -> list[Row]:
    """Two different rows whose three texts, joined by ``sep``, give the same string."""
    words = draw(st.lists(st.text(st.sampled_from("ab "), min_size=1, max_size=2), min_size=4, max_size=6))
    cuts = [(i, j) for i in range(1, len(words) - 1) for j in range(i + 1, len(words))]
    rows = []
    for i, j in draw(st.lists(st.sampled_from(cuts), min_size=2, max_size=2, unique=True)):
        texts = [sep.join(words[:i]), sep.join(words[i:j]), sep.join(words[j:])]
        rows.append(dict(zip(FREEFORM_FIELDS, texts, strict=True)))
    if not all(all(map(str.strip, r.values())) and r["positive"] != r["negative"] for r in rows):
        return draw(st.nothing())  # a blank text or positive == negative: not two valid pairs
    return rows


@FAST
@example(
    rows=[
        {"prompt": "a\x1fb", "positive": "c", "negative": "d"},
        {"prompt": "a", "positive": "b\x1fc", "negative": "d"},
    ]
)
@given(
    rows=st.one_of(
        same_when_joined(),
        st.lists(
            freeform_rows(st.text(st.sampled_from("ab\x1f"), min_size=1, max_size=4).filter(str.strip)),
            min_size=2,
            max_size=6,
            unique_by=_key,
        ),
    )
)
def test_distinct_rows_are_never_dropped_as_duplicates(rows: list[Row]) -> None:
    """Rows that differ in any text are different pairs, whatever characters the texts hold."""
    with workdir() as d:
        path = d / "x.jsonl"
        write_rows(path, rows)
        result = ingest([path])
    assert result.duplicates == []
    assert [(p.prompt, p.positive, p.negative) for p in result.pairs] == [_key(r) for r in rows]
    assert len({p.pair_id for p in result.pairs}) == len(rows)


N_SPLIT = 2000


@SLOW
@given(salt=TEXT, test_fraction=st.floats(0.0, 0.99), smaller=st.floats(0.0, 1.0), seed=st.integers(0, 10**6))
def test_share_of_test_pairs_is_the_test_fraction_and_test_sets_nest(
    salt: str, test_fraction: float, smaller: float, seed: int
) -> None:
    rows = [{"prompt": f"{salt} {i}", "positive": "yes", "negative": "no"} for i in range(N_SPLIT)]
    with workdir() as d:
        path = d / "many.jsonl"
        write_rows(path, rows)
        big = {
            p.pair_id
            for p in ingest([path], test_fraction=test_fraction, seed=seed).pairs
            if p.split == "test"
        }
        small = {
            p.pair_id
            for p in ingest([path], test_fraction=test_fraction * smaller, seed=seed).pairs
            if p.split == "test"
        }
    # a hash-based split is a binomial draw: 6 standard deviations fail once in ~10^9 examples
    tolerance = 6 * math.sqrt(N_SPLIT * test_fraction * (1 - test_fraction)) + 1
    assert abs(len(big) - N_SPLIT * test_fraction) <= tolerance, (len(big), test_fraction)
    assert small <= big  # a smaller fraction only moves pairs from test to train
    if test_fraction * smaller == 0.0:
        assert small == set()


# --- invalid rows --------------------------------------------------------------------------------

DEFECTS = {
    ".jsonl": ("missing", "blank", "null", "not text", "identical", "malformed", "not an object"),
    ".json": ("missing", "blank", "null", "not text", "identical", "not an object"),
    ".csv": ("blank", "identical"),
    ".parquet": ("blank", "null", "identical"),
}


@dataclass(frozen=True)
class Defect:
    kind: str
    field: str
    blank: str
    junk: Any

    def apply(self, row: Row) -> tuple[Any, str | None, str]:
        """The spoiled row, the field the error must name (None: the whole row) and its problem."""
        f = self.field
        if self.kind == "missing":
            return {k: v for k, v in row.items() if k != f}, f, "missing field"
        if self.kind == "blank":
            return {**row, f: self.blank}, f, "empty text"
        if self.kind == "null":
            return {**row, f: None}, f, "missing value (null)"
        if self.kind == "not text":
            return {**row, f: self.junk}, f, "expected text, found "
        if self.kind == "identical":
            return {**row, "negative": row["positive"]}, "negative", "completions are identical"
        if self.kind == "malformed":
            return Malformed(json.dumps(row)[:-1]), None, "malformed JSON"
        assert self.kind == "not an object"
        return self.junk, None, "expected an object, found a JSON "


@dataclass(frozen=True)
class Case:
    suffix: str
    rows: list[Any]  # as written
    valid: list[Row]  # the rows ingest must keep, in order
    bad: list[tuple[int, str | None, str]]  # (row index, field, problem) of every bad row, in order


@st.composite
def cases(draw: st.DrawFn, suffix: st.SearchStrategy[str] = st.sampled_from(FORMATS)) -> Case:
    fmt = draw(suffix)
    defects = st.builds(Defect, st.sampled_from(DEFECTS[fmt]), st.sampled_from(FREEFORM_FIELDS), BLANK, JUNK)
    base = draw(unique_rows(min_size=1, max_size=8))
    spoil = draw(st.lists(st.one_of(st.none(), defects), min_size=len(base), max_size=len(base)))
    if all(s is None for s in spoil):
        spoil[draw(st.integers(0, len(base) - 1))] = draw(defects)
    rows, valid, bad = [], [], []
    for i, (row, defect) in enumerate(zip(base, spoil, strict=True)):
        if defect is None:
            rows.append(row)
            valid.append(row)
        else:
            spoiled, field, problem = defect.apply(row)
            rows.append(spoiled)
            bad.append((i, field, problem))
    return Case(fmt, rows, valid, bad)


def check_error(e: InputError, path: Path, suffix: str, spans: list[tuple[int, int]], bad: Any) -> None:
    index, field, problem = bad
    assert e.path == str(path)
    assert e.where in where_of(suffix, index, spans), (e.where, index)
    assert e.field == field
    assert problem in e.problem
    message = str(e)
    assert message.startswith(f"{path}: {e.where}: ")
    assert (f"field '{field}'" in message) == (field is not None)


@FAST
@given(case=cases())
def test_the_first_bad_row_raises_an_error_naming_file_row_and_field(case: Case) -> None:
    with workdir() as d:
        path = d / f"bad{case.suffix}"
        spans = write_rows(path, case.rows)
        with pytest.raises(InputError) as e:
            ingest([path])
    check_error(e.value, path, case.suffix, spans, case.bad[0])


@FAST
@given(case=cases())
def test_skip_invalid_keeps_exactly_the_valid_rows_and_lists_every_bad_one(case: Case) -> None:
    with workdir() as d:
        path = d / f"bad{case.suffix}"
        spans = write_rows(path, case.rows)
        if not case.valid:
            with pytest.raises(CaaError, match="no valid pairs"):
                ingest([path], skip_invalid=True)
            return
        result = ingest([path], skip_invalid=True)
    assert [(p.prompt, p.positive, p.negative) for p in result.pairs] == [_key(r) for r in case.valid]
    assert len(result.rejected) == len(case.bad)
    for e, bad in zip(result.rejected, case.bad, strict=True):
        check_error(e, path, case.suffix, spans, bad)


@FAST
@given(row=ab_rows(), side=st.sampled_from(["answer_matching_behavior", "answer_not_matching_behavior"]))
def test_an_ab_answer_that_is_not_a_choice_is_rejected(row: AbRow, side: str) -> None:
    listed = set(re.findall(r"(?m)^[ \t]*\(([A-Z])\)", row.row["question"]))
    missing = next(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in listed)
    with workdir() as d:
        path = d / "ab.json"
        write_rows(path, [row.row, {**row.row, side: f"({missing})"}])
        with pytest.raises(InputError) as e:
            ingest([path])
    assert (e.value.where, e.value.field) == ("index 1", side)
    assert f"answer '({missing})' is not one of the choices" in e.value.problem


@SLOW
@given(case=cases())
def test_cli_exits_2_on_a_bad_row_and_writes_nothing(case: Case) -> None:
    with workdir() as d:
        path, out = d / f"bad{case.suffix}", d / "pairs.parquet"
        write_rows(path, case.rows)
        result = run_cli(str(path), "-o", str(out))
        assert result.exit_code == 2, result.output
        assert f"error: {path}: " in result.output
        assert not out.exists()
        assert sorted(p.name for p in d.iterdir()) == [path.name]  # no pairs.parquet.tmp either
