"""The finished pieces of a long run, kept so that an interrupted run can continue (``--resume``).

A run writing ``out.parquet`` keeps its pieces in ``out.parquet.partial/rank<R>/``, one Parquet file
per finished batch, named by the range of work items it covers (``items-000000480-000000512``).
Every piece is written to a unique temporary name, synced to disk and renamed, so a killed process
leaves no piece that looks finished; a piece that cannot be read on resume (a disk that lost it) is
deleted and its batch done again. Each rank's ``run.json`` holds what the results depend on (inputs,
model, options); a resume with anything different is refused, naming the field. When every rank has
finished, the main process merges the pieces in order into ``out.parquet`` and removes the directory.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator, Mapping
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
    """Refuse to start over an interrupted run unless resuming: its pieces may hold hours of work.

    Under several processes, every rank calls this before any rank creates a :class:`Checkpoint`."""
    root = partial_dir(out)
    if root.exists() and not root.is_dir():
        raise CaaError(f"{root}: is a file; caa extract keeps its unfinished batches there: move it away")
    if root.exists() and not resume:
        raise CaaError(
            f"{root} holds an interrupted run: add --resume to continue it, "
            "or delete that directory to start again"
        )


class Checkpoint:
    """One rank's pieces of a run writing ``out``; ``identity`` is everything the results depend on.

    Pieces found on disk are continued from (the caller checked :func:`check_fresh`), once their
    ``run.json`` matches ``identity``.
    """

    def __init__(self, out: Path, identity: Mapping[str, Any], rank: int = 0) -> None:
        self.out = Path(out)
        self.root = partial_dir(self.out)
        self.dir = self.root / f"rank{rank}"
        self.identity = json.loads(json.dumps(identity))  # as it will read back from run.json
        self.done = 0  # items finished, from the start of the rank's work list
        self.discarded: list[str] = []  # why pieces found on disk were deleted, to be redone
        run_file = self.dir / "run.json"
        if run_file.exists():
            self._check(run_file)
            self.done = self._finished()
        else:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:  # a read-only or full output directory
                raise CaaError(f"{self.dir}: cannot be created ({e.strerror or e})") from None
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

    def _finished(self) -> int:
        """Items covered by the finished pieces that run without a gap from item 0 and can be read;
        the first piece that breaks the run, and every piece after it, is deleted to be redone."""
        for stray in self.dir.glob("*.tmp"):
            stray.unlink()  # a piece being written when the run was killed
        end = 0
        pieces = list(self.pieces())
        for i, (start, stop, path) in enumerate(pieces):
            problem = f"expected a piece starting at item {end}" if start != end else _unreadable(path)
            if problem:
                for _, _, later in pieces[i:]:
                    later.unlink()
                self.discarded.append(f"{path.name}: {problem}; deleted, with the pieces after it, to redo")
                break
            end = stop
        return end

    def pieces(self) -> Iterator[tuple[int, int, Path]]:
        """(first item, end item, file) of every finished piece, in order."""
        found = []
        for path in self.dir.iterdir():
            match = _PIECE.fullmatch(path.name)
            if match:
                found.append((int(match.group(1)), int(match.group(2)), path))
        yield from sorted(found)

    def add(self, items: int, table: pa.Table) -> None:
        """Keep a finished piece covering the next ``items`` work items."""
        path = self.dir / f"items-{self.done:09d}-{self.done + items:09d}.parquet"
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        self.done += items


def merged_pieces(out: Path, ranks: int) -> Iterator[pa.Table]:
    """Every piece of every rank, in order: rank 0 first, then rank 1, and so on."""
    root = partial_dir(out)
    for rank in range(ranks):
        directory = root / f"rank{rank}"
        if not (directory / "run.json").exists():
            raise CaaError(f"{directory}: missing; the run of rank {rank} did not start")
        pieces = sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _PIECE.fullmatch(p.name)))
        for _, path in pieces:
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
