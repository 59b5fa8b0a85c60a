"""Statistics over held-out items: standard errors, paired intervals, per-item steerability.

Everything here is a function of a score matrix ``scores[item, multiplier]`` (one row per test pair,
one column per swept multiplier, 0 among them), so the sweep's engines and its statistics stay
apart. A statistic that needs more items than there are is ``nan`` (stored as null), never an error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 2000


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile for integer ``df`` >= 1 (nan below), by bisection on the exact CDF."""
    if df < 1:
        return math.nan
    target = 2 * p - 1  # P(|T| < t)
    lo, hi = 0.0, 1.0
    while _t_central(hi, df) < target:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_central(mid, df) < target else (lo, mid)
    return (lo + hi) / 2 if p >= 0.5 else -t_quantile(1 - p, df)


def _t_central(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer ``df`` (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:
        term, total = math.cos(theta), 0.0
        for k in range(1, (df - 1) // 2 + 1):  # cos, 2/3 cos^3, (2*4)/(3*5) cos^5, ...
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return (2 / math.pi) * (theta + math.sin(theta) * total) if df > 1 else 2 * theta / math.pi
    term, total = 1.0, 0.0
    for k in range(1, df // 2 + 1):  # 1, 1/2 cos^2, (1*3)/(2*4) cos^4, ...
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return math.sin(theta) * total


def sem(scores: np.ndarray) -> np.ndarray:
    """Standard error of each column's mean: [multipliers]; nan with fewer than two items."""
    n = scores.shape[0]
    if n < 2:
        return np.full(scores.shape[1], np.nan)
    return scores.std(0, ddof=1) / math.sqrt(n)


def paired_interval(scores: np.ndarray, zero: int) -> tuple[np.ndarray, np.ndarray]:
    """The 95% t-interval of each column's mean gain over the unsteered column ``zero``, paired over
    the same items: (low, high), each [multipliers]; nan with fewer than two items."""
    gains = scores - scores[:, zero : zero + 1]  # [items, multipliers]
    half = t_quantile(0.5 + CONFIDENCE / 2, scores.shape[0] - 1) * sem(gains)
    mean = gains.mean(0)
    return mean - half, mean + half


def slopes(scores: np.ndarray, multipliers: Sequence[float]) -> np.ndarray:
    """Each item's steerability: the least-squares slope of its score against the multiplier: [items].
    nan when fewer than two multipliers were swept."""
    x = np.asarray(multipliers, dtype=np.float64)
    centred = x - x.mean()
    denominator = float((centred**2).sum())
    if denominator == 0:
        return np.full(scores.shape[0], np.nan)
    return (scores - scores.mean(1, keepdims=True)) @ centred / denominator


@dataclass(frozen=True)
class Steerability:
    """How one layer's vector moves the items: their slopes, and the share moving backwards."""

    slope_mean: float
    slope_median: float
    anti_fraction: float  # share of items whose slope is negative ("anti-steerable")
    anti_low: float  # seeded bootstrap 95% interval of anti_fraction
    anti_high: float
    backward: list[str]  # ids of the items that steer most strongly backwards, most negative first


def steerability(item_slopes: np.ndarray, ids: Sequence[str], seed: int = 0, show: int = 5) -> Steerability:
    """Summarise per-item slopes (nan slopes give nan statistics)."""
    if len(item_slopes) == 0 or np.isnan(item_slopes).any():
        return Steerability(math.nan, math.nan, math.nan, math.nan, math.nan, [])
    negative = item_slopes < 0
    low, high = bootstrap_interval(negative.astype(np.float64), seed)
    order = np.argsort(item_slopes, kind="stable")
    backward = [str(ids[i]) for i in order[:show] if item_slopes[i] < 0]
    return Steerability(
        float(item_slopes.mean()), float(np.median(item_slopes)), float(negative.mean()), low, high, backward
    )


def bootstrap_interval(
    values: np.ndarray, seed: int = 0, samples: int = BOOTSTRAP_SAMPLES
) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of ``values`` (items resampled with replacement,
    reproducible with ``seed``)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(values), size=(samples, len(values)))
    means = values[draws].mean(1)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def mean_interval(values: np.ndarray) -> tuple[float, float, float, int]:
    """The mean of ``values`` (nan ignored: unscored items) and its 95% t-interval: (mean, low, high,
    n), n the values counted; the bounds nan with fewer than two values, all nan with none."""
    kept = np.asarray(values, dtype=np.float64)
    kept = kept[~np.isnan(kept)]
    n = len(kept)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    half = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * float(sem(kept[:, None])[0])
    mean = float(kept.mean())
    return mean, mean - half, mean + half, n
