"""Steering against prompting: gains over the same held-out items, with paired intervals.

Every number here is a function of per-item score vectors of one behavior, aligned on the same items:
``baseline`` (unsteered, no system prompt of ours), ``steered`` (the steering cell), ``prompted``
(the positive system prompt, unsteered), ``both`` (the prompt and the steering cell together), and
optionally ``negative`` (the negative system prompt, unsteered). Each gain is a mean difference over
the items with its paired 95% t-interval (:func:`caa.evaluation.reliability.paired_interval`), and
each verdict reads an interval of a difference: above 0, below 0, or neither.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from caa.evaluation.reliability import paired_interval


@dataclass(frozen=True)
class Gain:
    """The mean of ``other - base`` over the items and its paired 95% interval (nan with one item)."""

    mean: float
    low: float
    high: float

    @property
    def side(self) -> str:
        """``above`` (the interval lies above 0), ``below``, ``includes 0``, or ``unknown`` (no interval)."""
        if math.isnan(self.low) or math.isnan(self.high):
            return "unknown"
        return "above" if self.low > 0 else "below" if self.high < 0 else "includes 0"


def paired_gain(base: np.ndarray, other: np.ndarray) -> Gain:
    """``other - base`` over the same items (both [items]), with its paired 95% interval."""
    scores = np.stack([np.asarray(base, np.float64), np.asarray(other, np.float64)], 1)  # [items, 2]
    low, high = paired_interval(scores, 0)
    return Gain(float((scores[:, 1] - scores[:, 0]).mean()), float(low[1]), float(high[1]))


@dataclass(frozen=True)
class Comparison:
    """One behavior's steering, prompting and both, over ``n`` items (see the module's docstring)."""

    n: int
    baseline: float  # the mean unsteered, unprompted score
    steering: Gain  # steered - baseline
    prompt: Gain  # prompted - baseline
    both: Gain  # both - baseline
    steering_vs_prompt: Gain  # steered - prompted: steering's gain minus the prompt's
    larger: str  # "steering" or "prompt": the one alone with the larger mean gain
    both_vs_larger: Gain  # both - the larger alone
    negative_prompt: Gain | None = None  # negative - baseline

    @property
    def verdict(self) -> str:
        """``beats``, ``loses to``, ``ties with`` or ``cannot be told from`` (steering, of prompting)."""
        return {
            "above": "beats",
            "below": "loses to",
            "includes 0": "ties with",
            "unknown": "cannot be told from",
        }[self.steering_vs_prompt.side]

    @property
    def adds_up(self) -> str:
        """``yes`` (together above the larger alone), ``no`` (its interval includes 0), ``worse``
        (below it) or ``unknown``."""
        return {"above": "yes", "below": "worse", "includes 0": "no", "unknown": "unknown"}[
            self.both_vs_larger.side
        ]

    def shown(self) -> list[tuple[str, bool, Gain]]:
        """The gains as tables show them: (label, whether at the steering cell (else unsteered), gain)."""
        rows = [
            ("steering", True, self.steering),
            ("positive prompt", False, self.prompt),
            ("prompt + steering", True, self.both),
        ]
        if self.negative_prompt is not None:
            rows.append(("negative prompt", False, self.negative_prompt))
        return rows

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (nan as None), with the verdicts."""
        return _plain({**asdict(self), "verdict": self.verdict, "adds_up": self.adds_up})


def compare(
    baseline: np.ndarray,
    steered: np.ndarray,
    prompted: np.ndarray,
    both: np.ndarray,
    negative: np.ndarray | None = None,
) -> Comparison:
    """The comparison of one behavior's per-item scores, each [items], aligned on the same items."""
    steering, prompt = paired_gain(baseline, steered), paired_gain(baseline, prompted)
    larger, alone = ("steering", steered) if steering.mean >= prompt.mean else ("prompt", prompted)
    return Comparison(
        n=len(baseline),
        baseline=float(np.mean(baseline)),
        steering=steering,
        prompt=prompt,
        both=paired_gain(baseline, both),
        steering_vs_prompt=paired_gain(prompted, steered),
        larger=larger,
        both_vs_larger=paired_gain(alone, both),
        negative_prompt=None if negative is None else paired_gain(baseline, negative),
    )


def read_comparison(entry: dict[str, Any]) -> Comparison:
    """A comparison back from :meth:`Comparison.to_dict` (a sweep file's metadata)."""

    def gain(value: Any) -> Gain | None:
        if value is None:
            return None
        return Gain(*(math.nan if value.get(k) is None else float(value[k]) for k in ("mean", "low", "high")))

    gains = {k: gain(entry.get(k)) for k in ("steering", "prompt", "both", "steering_vs_prompt")}
    return Comparison(
        n=int(entry["n"]),
        baseline=float(entry["baseline"]),
        **gains,  # type: ignore[arg-type]
        larger=str(entry["larger"]),
        both_vs_larger=gain(entry["both_vs_larger"]),  # type: ignore[arg-type]
        negative_prompt=gain(entry.get("negative_prompt")),
    )


def sentence(behavior: str, c: Comparison, fmt: str = "{:+.3f}") -> str:
    """The plain line: whether steering beats, ties with or loses to prompting, and whether they add up."""

    def ci(g: Gain) -> str:
        if math.isnan(g.low):
            return "no interval with one item"
        return f"95% CI {fmt.format(g.low)}..{fmt.format(g.high)}"

    d = c.steering_vs_prompt
    first = (
        f"{behavior}: steering {c.verdict} prompting (gain {fmt.format(c.steering.mean)} against "
        f"{fmt.format(c.prompt.mean)}; difference {fmt.format(d.mean)}, {ci(d)})"
    )
    b = c.both_vs_larger
    against = f"{c.larger} alone"
    second = {
        "yes": f"together they add up: prompt + steering beats {against}",
        "no": f"together they do not add up: prompt + steering ties with {against}",
        "worse": f"together they do worse than {against}",
        "unknown": f"prompt + steering cannot be told from {against}",
    }[c.adds_up]
    return f"{first}; {second} ({fmt.format(b.mean)}, {ci(b)})."


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
