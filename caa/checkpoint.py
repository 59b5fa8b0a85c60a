"""The finished pieces of a long run, kept so that an interrupted run can continue (``--resume``).

A run writing ``out.parquet`` keeps its pieces in ``out.parquet.partial/rank<R>/``, one Parquet file
per finished batch, named by the range of work items it covers (``items-000000480-000000512``).
Every piece is written to a temporary name and renamed, so a killed process leaves no piece that
looks finished. Each rank's ``run.json`` holds what the results depend on (inputs, model, options);
a resume with anything different is refused, naming the field. When every rank has finished, the
main process merges the pieces in order into ``out.parquet`` and removes the directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from caa.errors import CaaError, MismatchError

_PIECE = re.compile(r"items-(\d{9})-(\d{9})\.parquet")


def partial_dir(out: Path) -> Path:
    """Where the pieces of a run writing ``out`` live."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def check_fresh(out: Path, resume: bool) -> None:
    """Refuse to start over an interrupted run unless resuming: its pieces may hold hours of work.

    Under several processes, every rank calls this before any rank creates a :class:`Checkpoint`."""
    root = partial_dir(out)
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
        run_file = self.dir / "run.json"
        if run_file.exists():
            self._check(run_file)
            self.done = self._finished()
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(run_file, json.dumps(self.identity, indent=1).encode())

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
        """Items covered by the finished pieces, which must run without a gap from item 0."""
        for stray in self.dir.glob("*.tmp"):
            stray.unlink()  # a piece being written when the run was killed
        end = 0
        for start, stop, path in self.pieces():
            if start != end:
                raise CaaError(f"{path}: pieces do not follow each other (expected one starting at {end})")
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
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
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
            yield pq.read_table(path)


def remove(out: Path) -> None:
    """Delete the pieces of a run once its output is written."""
    shutil.rmtree(partial_dir(out), ignore_errors=True)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
