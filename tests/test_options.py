"""The parsers of command-line values (caa.options) and the memory planner (caa.budget)."""

from __future__ import annotations

import pytest

from caa.budget import Planner
from caa.errors import CaaError
from caa.options import parse_multipliers, parse_size


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
