"""caa.evaluation.text_scores: per multiplier, the mean probe score and judge rating with their 95%
intervals, against a hand computation."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from caa.evaluation.text_scores import score_table


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "multiplier": [1.0, -1.0, 1.0, -1.0, 1.0, -1.0],
            "probe_score": [2.0, -1.0, 4.0, -3.0, 6.0, float("nan")],
            "judge_rating": pd.array([7, 2, None, 3, 9, 1], dtype="Int8"),
        }
    )


def test_each_score_per_multiplier_with_its_t_interval() -> None:
    table = score_table(_frame())
    assert table.multiplier.tolist() == [-1.0, 1.0]
    minus, plus = table.iloc[0], table.iloc[1]
    # probe at +1: 2, 4, 6: mean 4, sd 2, sem 2/sqrt(3), t(0.975, 2) = 4.302653
    half = 4.302653 * 2 / math.sqrt(3)
    assert (plus.probe_mean, plus.probe_n) == (4.0, 3)
    assert plus.probe_low == pytest.approx(4 - half, abs=1e-5)
    assert plus.probe_high == pytest.approx(4 + half, abs=1e-5)
    # probe at -1: -1, -3 (a text without a score left out): mean -2, sd sqrt(2), t(0.975, 1) = 12.706205
    assert (minus.probe_mean, minus.probe_n) == (-2.0, 2)
    assert minus.probe_high == pytest.approx(-2 + 12.706205 * 1.0, abs=1e-5)
    # judge: an unparseable (null) rating is left out; its interval stays within the 1-10 scale
    assert (plus.judge_mean, plus.judge_n) == (8.0, 2)
    assert (plus.judge_low, plus.judge_high) == (1.0, 10.0)  # 8 -+ 12.706 * 1: past both ends
    assert (minus.judge_mean, minus.judge_n) == (2.0, 3)
    # 2, 3, 1: sd 1, half 4.302653 / sqrt(3) = 2.484: the low end clipped to 1, the high end not
    assert minus.judge_low == 1.0
    assert minus.judge_high == pytest.approx(2 + 4.302653 / math.sqrt(3), abs=1e-5)


def test_scores_not_taken_have_no_columns() -> None:
    frame = _frame().assign(judge_rating=pd.array([None] * 6, dtype="Int8")).drop(columns="probe_score")
    assert score_table(frame).columns.tolist() == ["multiplier"]
