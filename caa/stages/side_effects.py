"""`caa sweep --side-effects`: what steering for one behavior does to others, and to plain knowledge.

After a sweep, the chosen cell of each swept behavior (its recommended (layer, multiplier), else its
best gain, said so) is evaluated on the held-out pairs of *other* sets of pairs, the probes: built-in
datasets by name (``capability``, general-knowledge questions whose matching answer is the correct
one, is the built-in probe of capability), or files of pairs, ingested in memory as ``caa ingest``
reads them. A probe's items are its test split (the split ``caa ingest`` makes by default, so a
built-in behavior's are the pairs that trained none of its vectors), at most ``max_items`` per set.

Each item is scored as the sweep scores it (A/B: p(matching) / (p(A) + p(B)); free-form:
log p(positive) - log p(negative)), unsteered and steered at the cell, by the sweep's engines in
batches; the off-target change is the mean of steered minus unsteered over the same items, with its
paired 95% t-interval (:func:`caa.evaluation.reliability.paired_interval`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from caa.core.budget import Planner, planner_for
from caa.core.distributed import ONE, Shard
from caa.core.prompts import prompt_format
from caa.errors import CaaError, OptionError
from caa.evaluation.engines import ScoreText, Tick, run_grid
from caa.evaluation.reliability import paired_interval
from caa.evaluation.scoring import ab_scores, check_finite, completion_logprobs
from caa.models.loading import LoadedModel
from caa.stages.ingest import ingest, pair_set
from caa.stages.options import SweepOptions
from caa.stages.sweep import pair_texts, texts_scored
from caa.stages.vectors import VectorSet
from caa.store.datasets import resolve_dataset
from caa.store.schemas import SIDE_EFFECTS

Cell = tuple[int, float, str]  # layer, multiplier, and which cell: "recommended" or "best"


@dataclass(frozen=True)
class Probe:
    """One set of off-target items: the behavior name of its pairs, where they came from (``built-in``
    or the file), and its held-out pairs (one format)."""

    name: str
    source: str
    pairs: pd.DataFrame

    @property
    def is_ab(self) -> bool:
        return bool((self.pairs.format == "ab").all())

    @property
    def texts(self) -> int:
        """The texts that score it: one per A/B question, two per free-form pair."""
        return texts_scored(self.pairs)


def read_probes(names: Sequence[str], max_items: int = 50) -> list[Probe]:
    """The probes ``names`` give (a built-in dataset's name, or a file of pairs in any format
    ``caa ingest`` reads, a pairs.parquet included: one probe per behavior in it), each its test
    split, at most ``max_items`` pairs. An unknown name, a missing file, a set without held-out pairs
    or one mixing A/B and free-form pairs is refused, naming it."""
    probes: list[Probe] = []
    for name in names:
        try:
            path, card = resolve_dataset(Path(name))
        except CaaError as e:
            raise OptionError("side_effects", name, str(e)) from None
        if not path.exists():
            raise OptionError("side_effects", name, f"{path}: no such file")
        frame = pair_set(ingest([path])).frame
        test = frame[frame.split == "test"]
        if test.empty:
            raise CaaError(f"{path}: no held-out (test split) pairs to measure side effects on")
        source = "built-in" if card is not None else str(path)
        for behavior, part in test.groupby("behavior", sort=False):
            if part.format.nunique() > 1:
                raise CaaError(f"{path}: behavior '{behavior}' mixes A/B and free-form pairs")
            probes.append(Probe(str(behavior), source, part.head(max_items).reset_index(drop=True)))
    seen = [p.name for p in probes]
    twice = sorted({n for n in seen if seen.count(n) > 1})
    if twice:
        raise OptionError("side_effects", ",".join(names), f"names behavior '{twice[0]}' twice")
    return probes


def probe_work(probes: Sequence[Probe], behaviors: Sequence[str]) -> int:
    """The texts that measuring the side effects of ``behaviors`` scores: the total of its ticks."""
    return sum(p.texts for b in behaviors for p in probes if p.name != b)


def chosen_cells(
    recommended: Mapping[str, tuple[int, float] | None],
    best: Mapping[str, tuple[int, float] | None],
    notice: Callable[[str], None] | None = None,
) -> dict[str, Cell]:
    """Each behavior's cell to evaluate: its recommended one, else (said in ``notice``) its best
    positive gain, reliable or not; a behavior with neither is left out, said too."""
    cells: dict[str, Cell] = {}
    for behavior, pick in recommended.items():
        fallback = best.get(behavior)
        if pick is not None:
            cells[behavior] = (pick[0], pick[1], "recommended")
        elif fallback is not None:
            cells[behavior] = (fallback[0], fallback[1], "best")
            if notice:
                notice(
                    f"'{behavior}': no cell is recommended; side effects are measured at its best gain, "
                    f"layer {fallback[0]} x{fallback[1]:g}, whose interval is not above 0"
                )
        elif notice:
            notice(f"'{behavior}': no positive gain within the fluency budget: no side effects measured")
    return cells


def off_target_change(scores: np.ndarray, zero: int, steered: int) -> dict[str, float]:
    """Scores [items, multipliers] -> the unsteered and steered means, their difference (steered
    minus unsteered, over the same items) and its paired 95% interval."""
    means = scores.mean(0)
    low, high = paired_interval(scores, zero)
    return {
        "unsteered": float(means[zero]),
        "steered": float(means[steered]),
        "delta": float(means[steered] - means[zero]),
        "delta_low": float(low[steered]),
        "delta_high": float(high[steered]),
    }


def run_side_effects(
    loaded: LoadedModel,
    vectors: VectorSet,
    cells: Mapping[str, Cell],
    probes: Sequence[Probe],
    options: SweepOptions,
    *,
    planner: Planner | None = None,
    tick: Tick | None = None,
    notice: Callable[[str], None] | None = None,
    shard: Shard = ONE,
) -> pd.DataFrame:
    """The off-target change of each behavior's cell (``cells``, see :func:`chosen_cells`) on every
    probe but the behavior's own: one row per (behavior, probe), as :data:`caa.store.schemas.SIDE_EFFECTS`.
    The texts are put to the model as the sweep's ``options`` say (template, steered positions,
    engine, scale, truncation); every A/B probe of a behavior runs in one grid, every free-form one
    in another."""
    planner = planner or planner_for(loaded, options.max_memory, options.batch_size)
    style = prompt_format(loaded.tokenizer, options.chat_template)
    texts = {p.name: pair_texts(loaded, style, p.pairs, options.truncate, Path(p.source))[0] for p in probes}
    rows: list[dict[str, Any]] = []
    for behavior, (layer, multiplier, cell) in cells.items():
        grid = {layer: vectors.tensor(behavior, layer, options.scale)}
        mults = sorted({0.0, float(multiplier)})
        zero, at = mults.index(0.0), mults.index(float(multiplier))
        for is_ab in (True, False):
            group = [p for p in probes if p.name != behavior and p.is_ab == is_ab]
            if not group:
                continue
            batch: list[ScoreText] = [t for p in group for t in texts[p.name]]
            reduce = ab_scores if is_ab else completion_logprobs
            scored = run_grid(
                options.engine, loaded, batch, grid, mults, reduce, options.steer_positions,
                planner, tick, notice, shard,
            )[layer][..., 0]  # [texts, multipliers]  # fmt: skip
            start = 0
            for probe in group:
                scores = scored[start : start + probe.texts]
                start += probe.texts
                if not is_ab:
                    scores = scores[0::2] - scores[1::2]  # [pairs, multipliers]
                rows.append(
                    {
                        "behavior": behavior,
                        "layer": layer,
                        "multiplier": float(multiplier),
                        "cell": cell,
                        "target": probe.name,
                        "source": probe.source,
                        "score_kind": "p_match" if is_ab else "logp_diff",
                        "n": len(scores),
                        **off_target_change(scores, zero, at),
                    }
                )
    table = pd.DataFrame(rows, columns=[f.name for f in SIDE_EFFECTS.fields])
    check_finite(table, ("steered", "delta"))
    return table
