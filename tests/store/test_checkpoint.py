"""caa.store.checkpoint: the finished pieces of a long run, continued on resume, refused when the
run's identity changed, merged in order."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from caa.errors import CaaError, MismatchError
from caa.store.checkpoint import (
    Checkpoint,
    RunLock,
    check_fresh,
    clear_if_empty,
    has_pieces,
    merged_pieces,
    partial_dir,
    remove,
)


def _piece(start: int, n: int) -> pa.Table:
    return pa.table({"item": list(range(start, start + n))})


def test_partial_dir_and_check_fresh(tmp_path: Path) -> None:
    out = tmp_path / "acts.parquet"
    assert partial_dir(out) == tmp_path / "acts.parquet.partial"
    check_fresh(out, resume=False)  # nothing there: fine
    Checkpoint(out, {}).add(1, _piece(0, 1))
    with pytest.raises(CaaError, match="holds an interrupted run: add --resume"):
        check_fresh(out, resume=False)
    check_fresh(out, resume=True)
    remove(out)
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
    other = Checkpoint(out, identity, rank=1, work=[(6, 8)])
    other.add(2, _piece(6, 2))
    merged = pa.concat_tables(merged_pieces(out, ranks=2, total=8))
    assert merged.column("item").to_pylist() == list(range(8))
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
        list(merged_pieces(out, ranks=2, total=1))
    bad = next(cp.pieces())[2]
    bad.write_bytes(b"x")
    with pytest.raises(CaaError, match=r"unreadable .*--resume to redo its batch"):
        list(merged_pieces(out, ranks=1, total=1))
    assert not bad.exists()


def test_pieces_follow_the_ranks_work_list_and_merge_in_item_order(tmp_path: Path) -> None:
    """Two ranks share batches [0, 2) [2, 4) [4, 6) [6, 7) out: each names its pieces by the items
    they cover, resumes inside its own list, and the merge is the one-process order."""
    out = tmp_path / "acts.parquet"
    a = Checkpoint(out, {}, rank=0, work=[(0, 2), (4, 6)])
    b = Checkpoint(out, {}, rank=1, work=[(2, 4), (6, 7)])
    assert a.todo() == [(0, 2), (4, 6)] and b.todo() == [(2, 4), (6, 7)]
    a.add(2, _piece(0, 2))
    a.add(1, _piece(4, 1))  # half a batch (out of memory, halved)
    b.add(2, _piece(2, 2))
    assert [p.name for _, _, p in a.pieces()] == [
        "items-000000000-000000002.parquet",
        "items-000000004-000000005.parquet",
    ]
    again = Checkpoint(out, {}, rank=0, work=[(0, 2), (4, 6)])
    assert (again.done, again.todo(), again.discarded) == (3, [(5, 6)], [])
    again.add(1, _piece(5, 1))
    assert again.todo() == []
    with pytest.raises(CaaError, match=r"the pieces cover items 0 to 6 of 7"):
        list(merged_pieces(out, ranks=2, total=7))
    Checkpoint(out, {}, rank=1, work=[(2, 4), (6, 7)]).add(1, _piece(6, 1))
    merged = pa.concat_tables(merged_pieces(out, ranks=2, total=7))
    assert merged.column("item").to_pylist() == list(range(7))


def test_a_piece_outside_the_ranks_work_is_redone(tmp_path: Path) -> None:
    out = tmp_path / "acts.parquet"
    cp = Checkpoint(out, {}, work=[(0, 2), (4, 6)])
    cp.add(2, _piece(0, 2))
    pq.write_table(_piece(2, 2), cp.dir / "items-000000002-000000004.parquet")  # another rank's batch
    again = Checkpoint(out, {}, work=[(0, 2), (4, 6)])
    assert again.done == 2 and again.todo() == [(4, 6)]
    assert "expected a piece starting at item 4" in again.discarded[0]


def test_merge_refuses_overlapping_pieces_never_a_row_more(tmp_path: Path) -> None:
    out = tmp_path / "acts.parquet"
    Checkpoint(out, {}, rank=0, work=[(0, 4)]).add(4, _piece(0, 4))
    stray = Checkpoint(out, {}, rank=1, work=[(2, 4)])
    stray.add(2, _piece(2, 2))
    with pytest.raises(CaaError, match=r"000000004.parquet: covers items 2 to 4, where item 4"):
        list(merged_pieces(out, ranks=2, total=4))


def test_pieces_without_a_run_record_are_deleted_not_merged(tmp_path: Path) -> None:
    """Two runs at once once left a rank's pieces without its run.json: they are another run's."""
    out = tmp_path / "acts.parquet"
    cp = Checkpoint(out, {"model": "m"})
    cp.add(2, _piece(0, 2))
    (cp.dir / "run.json").unlink()
    again = Checkpoint(out, {"model": "m"})
    assert again.done == 0 and list(again.pieces()) == []
    assert again.discarded == [
        f"{cp.dir}: 1 finished pieces without the run's record (run.json), written by another run; "
        "deleted, to redo"
    ]


def test_a_second_run_on_the_output_is_refused_while_the_first_holds_its_lock(tmp_path: Path) -> None:
    out = tmp_path / "acts.parquet"
    first = RunLock(out, 0)
    assert first.held
    second = RunLock(out, 0)  # another open file: another run, even in this process
    assert not second.held
    second.release()
    for resume in (False, True):
        with pytest.raises(CaaError, match=rf"{out}: another run is using it \(it holds the lock in"):
            check_fresh(out, resume)
    first.release()
    check_fresh(out, resume=False)
    assert RunLock(out, 0).held  # a lock dies with its holder (here: closed)


def test_a_partial_directory_without_a_finished_piece_is_no_run(tmp_path: Path) -> None:
    """A run that failed in its first batch (a full disk) left rank0/run.json and no piece: a
    plain rerun starts afresh, even with other options."""
    out = tmp_path / "acts.parquet"
    Checkpoint(out, {"batch": 4})
    assert not has_pieces(out)
    check_fresh(out, resume=False)
    clear_if_empty(out)
    assert Checkpoint(out, {"batch": 8}).done == 0  # no run.json of batch 4 left to refuse it
