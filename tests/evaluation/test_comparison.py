"""Steering against prompting: every gain, interval and verdict against a hand computation on a
small synthetic score matrix (four items)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from caa.evaluation.comparison import Gain, compare, paired_gain, read_comparison, sentence

T_975_DF3 = 3.182446305284263  # Student's t, 97.5% quantile, 3 degrees of freedom (from tables)

# Four held-out items (rows of the score matrix, per cell):
BASELINE = np.array([0.2, 0.4, 0.3, 0.5])  # arm none, x0
STEERED = np.array([0.5, 0.6, 0.4, 0.9])  # arm none, the steering cell
PROMPTED = np.array([0.3, 0.5, 0.3, 0.6])  # arm positive, x0
BOTH = np.array([0.6, 0.7, 0.4, 1.0])  # arm positive, the steering cell
NEGATIVE = np.array([0.1, 0.4, 0.2, 0.5])  # arm negative, x0


def by_hand(differences: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval of per-item differences, written out."""
    n = len(differences)
    mean = sum(differences) / n
    variance = sum((d - mean) ** 2 for d in differences) / (n - 1)
    half = T_975_DF3 * math.sqrt(variance / n)
    return mean, mean - half, mean + half


def assert_gain(gain: Gain, differences: list[float]) -> None:
    mean, low, high = by_hand(differences)
    assert (gain.mean, gain.low, gain.high) == pytest.approx((mean, low, high), abs=1e-12)


def test_every_gain_and_difference_is_the_paired_t_interval_of_its_items() -> None:
    c = compare(BASELINE, STEERED, PROMPTED, BOTH, NEGATIVE)
    assert c.n == 4 and c.baseline == pytest.approx(0.35)
    assert_gain(c.steering, [0.3, 0.2, 0.1, 0.4])  # mean 0.25, interval 0.0446 .. 0.4554
    assert_gain(c.prompt, [0.1, 0.1, 0.0, 0.1])
    assert_gain(c.both, [0.4, 0.3, 0.1, 0.5])
    assert_gain(c.negative_prompt, [-0.1, 0.0, -0.1, 0.0])  # type: ignore[arg-type]
    assert_gain(c.steering_vs_prompt, [0.2, 0.1, 0.1, 0.3])  # 0.175, 0.0227 .. 0.3273: above 0
    assert c.larger == "steering"  # 0.25 > 0.075: prompt + steering is set against steering alone
    assert_gain(c.both_vs_larger, [0.1, 0.1, 0.0, 0.1])  # 0.075, -0.0046 .. 0.1546: includes 0
    assert c.steering.low == pytest.approx(0.25 - T_975_DF3 * math.sqrt(0.05 / 3 / 4))
    assert c.verdict == "beats" and c.adds_up == "no"


def test_verdicts_follow_the_side_of_each_interval() -> None:
    # the prompt is the stronger one alone: steering loses, and both are set against the prompt
    c = compare(BASELINE, PROMPTED, STEERED, STEERED + 0.2 + np.array([0.0, 0.1, 0.0, 0.1]))
    assert c.verdict == "loses to" and c.larger == "prompt" and c.adds_up == "yes"
    assert_gain(c.both_vs_larger, [0.2, 0.3, 0.2, 0.3])
    worse = compare(BASELINE, STEERED, PROMPTED, BASELINE - np.array([0.1, 0.2, 0.1, 0.2]))
    assert worse.adds_up == "worse"
    same = compare(BASELINE, STEERED, STEERED + np.array([0.1, -0.1, 0.1, -0.1]), BOTH)
    assert same.verdict == "ties with"  # the difference's interval includes 0
    one = compare(BASELINE[:1], STEERED[:1], PROMPTED[:1], BOTH[:1])
    assert math.isnan(one.steering.low) and one.verdict == "cannot be told from" and one.adds_up == "unknown"
    assert one.steering.mean == pytest.approx(0.3)


def test_paired_gain_is_other_minus_base() -> None:
    assert_gain(paired_gain(PROMPTED, STEERED), [0.2, 0.1, 0.1, 0.3])
    assert Gain(0.1, 0.01, 0.2).side == "above" and Gain(-0.1, -0.2, -0.01).side == "below"
    assert Gain(0.0, -0.1, 0.1).side == "includes 0" and Gain(0.3, math.nan, math.nan).side == "unknown"


def test_the_metadata_form_reads_back_and_says_it_in_one_line() -> None:
    c = compare(BASELINE, STEERED, PROMPTED, BOTH, NEGATIVE)
    entry = c.to_dict()
    assert entry["verdict"] == "beats" and entry["adds_up"] == "no" and entry["larger"] == "steering"
    assert read_comparison(entry) == c
    one = compare(BASELINE[:1], STEERED[:1], PROMPTED[:1], BOTH[:1])
    assert one.to_dict()["steering"]["low"] is None  # nan is stored as null
    assert read_comparison(one.to_dict()).negative_prompt is None
    line = sentence("mood", c, "{:+.3f}")
    assert line == (
        "mood: steering beats prompting (gain +0.250 against +0.075; difference +0.175, 95% CI "
        "+0.023..+0.327); together they do not add up: prompt + steering ties with steering alone "
        "(+0.075, 95% CI -0.005..+0.155)."
    )
    assert "no interval with one item" in sentence("x", one)
