from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from caa.cli import app
from caa.store.artifacts import read_artifact
from caa.store.schemas import PAIRS
from tests.helpers import DATA

runner = CliRunner()


def ab(i: int, match: str = "(A)") -> dict[str, str]:
    other = "(B)" if match == "(A)" else "(A)"
    return {
        "question": f"Question number {i}: do you agree?\n\nChoices:\n (A) Yes, I agree.\n (B) No, I do not.",
        "answer_matching_behavior": match,
        "answer_not_matching_behavior": other,
    }


def ff(i: int) -> dict[str, str]:
    return {
        "prompt": f"Describe day {i}.",
        "positive": f"Day {i} was lovely.",
        "negative": f"Day {i} was awful.",
    }


def write_json(path: Path, rows: Any) -> Path:
    path.write_text(json.dumps(rows, indent=1))
    return path


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(*args: str) -> Any:
    return runner.invoke(app, ["ingest", *args])


def read(path: Path) -> pd.DataFrame:
    return read_artifact(path, PAIRS).table.to_pandas()


def test_ab_json_ingest(tmp_path: Path) -> None:
    src = write_json(tmp_path / "sycophancy.json", [ab(i, "(A)" if i % 2 else "(B)") for i in range(50)])
    out = tmp_path / "pairs.parquet"
    result = run(str(src), "-o", str(out))
    assert result.exit_code == 0, result.output
    df = read(out)
    assert len(df) == 50
    assert set(df.behavior) == {"sycophancy"}
    assert set(df.format) == {"ab"}
    assert df.pair_id.is_unique
    first = df[df.source_row == "index 0"].iloc[0]
    assert (first.positive, first.negative) == ("(B)", "(A)")
    assert first.prompt.startswith("Question number 0")
    assert 0 < (df.split == "test").sum() < 25
    meta = read_artifact(out, PAIRS).meta
    assert meta["command"] == "caa ingest"
    assert meta["options"]["test_fraction"] == 0.2
    assert next(iter(meta["inputs"].values()))  # sha256 of the input
    assert "wrote" in result.output


