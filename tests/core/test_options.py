"""The parsers of command-line values (caa.options) and the memory planner (caa.budget)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import caa
from caa.core.budget import Planner
from caa.core.options import parse_multipliers, parse_size, sweep_multipliers
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
    assert parse_multipliers("2,-1") == [-1.0, 0.0, 2.0]
    assert parse_multipliers("2,-1", include_zero=False) == [-1.0, 2.0]
    with pytest.raises(CaaError, match="not finite"):
        parse_multipliers("inf")
    with pytest.raises(CaaError, match=r"^--multipliers '1, 1e999': '1e999' is not finite$"):
        parse_multipliers("1, 1e999")
    with pytest.raises(CaaError, match=r"^--multipliers '1,x': 'x' is not a number$"):
        parse_multipliers("1,x")


def test_sweep_multipliers_is_the_one_normalisation() -> None:
    """Finite, sorted, each once, 0 added: the sweep (stages and plans) normalise through it."""
    assert sweep_multipliers([2, -1.0, 2.0]) == [-1.0, 0.0, 2.0]
    assert sweep_multipliers((0.5, -0.5), baseline=False) == [-0.5, 0.5]
    assert sweep_multipliers([]) == [0.0]
    with pytest.raises(CaaError, match=r"^multipliers: 'nan' is not finite$"):
        sweep_multipliers([1.0, float("nan")])
    with pytest.raises(CaaError, match=r"^multipliers: 'None' is not a number$"):
        sweep_multipliers([None])  # type: ignore[list-item]
    package = Path(caa.__file__).parent
    assert "sweep_multipliers(multipliers)" in (package / "stages" / "sweep.py").read_text()
    assert "include_zero" not in (package / "stages" / "sweep.py").read_text()


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
