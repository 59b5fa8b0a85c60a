"""Scores of generated text per multiplier: the probe's projection and the judge's rating, each as a
mean with its 95% t-interval over the prompts (:func:`caa.evaluation.reliability.mean_interval`)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from caa.evaluation.reliability import mean_interval

# column of generations.parquet -> the name of its statistics
SCORES = {"probe_score": "probe", "judge_rating": "judge"}
# a score's range, where it has one: an interval is clipped to it (a t-interval over two or three
# ratings easily reaches past the scale)
BOUNDS = {"judge_rating": (1.0, 10.0)}


def score_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per multiplier (ascending): for each score column of ``frame`` holding any value,
    ``NAME_mean``, ``NAME_low``, ``NAME_high`` (the 95% interval, within the score's range
    :data:`BOUNDS`; nan with fewer than two values)
    and ``NAME_n`` (the rows scored; a null score, e.g. an unparseable rating, is left out).
    No columns but ``multiplier`` when nothing was scored."""
    scored = [c for c in SCORES if c in frame and frame[c].notna().any()]
    rows = []
    for multiplier, part in frame.groupby("multiplier", sort=True):
        row: dict[str, float | int] = {"multiplier": float(multiplier)}
        for column in scored:
            mean, low, high, n = mean_interval(part[column].astype("float64").to_numpy())
            if column in BOUNDS:  # nan stays nan
                low, high = (float(np.clip(x, *BOUNDS[column])) for x in (low, high))
            name = SCORES[column]
            row |= {f"{name}_mean": mean, f"{name}_low": low, f"{name}_high": high, f"{name}_n": n}
        rows.append(row)
    stats = [f"{SCORES[c]}_{s}" for c in scored for s in ("mean", "low", "high", "n")]
    return pd.DataFrame(rows, columns=["multiplier", *stats])
