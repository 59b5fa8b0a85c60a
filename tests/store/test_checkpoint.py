"""caa.store.checkpoint: the finished pieces of a long run, continued on resume, refused when the
run's identity changed, merged in order."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from caa.errors import CaaError, MismatchError
from caa.store.checkpoint import Checkpoint, check_fresh, merged_pieces, partial_dir, remove


def _piece(start: int, n: int) -> pa.Table:
    return pa.table({"item": list(range(start, start + n))})


def test_partial_dir_and_check_fresh(tmp_path: Path) -> None:
    out = tmp_path / "acts.parquet"
    assert partial_dir(out) == tmp_path / "acts.parquet.partial"
    check_fresh(out, resume=False)  # nothing there: fine
    partial_dir(out).mkdir()
    with pytest.raises(CaaError, match="holds an interrupted run: add --resume"):
        check_fresh(out, resume=False)
    check_fresh(out, resume=True)
    partial_dir(out).rmdir()
    partial_dir(out).write_text("")
    with pytest.raises(CaaError, match="is a file"):
        check_fresh(out, resume=True)


def test_pieces_are_continued_and_merged_in_order(tmp_path: Path) -> None:
    out = tmp_path / "acts.parquet"
    identity = {"model": "m", "layers": (1, 2)}
    first = Checkpoint(out, identity)
    assert first.done == 0
    first.add(3, _piece(0, 3))
    first.add(2, _piece(3, 2))
    assert [(a, b) for a, b, _ in first.pieces()] == [(0, 3), (3, 5)]
    again = Checkpoint(out, identity)  # a tuple reads back from run.json as a list: still equal
    assert again.done == 5 and again.discarded == []
    again.add(1, _piece(5, 1))
    other = Checkpoint(out, identity, rank=1)
    other.add(2, _piece(100, 2))
    merged = pa.concat_tables(merged_pieces(out, ranks=2))
    assert merged.column("item").to_pylist() == [0, 1, 2, 3, 4, 5, 100, 101]
    remove(out)
    assert not partial_dir(out).exists()


def test_resume_with_another_identity_is_refused_naming_the_field(tmp_path: Path) -> None:
    out = tmp_path / "acts.parquet"
    Checkpoint(out, {"model": "m", "batch": 4})
    with pytest.raises(MismatchError) as e:
        Checkpoint(out, {"model": "other", "batch": 4})
    assert 'field \'model\' was "m" in the interrupted run and is "other" now' in str(e.value)
    with pytest.raises(MismatchError, match="field 'extra' was null"):
        Checkpoint(out, {"model": "m", "batch": 4, "extra": 1})


def test_unreadable_piece_and_the_pieces_after_it_are_redone(tmp_path: Path) -> None:
    out = tmp_path / "acts.parquet"
    cp = Checkpoint(out, {})
    for start in (0, 2, 4):
        cp.add(2, _piece(start, 2))
    names = [p.name for _, _, p in cp.pieces()]
    (cp.dir / names[1]).write_bytes(b"truncated")
    (cp.dir / ".stray.tmp").write_bytes(b"half a piece")
    again = Checkpoint(out, {})
    assert again.done == 2
    assert [p.name for _, _, p in again.pieces()] == names[:1]
    assert len(again.discarded) == 1 and again.discarded[0].startswith(f"{names[1]}: not readable Parquet")
    assert not list(again.dir.glob("*.tmp"))


def test_a_gap_in_the_pieces_is_redone_from_the_gap(tmp_path: Path) -> None:
    out = tmp_path / "acts.parquet"
    cp = Checkpoint(out, {})
    cp.add(2, _piece(0, 2))
    pq.write_table(_piece(5, 1), cp.dir / "items-000000005-000000006.parquet")
    again = Checkpoint(out, {})
    assert again.done == 2
    assert "expected a piece starting at item 2" in again.discarded[0]


def test_merged_pieces_names_a_rank_that_never_started_and_deletes_a_bad_piece(tmp_path: Path) -> None:
    out = tmp_path / "acts.parquet"
    cp = Checkpoint(out, {})
    cp.add(1, _piece(0, 1))
    with pytest.raises(CaaError, match="rank1: missing; the run of rank 1 did not start"):
        list(merged_pieces(out, ranks=2))
    bad = next(cp.pieces())[2]
    bad.write_bytes(b"x")
    with pytest.raises(CaaError, match=r"unreadable .*--resume to redo its batch"):
        list(merged_pieces(out, ranks=1))
    assert not bad.exists()
