"""The parsers of command-line values (caa.cli.parse), the memory planner (caa.core.budget) and the
console script's exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from caa.cli.parse import parse_layers, parse_multipliers, parse_size
from caa.core.budget import Planner
from caa.errors import CaaError
from tests.helpers import REPO


def test_planner_fits_the_budget() -> None:
    planner = Planner(budget=1000, row_bytes=lambda seq, keep: 10 * seq + keep, max_rows=8)
    lengths = [5, 30, 10, 10, 50, 2]
    batches = planner.batches(lengths, reps=2, keep_all=False)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        rows = 2 * len(batch)
        assert rows <= 8
        assert len(batch) == 1 or rows * (10 * max(lengths[i] for i in batch) + 1) <= 1000
        assert [lengths[i] for i in batch] == sorted(lengths[i] for i in batch)
    assert batches[0] == [5, 0, 2, 3]  # shortest first: 2, 5, 10, 10 -> 8 rows x 101 bytes
    huge = Planner(budget=10, row_bytes=lambda seq, keep: 100 * seq, max_rows=8)
    assert huge.batches([3, 4], reps=1, keep_all=True) == [[0], [1]]  # too big alone: a batch of one


@pytest.mark.parametrize(
    ("spec", "size"), [("4GiB", 4 * 2**30), ("512MB", 512 * 10**6), ("1.5g", 1.5 * 10**9), ("1000", 1000)]
)
def test_parse_size(spec: str, size: float) -> None:
    assert parse_size(spec) == int(size)


@pytest.mark.parametrize("spec", ["", "four", "4XB", "-1GB", "0"])
def test_parse_size_rejects(spec: str) -> None:
    with pytest.raises(CaaError, match="--max-memory"):
        parse_size(spec)


def test_parse_multipliers() -> None:
    assert parse_multipliers("2,-1") == [2.0, -1.0]  # as given: the sweep sorts them and adds 0
    with pytest.raises(CaaError, match="--multipliers 'inf': 'inf' is not finite"):
        parse_multipliers("inf")
    with pytest.raises(CaaError, match="'x' is not a number"):
        parse_multipliers("1,x")


def test_parse_layers() -> None:
    assert parse_layers("all") is None
    assert parse_layers("1,3") == [1, 3]
    assert parse_layers("0-2,3") == [0, 1, 2, 3]
    assert parse_layers("2-4") == [2, 3, 4]  # the model's range is the library's to check
    with pytest.raises(CaaError, match="--layers 'x': 'x' is not a layer"):
        parse_layers("x")
    with pytest.raises(CaaError, match="empty range 4-2"):
        parse_layers("4-2")


def run_main(*args: str, before: str = "") -> subprocess.CompletedProcess[str]:
    """``caa.cli.main`` (the console script) in a fresh process, after ``before`` (Python)."""
    code = f"import sys\n{before}\nsys.argv = ['caa', *{list(args)!r}]\nfrom caa.cli import main\nmain()\n"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_the_command_line_exits_with_its_status_without_tearing_the_interpreter_down(tmp_path: Path) -> None:
    """The console script ends the process after the command: the exit status and all the output
    are the command's, atexit handlers run, and module globals are not finalised one by one."""
    before = (
        "import atexit\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "class Noisy:\n"
        "    def __del__(self): print('torn down')\n"
        "kept = Noisy()\n"
    )
    done = run_main("--help", before=before)
    assert done.returncode == 0, done.stderr
    assert "caa ingest" in done.stdout or "ingest" in done.stdout
    assert done.stdout.rstrip().endswith("atexit ran")  # flushed, in order
    assert "torn down" not in done.stdout
    bad = run_main("ingest", str(tmp_path / "missing.json"), "-o", str(tmp_path / "pairs.parquet"))
    assert bad.returncode == 2 and "missing.json" in bad.stderr
    assert run_main("--no-such-option").returncode == 2
    plain = subprocess.run(
        [sys.executable, "-c", before + "raise SystemExit(0)"], capture_output=True, text=True, timeout=60
    )
    assert "torn down" in plain.stdout  # what a normal exit does, and main() skips
