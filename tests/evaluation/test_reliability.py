"""The sweep's statistics: intervals, per-item slopes, the anti-steerable share, the recommendation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from caa.evaluation.reliability import (
    bootstrap_interval,
    mean_interval,
    paired_interval,
    slopes,
    steerability,
    t_quantile,
)
from caa.evaluation.scoring import recommend, summarise

MULTIPLIERS = [-2.0, -1.0, 0.0, 1.0, 2.0]


@pytest.mark.parametrize(
    ("df", "exact"),
    [(1, 12.7062047), (2, 4.3026527), (3, 3.1824463), (5, 2.5705818), (10, 2.2281389), (30, 2.0422725)],
)
def test_t_quantile_matches_tables(df: int, exact: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(exact, abs=1e-6)
    assert t_quantile(0.025, df) == pytest.approx(-exact, abs=1e-6)


def test_slopes_equal_polyfit() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(12, len(MULTIPLIERS)))
    expected = [np.polyfit(MULTIPLIERS, row, 1)[0] for row in scores]
    np.testing.assert_allclose(slopes(scores, MULTIPLIERS), expected, rtol=1e-10, atol=1e-12)
    assert np.isnan(slopes(scores[:, :1], [0.0])).all()  # one multiplier: no slope


def test_paired_interval_is_the_t_interval_of_the_gains() -> None:
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(9, 3))
    low, high = paired_interval(scores, zero=1)
    gains = scores[:, 2] - scores[:, 1]
    half = t_quantile(0.975, 8) * gains.std(ddof=1) / 3
    assert low[2] == pytest.approx(gains.mean() - half) and high[2] == pytest.approx(gains.mean() + half)
    assert low[1] == high[1] == 0  # the baseline's gain over itself
    low1, high1 = paired_interval(scores[:1], zero=1)
    assert np.isnan(low1).all() and np.isnan(high1).all()  # one item: no interval


def test_bootstrap_is_reproducible_and_contains_the_estimate() -> None:
    values = np.random.default_rng(2).random(40)
    a, b = bootstrap_interval(values, seed=7), bootstrap_interval(values, seed=7)
    assert a == b
    assert a[0] <= values.mean() <= a[1]
    assert bootstrap_interval(values, seed=8) != a


def test_half_the_items_steering_backwards_is_reported_as_half() -> None:
    rng = np.random.default_rng(3)
    n = 200
    sign = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)  # every other item's score falls with m
    scores = sign[:, None] * (0.1 + rng.random((n, 1))) * np.array(MULTIPLIERS)[None, :]
    scores += rng.normal(scale=0.01, size=scores.shape)
    ids = [f"pair{i}" for i in range(n)]
    s = steerability(slopes(scores, MULTIPLIERS), ids, seed=0)
    assert s.anti_fraction == pytest.approx(0.5)
    assert s.anti_low < 0.5 < s.anti_high and s.anti_high - s.anti_low < 0.2
    assert all(int(i[4:]) % 2 == 1 for i in s.backward) and len(s.backward) == 5


def _table(gains: dict[tuple[int, float], np.ndarray]) -> pd.DataFrame:
    """A summary table from per-item scores: {(layer, multiplier): scores of the items}."""
    rows = []
    for layer in sorted({layer for layer, _ in gains}):
        mults = sorted({m for lay, m in gains if lay == layer})
        scores = np.stack([gains[(layer, m)] for m in mults], 1)
        summary, _ = summarise("b", layer, mults, scores, [str(i) for i in range(scores.shape[0])], "p_match")
        for row in summary:
            row.update(kl_mean=0.0, perplexity=1.0, perplexity_delta=0.0)
        rows += summary
    return pd.DataFrame(rows)


def test_a_gain_within_its_noise_is_not_recommended() -> None:
    rng = np.random.default_rng(4)
    base = rng.random(16)
    noisy = base + 0.005 + rng.normal(scale=0.15, size=16)  # +0.005 mean gain, se ~0.04
    clear = base + 0.05 + rng.normal(scale=0.01, size=16)
    table = _table({(1, 0.0): base, (1, 1.0): noisy, (2, 0.0): base, (2, 1.0): clear})
    assert recommend(table, "b", max_kl=1.0) == ((2, 1.0), (2, 1.0)) or recommend(table, "b", 1.0)[0] == (
        2,
        1.0,
    )
    only_noise = _table({(1, 0.0): base, (1, 1.0): noisy})
    picked, best = recommend(only_noise, "b", max_kl=1.0)
    row = only_noise[only_noise.multiplier == 1.0].iloc[0]
    assert row.delta_low < 0 < row.delta_high
    assert picked is None
    assert best == ((1, 1.0) if row.delta > 0 else None)  # shown as the best, not recommended


def test_max_anti_excludes_layers_where_items_steer_backwards() -> None:
    rng = np.random.default_rng(5)
    n = 30
    up = rng.random(n)[:, None] * 0.1 * np.array([0.0, 1.0])  # every item rises
    mixed = np.where(np.arange(n) < 12, -1.0, 3.0)[:, None] * 0.05 * np.array([0.0, 1.0])  # 40% fall
    table = _table({(1, 0.0): up[:, 0], (1, 1.0): up[:, 1], (2, 0.0): mixed[:, 0], (2, 1.0): mixed[:, 1]})
    assert table[table.layer == 2].anti_fraction.iloc[0] == pytest.approx(0.4)
    assert recommend(table, "b", max_kl=1.0)[0] == (2, 1.0)  # the larger mean gain
    assert recommend(table, "b", max_kl=1.0, max_anti=0.2)[0] == (1, 1.0)


def test_one_item_gives_null_statistics_not_an_error() -> None:
    summary, items = summarise("b", 3, [0.0, 1.0], np.array([[0.2, 0.5]]), ["only"], "p_match")
    assert summary[1]["delta"] == pytest.approx(0.3)
    for key in ("score_sem", "delta_low", "delta_high"):
        assert math.isnan(summary[1][key])
    assert summary[1]["anti_fraction"] == 0.0
    assert list(items.slope) == [pytest.approx(0.3)] * 2


def test_mean_interval_ignores_nan_and_uses_the_t_interval() -> None:
    mean, low, high, n = mean_interval(np.array([1.0, np.nan, 2.0, 3.0, 4.0]))
    # by hand: mean 2.5, sd sqrt(5/3), sem sd / 2, t(0.975, df 3) = 3.182446 (t-table)
    half = 3.182446 * math.sqrt(5 / 3) / 2
    assert (mean, n) == (2.5, 4)
    assert low == pytest.approx(2.5 - half, abs=1e-5) and high == pytest.approx(2.5 + half, abs=1e-5)


def test_mean_interval_of_too_few_values_is_nan_not_an_error() -> None:
    mean, low, high, n = mean_interval(np.array([7.0]))
    assert (mean, n) == (7.0, 1) and math.isnan(low) and math.isnan(high)
    assert all(math.isnan(x) for x in mean_interval(np.array([np.nan]))[:3])
    assert mean_interval(np.array([]))[3] == 0