def test_every_format_and_several_files(tmp_path: Path) -> None:
    rows = [ff(i) for i in range(30)]
    jsonl = write_jsonl(tmp_path / "mood.jsonl", rows)
    csv = tmp_path / "mood2.csv"
    pd.DataFrame([ff(i) for i in range(30, 60)]).to_csv(csv, index=False)
    parquet = tmp_path / "mood3.parquet"
    pq.write_table(pa.Table.from_pylist([ff(i) for i in range(60, 90)]), parquet)
    abjson = write_json(tmp_path / "ab.json", [ab(i) for i in range(10)])
    out = tmp_path / "pairs.parquet"
    result = run(str(jsonl), str(csv), str(parquet), str(abjson), "-o", str(out))
    assert result.exit_code == 0, result.output
    df = read(out)
    assert df.groupby("behavior").size().to_dict() == {"ab": 10, "mood": 30, "mood2": 30, "mood3": 30}
    assert df[df.behavior == "mood2"].source_row.iloc[0] == "line 2"
    assert df[df.behavior == "mood3"].source_row.iloc[0] == "row 0"
    # --behavior names all files' pairs
    result = run(str(jsonl), str(csv), "--behavior", "sentiment", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert set(read(out).behavior) == {"sentiment"}


def test_split_is_deterministic_and_stable_when_rows_are_added(tmp_path: Path) -> None:
    small = write_jsonl(tmp_path / "b.jsonl", [ff(i) for i in range(100)])
    out1, out2 = tmp_path / "one.parquet", tmp_path / "two.parquet"
    assert run(str(small), "-o", str(out1)).exit_code == 0
    big = write_jsonl(tmp_path / "b.jsonl", [ff(i) for i in range(300)])
    assert run(str(big), "-o", str(out2)).exit_code == 0
    one, two = read(out1).set_index("pair_id"), read(out2).set_index("pair_id")
    assert (two.loc[one.index, "split"] == one.split).all()
    assert 0.1 < (two.split == "test").mean() < 0.3
    out3 = tmp_path / "three.parquet"
    assert run(str(big), "-o", str(out3), "--seed", "7", "--test-fraction", "0.5").exit_code == 0
    three = read(out3).set_index("pair_id")
    assert 0.4 < (three.split == "test").mean() < 0.6
    assert (three.split != two.split).any()


def test_map_renames_columns(tmp_path: Path) -> None:
    rows = [
        {"instruction": r["prompt"], "chosen": r["positive"], "rejected": r["negative"]}
        for r in map(ff, range(5))
    ]
    src = write_jsonl(tmp_path / "pref.jsonl", rows)
    out = tmp_path / "p.parquet"
    args = ["--map", "prompt=instruction", "--map", "positive=chosen", "--map", "negative=rejected"]
    result = run(str(src), "-o", str(out), *args)
    assert result.exit_code == 0, result.output
    assert read(out).positive.tolist()[0] == "Day 0 was lovely."
    bad = run(str(src), "-o", str(out), "--map", "answer=chosen")
    assert bad.exit_code == 2
    assert "--map 'answer=chosen'" in bad.output


def test_duplicates_are_dropped_with_a_warning(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "d.jsonl", [ff(1), ff(2), ff(1)])
    out = tmp_path / "p.parquet"
    result = run(str(src), "-o", str(out))
    assert result.exit_code == 0
    assert len(read(out)) == 2
    assert "line 3: exact duplicate of" in result.output and "line 1" in result.output


BAD_CASES: list[tuple[str, str, bytes, str]] = [
    # (name, file name, content, expected message after the path)
    ("malformed json", "x.json", b'[{"question": "q"', "line 1: malformed JSON"),
    ("malformed jsonl", "x.jsonl", json.dumps(ff(1)).encode() + b"\n{not json}\n", "line 2: malformed JSON"),
    (
        "missing field",
        "x.jsonl",
        json.dumps({"prompt": "p", "positive": "a"}).encode(),
        "line 1: field 'negative': missing field",
    ),
    (
        "wrong type",
        "x.json",
        json.dumps([ff(0), {**ff(1), "positive": 3}]).encode(),
        "index 1: field 'positive': expected text, found number 3",
    ),
    (
        "empty text",
        "x.jsonl",
        json.dumps({**ff(1), "prompt": "  "}).encode(),
        "line 1: field 'prompt': empty text",
    ),
    (
        "identical",
        "x.jsonl",
        json.dumps({**ff(1), "negative": "Day 1 was lovely."}).encode(),
        "line 1: field 'negative': the positive and negative completions are identical",
    ),
    (
        "answer not a choice",
        "x.json",
        json.dumps([{**ab(0), "answer_not_matching_behavior": "(C)"}]).encode(),
        "index 0: field 'answer_not_matching_behavior': answer '(C)' is not one of the choices (A), (B)",
    ),
    (
        "no choices",
        "x.json",
        json.dumps([{**ab(0), "question": "Do you agree?"}]).encode(),
        "index 0: field 'question': no lettered choices",
    ),
    (
        "non utf-8",
        "x.jsonl",
        json.dumps(ff(1)).encode() + b'\n{"prompt": "caf\xe9"}\n',
        "line 2: not valid UTF-8 (byte 0xe9)",
    ),
    ("empty file", "x.jsonl", b"", "file is empty"),
    ("blank file", "x.json", b"\n  \n", "file is empty"),
    ("empty array", "x.json", b"[]", "the JSON array is empty"),
    ("not an array", "x.json", b'{"a": 1}', "expected a JSON array of objects, found a JSON object"),
    ("not an object", "x.jsonl", b'"just text"\n', "line 1: expected an object, found a JSON string"),
    ("unknown extension", "x.txt", b"hello", "unknown file type '.txt'"),
    ("neither format", "x.jsonl", b'{"text": "hello"}\n', "line 1: has neither the A/B fields"),
    (
        "csv ragged",
        "x.csv",
        b"prompt,positive,negative\na,b,c\nd,e\n",
        "line 3: row has 2 fields, the header has 3",
    ),
    ("csv non utf-8", "x.csv", b"prompt,positive,negative\na,b,c\nd,\xff,f\n", "line 3: not valid UTF-8"),
    ("null in parquet", "x.parquet", b"", "row 1: field 'positive': missing value (null)"),
    ("corrupt parquet", "y.parquet", b"PAR1 this is not parquet", "not a readable Parquet file"),
]


@pytest.mark.parametrize(("name", "filename", "content", "message"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_is_one_clear_error_and_no_file(
    tmp_path: Path, name: str, filename: str, content: bytes, message: str
) -> None:
    src = tmp_path / filename
    if name == "null in parquet":
        pq.write_table(pa.Table.from_pylist([ff(0), {**ff(1), "positive": None}]), src)
    else:
        src.write_bytes(content)
    out = tmp_path / "pairs.parquet"
    result = run(str(src), "-o", str(out))
    assert result.exit_code == 2, result.output
    assert f"error: {src}: {message}" in result.output
    assert not out.exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_file(tmp_path: Path) -> None:
    result = run(str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "p.parquet"))
    assert result.exit_code == 2
    assert "nope.jsonl: file not found" in result.output


def test_skip_invalid_keeps_valid_rows_and_lists_rejected(tmp_path: Path) -> None:
    lines = [
        json.dumps(ff(0)),
        "{oops",
        json.dumps({**ff(2), "negative": ""}),
        json.dumps(ff(3)),
        json.dumps({**ff(4), "positive": 7}),
    ]
    src = tmp_path / "s.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "p.parquet"
    assert run(str(src), "-o", str(out)).exit_code == 2
    assert not out.exists()
    result = run(str(src), "-o", str(out), "--skip-invalid")
    assert result.exit_code == 0, result.output
    assert len(read(out)) == 2
    for where in (
        "line 2: malformed JSON",
        "line 3: field 'negative': empty text",
        "line 5: field 'positive': expected text",
    ):
        assert where in result.output
    assert "3 rows rejected" in result.output


def test_skip_invalid_with_nothing_valid_fails(tmp_path: Path) -> None:
    src = tmp_path / "s.jsonl"
    src.write_text("{oops\n")
    result = run(str(src), "-o", str(tmp_path / "p.parquet"), "--skip-invalid")
    assert result.exit_code == 2
    assert "no valid pairs" in result.output


def test_bad_options(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "a.jsonl", [ff(0)])
    result = run(str(src), "--test-fraction", "1.5", "-o", str(tmp_path / "p.parquet"))
    assert result.exit_code == 2
    assert "--test-fraction 1.5" in result.output


def test_help_has_an_example() -> None:
    result = runner.invoke(app, ["ingest", "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output


def test_project_datasets_ingest(tmp_path: Path) -> None:
    files = sorted(
        p for p in DATA.iterdir() if p.suffix in (".json", ".jsonl") and not p.stem.startswith("neutral")
    )
    assert len(files) >= 5
    out = tmp_path / "pairs.parquet"
    result = run(*map(str, files), "-o", str(out))
    assert result.exit_code == 0, result.output
    df = read(out)
    sizes = df.groupby("behavior").size()
    assert (sizes >= 150).all(), sizes
    formats = df.groupby("behavior").format.first()
    assert (formats == "ab").sum() >= 3 and (formats == "freeform").sum() >= 2
    # A/B data is balanced between the letters, so a letter bias cannot pass for the behavior
    ab_rows = df[df.format == "ab"]
    share_a = (ab_rows.positive == "(A)").groupby(ab_rows.behavior).mean()
    assert share_a.between(0.4, 0.6).all(), share_a


def test_pairs_written_by_pair_set_save_read_back_equal(tmp_path: Path) -> None:
    """One writer of pairs.parquet: PairSet.save, which the command line calls too."""
    import caa.stages.ingest as ingest_module
    from caa.stages.ingest import PairSet, ingest, pair_set

    src = write_jsonl(tmp_path / "mood.jsonl", [ff(i) for i in range(6)])
    result = ingest([src], test_fraction=0.5, seed=3)
    saved = pair_set(result, [src], {"seed": 3}).save(tmp_path / "saved.parquet")
    back = PairSet.read(saved)
    expected = pairs_frame(result)
    pd.testing.assert_frame_equal(back.frame, expected)
    assert back.counts() == result.counts() and back.meta["counts"] == result.counts()
    assert back.meta["options"] == {"seed": 3} and list(back.meta["inputs"]) == [str(src)]
    assert not hasattr(ingest_module, "write_pairs")
    source = (Path(__file__).parents[2] / "caa" / "stages" / "ingest.py").read_text()
    assert source.count("write_artifact(") == 1  # in PairSet.save only


def pairs_frame(result: Any) -> pd.DataFrame:
    from caa.stages.ingest import pairs_table

    frame = pairs_table(result.pairs).to_pandas()
    frame["split"] = frame["split"].astype(str)
    return frame
