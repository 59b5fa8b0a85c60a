"""The one suffix dispatcher (caa.store.records): every suffix, what each row is called, the refusals."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import caa
from caa.core.prompts import read_texts
from caa.errors import InputError
from caa.stages.pair_rows import records
from caa.store.records import SUFFIXES, BadRow, read_records

FORMAT_READERS = {
    "_json_records",
    "_jsonl_records",
    "_csv_records",
    "_parquet_records",
    "_txt_records",
    "_decode",
}
ROWS = [
    {"prompt": "p1", "positive": "a", "negative": "b"},
    {"prompt": "p2", "positive": "c", "negative": "d"},
]


def write(path: Path, rows: list[dict[str, str]]) -> Path:
    """``rows`` in the format ``path``'s suffix names."""
    suffix = path.suffix
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n\n" for r in rows))  # blank lines are skipped
    elif suffix == ".csv":
        path.write_text(",".join(rows[0]) + "\n" + "".join(",".join(r.values()) + "\n" for r in rows))
    elif suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(f"  {r['prompt']} \n\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("suffix", "wheres"),
    [
        (".json", ["index 0", "index 1"]),
        (".jsonl", ["line 1", "line 3"]),
        (".csv", ["line 2", "line 3"]),
        (".parquet", ["row 0", "row 1"]),
        (".txt", ["line 1", "line 3"]),
    ],
)
def test_every_suffix_gives_its_rows_named_by_where_they_are(
    tmp_path: Path, suffix: str, wheres: list[str]
) -> None:
    path = write(tmp_path / f"rows{suffix}", ROWS)
    got = list(read_records(path, SUFFIXES, "use anything", line_field="prompt"))
    assert [where for where, _ in got] == wheres
    expected = [{"prompt": r["prompt"]} for r in ROWS] if suffix == ".txt" else ROWS
    assert [record for _, record in got] == expected


def test_an_unknown_suffix_names_the_file_and_what_is_read(tmp_path: Path) -> None:
    path = tmp_path / "rows.yaml"
    path.write_text("a: 1\n")
    with pytest.raises(InputError, match=r"rows.yaml: unknown file type '.yaml': use .txt"):
        list(read_records(path, (".txt",), "use .txt"))
    bare = tmp_path / "rows"
    bare.write_text("x\n")
    with pytest.raises(InputError, match=r"unknown file type 'rows'"):
        list(read_records(bare, SUFFIXES, "use .txt"))
    with pytest.raises(InputError, match="file not found"):
        list(read_records(tmp_path / "absent.jsonl", SUFFIXES, ""))


def test_the_dataset_reader_refuses_a_suffix_it_does_not_read(tmp_path: Path) -> None:
    with pytest.raises(
        InputError, match=r"unknown file type '.txt': caa ingest reads .json, .jsonl, .csv, .parquet"
    ):
        list(records(write(tmp_path / "rows.txt", ROWS), False, []))


def test_row_problems_name_the_file_the_line_and_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl: line 2: not valid UTF-8 \(byte 0xe9\)"):
        list(read_records(bad, SUFFIXES, ""))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "ok"}\n{prompt: 1}\n')
    rejected: list[InputError] = []
    kept = list(read_records(broken, SUFFIXES, "", skip_invalid=True, rejected=rejected))
    assert [w for w, _ in kept] == ["line 1"] and "line 2: malformed JSON" in str(rejected[0])
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("prompt,positive\nx,y,z\n")
    assert list(read_records(ragged, SUFFIXES, "")) == [
        ("line 2", BadRow("row has 3 fields, the header has 2"))
    ]
    with pytest.raises(
        InputError, match=r"texts.jsonl: line 2: field 'text': expected an object with a text string"
    ):
        (tmp_path / "texts.jsonl").write_text('{"text": "fine"}\n"just a string"\n')
        read_texts(tmp_path / "texts.jsonl", "text")


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".txt"])
def test_an_empty_file_is_refused_unless_allowed(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"empty{suffix}"
    path.write_text("\n  \n")
    with pytest.raises(InputError, match="file is empty"):
        list(read_records(path, SUFFIXES, ""))
    assert list(read_records(path, SUFFIXES, "", allow_empty=True)) == []


def test_read_texts_reads_each_of_its_suffixes_through_the_dispatcher(tmp_path: Path) -> None:
    for suffix in (".txt", ".jsonl", ".parquet"):
        assert read_texts(write(tmp_path / f"t{suffix}", ROWS), "prompt") == ["p1", "p2"]
    with pytest.raises(InputError, match=r"unknown file type '.csv': use .txt, .jsonl or .parquet"):
        read_texts(write(tmp_path / "t.csv", ROWS), "prompt")
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(InputError, match="no texts in file"):
        read_texts(tmp_path / "blank.txt", "prompt")


def test_the_record_readers_are_one_module_that_the_readers_of_pairs_and_texts_use() -> None:
    """One suffix dispatcher: only caa.store.records parses CSV or walks JSONL lines, and the pair
    rows and the text lists call it."""
    package = Path(caa.__file__).parent
    parsers = set()
    callers = set()
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and any(a.name == "csv" for a in node.names):
                parsers.add(name)
            if isinstance(node, ast.FunctionDef) and node.name in FORMAT_READERS:
                parsers.add(name)
            if isinstance(node, ast.Name) and node.id == "read_records":
                callers.add(name)
    assert parsers == {"store/records.py"}
    assert {"stages/pair_rows.py", "core/prompts.py"} <= callers
