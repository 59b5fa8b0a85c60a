"""The finished pieces of a long run, kept so that an interrupted run can continue (``--resume``).

A run writing ``out.parquet`` keeps its pieces in ``out.parquet.partial/rank<R>/``, one Parquet file
per finished batch, named by the range of work items it covers (``items-000000480-000000512``; items
are numbered over the whole run, so the pieces of every rank, sorted, are the run in order). Each rank
holds a lock on ``rank<R>.lock`` there for as long as it runs: a second run on the same output is
refused, not mixed in.
Every piece is written to a unique temporary name, synced to disk and renamed, so a killed process
leaves no piece that looks finished; a piece that cannot be read on resume (a disk that lost it) is
deleted and its batch done again. Each rank's ``run.json`` holds what the results depend on (inputs,
model, options); a resume with anything different is refused, naming the field. When every rank has
finished, the main process merges the pieces in order into ``out.parquet`` and removes the directory.
A directory with no finished piece (a run that failed in its first batch) counts as absent.
"""

from __future__ import annotations

import fcntl
import json
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from caa.errors import CaaError, MismatchError
from caa.store.files import atomic_path, write_atomic

_PIECE = re.compile(r"items-(\d{9})-(\d{9})\.parquet")


def partial_dir(out: Path) -> Path:
    """Where the pieces of a run writing ``out`` live."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def check_fresh(out: Path, resume: bool) -> None:
    """Refuse to start over an interrupted run unless resuming (its pieces may hold hours of work),
    and a run on an output another run is using. A directory with no finished piece is no run."""
    root = partial_dir(out)
    _refuse_a_file(root)
    for lock in sorted(root.glob("rank*.lock")) if root.is_dir() else []:
        with lock.open("a+b") as probe:  # closing it drops the lock again
            try:
                fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise busy_error(out) from None
    refuse_interrupted(out, resume)


def refuse_interrupted(out: Path, resume: bool) -> None:
    """:func:`check_fresh` without looking at the locks (for a run that holds them).

    Under several processes, every rank calls this before any rank creates a :class:`Checkpoint`."""
    root = partial_dir(out)
    _refuse_a_file(root)
    if not resume and has_pieces(out):
        raise CaaError(
            f"{root} holds an interrupted run: add --resume to continue it, "
            "or delete that directory to start again"
        )


def has_pieces(out: Path) -> bool:
    """Whether ``out.partial/`` holds a finished piece of any rank."""
    root = partial_dir(out)
    return root.is_dir() and any(_PIECE.fullmatch(p.name) for p in root.glob("rank*/items-*.parquet"))


def clear_if_empty(out: Path) -> None:
    """Start afresh where no piece was finished: a run that failed in its first batch is no run to
    resume, and its ``run.json`` no identity to hold a new run to. The lock files stay."""
    if not has_pieces(out):
        for directory in partial_dir(out).glob("rank*/"):
            shutil.rmtree(directory, ignore_errors=True)


def busy_error(out: Path) -> CaaError:
    return CaaError(
        f"{out}: another run is using it (it holds the lock in {partial_dir(out)}); "
        "wait for that run to end, or write another file"
    )


def _refuse_a_file(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise CaaError(f"{root}: is a file; caa extract keeps its unfinished batches there: move it away")


class RunLock:
    """This rank's hold on ``out.partial/rank<R>.lock`` (an exclusive ``flock``, released when the
    process ends, however it ends): ``held`` is False when another process holds it."""

    def __init__(self, out: Path, rank: int) -> None:
        root = partial_dir(out)
        _refuse_a_file(root)
        root.mkdir(parents=True, exist_ok=True)
        self._file = (root / f"rank{rank}.lock").open("a+b")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.held = True
        except BlockingIOError:
            self.held = False

    def release(self) -> None:
        self._file.close()  # closing the file drops the lock


class Checkpoint:
    """One rank's pieces of a run writing ``out``; ``identity`` is everything the results depend on.

    ``work``: the ranges of items (``[start, stop)``, in the order they are run) this rank covers;
    None: every item from 0 on. Pieces found on disk are continued from (the caller checked
    :func:`check_fresh`) once their ``run.json`` matches ``identity``; pieces without a ``run.json``
    were written by another run, and are deleted.
    """

    def __init__(
        self,
        out: Path,
        identity: Mapping[str, Any],
        rank: int = 0,
        work: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        self.out = Path(out)
        self.root = partial_dir(self.out)
        self.dir = self.root / f"rank{rank}"
        self.identity = json.loads(json.dumps(identity))  # as it will read back from run.json
        self.work = [(int(a), int(b)) for a, b in work] if work is not None else [(0, 1 << 62)]
        self.cursor = self.work[0][0] if self.work else 0  # where the next piece starts
        self.done = 0  # items finished, from the start of the rank's work list
        self.discarded: list[str] = []  # why pieces found on disk were deleted, to be redone
        run_file = self.dir / "run.json"
        if run_file.exists():
            self._check(run_file)
            self._finished()
        else:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:  # a read-only or full output directory
                raise CaaError(f"{self.dir}: cannot be created ({e.strerror or e})") from None
            self._unrecorded()
            write_atomic(run_file, json.dumps(self.identity, indent=1).encode())

    def _check(self, run_file: Path) -> None:
        try:
            before = json.loads(run_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CaaError(f"{run_file}: unreadable ({e}); delete {self.root} to start again") from None
        for key in sorted(set(before) | set(self.identity)):
            if before.get(key) != self.identity.get(key):
                raise MismatchError(
                    f"cannot resume {self.root}: field '{key}' was {_short(before.get(key))} in the "
                    f"interrupted run and is {_short(self.identity.get(key))} now; rerun with the same "
                    f"inputs and options, or delete {self.root} to start again"
                )

    def _unrecorded(self) -> None:
        """Delete pieces that no ``run.json`` vouches for: another run's, not this one's to merge."""
        found = list(self.pieces())
        for _, _, path in found:
            path.unlink()
        if found:
            self.discarded.append(
                f"{self.dir}: {len(found)} finished pieces without the run's record (run.json), "
                "written by another run; deleted, to redo"
            )

    def _finished(self) -> None:
        """Move the cursor over the finished pieces that follow the work list without a gap from its
        start and can be read; the first piece that breaks the run, and every piece after it, is
        deleted to be redone."""
        for stray in self.dir.glob("*.tmp"):
            stray.unlink()  # a piece being written when the run was killed
        pieces = list(self.pieces())
        for i, (start, stop, path) in enumerate(pieces):
            problem = (
                f"expected a piece starting at item {self.cursor}"
                if start != self.cursor or stop > self._range_end()
                else _unreadable(path)
            )
            if problem:
                for _, _, later in pieces[i:]:
                    later.unlink()
                self.discarded.append(f"{path.name}: {problem}; deleted, with the pieces after it, to redo")
                break
            self._advance(stop - start)

    def _range_end(self) -> int:
        return next((b for a, b in self.work if a <= self.cursor < b), self.cursor)

    def _advance(self, items: int) -> None:
        end = self._range_end()
        self.cursor += items
        self.done += items
        if self.cursor >= end:
            self.cursor = next((a for a, _ in self.work if a >= end), self.cursor)

    def todo(self) -> list[tuple[int, int]]:
        """The ranges of the work list not finished yet, in order."""
        return [(max(a, self.cursor), b) for a, b in self.work if b > self.cursor]

    def pieces(self) -> Iterator[tuple[int, int, Path]]:
        """(first item, end item, file) of every finished piece, in order."""
        yield from _pieces_in(self.dir)

    def add(self, items: int, table: pa.Table) -> None:
        """Keep a finished piece covering the next ``items`` work items."""
        path = self.dir / f"items-{self.cursor:09d}-{self.cursor + items:09d}.parquet"
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        self._advance(items)


def _pieces_in(directory: Path) -> list[tuple[int, int, Path]]:
    found = []
    for path in directory.iterdir():
        match = _PIECE.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), int(match.group(2)), path))
    return sorted(found)


def merged_pieces(out: Path, ranks: int, total: int) -> Iterator[pa.Table]:
    """Every piece of every rank, in the order of the items they cover, which must be exactly
    ``[0, total)``: a missing piece, or a piece of another run, is an error, never a row more."""
    root = partial_dir(out)
    found = []
    for rank in range(ranks):
        directory = root / f"rank{rank}"
        if not (directory / "run.json").exists():
            raise CaaError(f"{directory}: missing; the run of rank {rank} did not start")
        found += _pieces_in(directory)
    end = 0
    for start, stop, path in sorted(found):
        if start != end:
            raise CaaError(
                f"{path}: covers items {start} to {stop}, where item {end} was expected; "
                f"delete {root} to start again"
            )
        end = stop
    if end != total:
        raise CaaError(f"{root}: the pieces cover items 0 to {end} of {total}; delete {root} to start again")
    for _, _, path in sorted(found):
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            path.unlink()
            raise CaaError(
                f"{path}: unreadable ({_one_line(e)}); deleted: "
                "run the same command with --resume to redo its batch"
            ) from None
        yield table


def remove(out: Path) -> None:
    """Delete the pieces of a run once its output is written."""
    shutil.rmtree(partial_dir(out), ignore_errors=True)


def _unreadable(path: Path) -> str | None:
    """Why a finished piece cannot be used (no Parquet footer, no rows), or None."""
    try:
        rows = pq.read_metadata(path).num_rows
    except (pa.ArrowException, OSError) as e:
        return f"not readable Parquet ({_one_line(e)})"
    return None if rows else "no rows"


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
