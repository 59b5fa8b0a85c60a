"""`caa sweep --prompting`: steering against asking, and both (the paper's Table 3 crossed system
prompts with multipliers; AxBench found a prompt beats mean-difference steering on average).

Per behavior, the held-out pairs are scored in three arms: ``none`` (the prompt as the sweep builds
it: the chat template with no system message of ours, so a template's own default system prompt
stays), ``positive`` and ``negative`` (a system prompt asking for the behavior, or for its opposite,
in place of that default), each crossed with the swept multipliers at the swept layers or at
``prompting_layer`` only. A model without a chat template gets the system prompt as plain text, its
own paragraph before the prompt (:class:`caa.core.prompts.PromptFormat`).

The prompts come from the built-in datasets' cards (data/README.md), for pairs ingested from that
file, or from ``system_positive`` / ``system_negative`` (for any data; they override a card's). A
behavior without a positive prompt is named and left out of the prompting arms; without any, the
sweep is refused. The comparison per behavior (:mod:`caa.evaluation.comparison`) reads the per-item
scores: the steering cell (the recommended one, else the best), the positive prompt at multiplier 0,
and the two together, over the same items.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from caa.core.prompts import PromptFormat
from caa.errors import CaaError, OptionError
from caa.evaluation.comparison import compare
from caa.evaluation.scoring import recommend, summarise
from caa.stages.options import SweepOptions
from caa.store.datasets import builtin

# (subset of one behavior's pairs, prompt format, {layer: vector}) -> {layer: scores [pairs, multipliers]}
Scorer = Callable[[pd.DataFrame, PromptFormat, dict[int, Any]], dict[int, np.ndarray]]
FLUENCY_COLUMNS = ("kl_mean", "perplexity", "perplexity_delta")  # measured on arm "none" only


@dataclass(frozen=True)
class SystemPrompts:
    """One behavior's system prompts (None where there is none) and where they came from."""

    positive: str | None
    negative: str | None
    source: str  # "card", "options", or "card and options"

    def arms(self) -> list[tuple[str, str]]:
        """The prompting arms to run: (arm, its system prompt)."""
        given = (("positive", self.positive), ("negative", self.negative))
        return [(arm, text) for arm, text in given if text is not None]


def system_prompts(
    pairs: pd.DataFrame, behaviors: Sequence[str], options: SweepOptions
) -> tuple[dict[str, SystemPrompts], list[str]]:
    """Each behavior's system prompts: ``options``' own, else its card's when its pairs come from that
    built-in dataset's file; and the warnings for the behaviors left out (no positive prompt) or run
    without the negative arm. Raises when no behavior has a positive prompt."""
    found, warnings = {}, []
    for name in behaviors:
        card = builtin(name)
        files = set(pairs.source[pairs.behavior == name]) if "source" in pairs else set()
        if card is None or files != {card.file}:
            card = None
        card_positive = (card.system_positive or None) if card else None
        card_negative = (card.system_negative or None) if card else None
        positive = options.system_positive or card_positive
        negative = options.system_negative or card_negative
        if positive is None:
            warnings.append(
                f"'{name}' has no system prompts (its pairs are not a built-in dataset's with prompts on its "
                "card; give --system-positive and --system-negative): skipped for the prompting arms"
            )
            continue
        if negative is None:
            warnings.append(f"'{name}' has no negative system prompt: its negative arm is not run")
        own = ((options.system_positive, positive), (options.system_negative, negative))
        sources = sorted({"options" if mine else "card" for mine, text in own if text is not None})
        found[name] = SystemPrompts(positive, negative, " and ".join(sources))
    if not found:
        raise CaaError(
            "--prompting: no behavior swept has system prompts (only the built-in datasets' cards give "
            "them): give --system-positive and --system-negative"
        )
    return found, warnings


def prompting_layers(grid: Mapping[int, Any], behavior: str, options: SweepOptions) -> dict[int, Any]:
    """The layers of ``grid`` the prompting arms run at: all, or ``options.prompting_layer``."""
    layer = options.prompting_layer
    if layer is None:
        return dict(grid)
    if layer not in grid:
        swept = ", ".join(map(str, grid))
        raise OptionError(
            "prompting_layer", layer, f"is not among the swept layers of '{behavior}' ({swept})"
        )
    return {layer: grid[layer]}


def run_arms(
    pairs: pd.DataFrame,
    prompts: Mapping[str, SystemPrompts],
    style: PromptFormat,
    grids: Mapping[str, Mapping[int, Any]],
    score: Scorer,
    options: SweepOptions,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The prompting arms' rows of the sweep table and of its per-item table (fluency columns null:
    the cost is measured on arm ``none``)."""
    rows, items = [], []
    multipliers = list(options.multipliers)
    for behavior, given in prompts.items():
        subset = pairs[pairs.behavior == behavior]
        kind = "p_match" if (subset.format == "ab").all() else "logp_diff"
        grid = prompting_layers(grids[behavior], behavior, options)
        for arm, text in given.arms():
            for layer, scores in score(subset, replace(style, system=text), grid).items():
                summary, per_item = summarise(
                    behavior, layer, multipliers, scores, list(subset.pair_id), kind, options.seed
                )
                rows += [{**r, "system": arm, **dict.fromkeys(FLUENCY_COLUMNS, np.nan)} for r in summary]
                items.append(per_item.assign(system=arm))
    return pd.DataFrame(rows), pd.concat(items, ignore_index=True)


def steering_cell(
    table: pd.DataFrame, behavior: str, pick: tuple[tuple[int, float] | None, ...], options: SweepOptions
) -> tuple[tuple[int, float] | None, str]:
    """The steering cell the comparison reads, and which it is: the recommended cell, else the best
    within the budget, else the largest gain of a positive multiplier (over the budget); at
    ``options.prompting_layer`` when given (the prompting arms ran there only)."""
    rows = table[(table.behavior == behavior) & (table.system == "none")]
    if options.prompting_layer is not None:
        rows = rows[rows.layer == options.prompting_layer]
        pick = recommend(rows, behavior, options.max_kl, options.max_anti)
    for cell, which in zip(pick, ("recommended", "best in the KL budget, not reliable"), strict=True):
        if cell:
            return cell, which
    positive = rows[rows.multiplier > 0]
    if positive.empty:
        return None, "no positive multiplier was swept"
    best = positive.loc[positive.delta.idxmax()]
    return (int(best.layer), float(best.multiplier)), "largest gain, over the KL budget"


def comparisons(
    table: pd.DataFrame,
    items: pd.DataFrame,
    prompts: Mapping[str, SystemPrompts],
    picks: Mapping[str, tuple[tuple[int, float] | None, tuple[int, float] | None]],
    options: SweepOptions,
) -> dict[str, dict[str, Any]]:
    """Per behavior with prompts: the steering cell and the comparison of steering, the positive
    prompt and both (:func:`caa.evaluation.comparison.compare`), as metadata."""
    found = {}
    for behavior, given in prompts.items():
        cell, which = steering_cell(table, behavior, picks[behavior], options)
        entry: dict[str, Any] = {"cell": list(cell) if cell else None, "cell_kind": which}
        if cell is not None:
            layer, multiplier = cell
            mine = items[items.behavior == behavior]
            order = pd.Index(mine[mine.system == "none"].pair_id.unique())
            cells = [("none", 0.0), ("none", multiplier), ("positive", 0.0), ("positive", multiplier)]
            if given.negative is not None:
                cells.append(("negative", 0.0))
            scores = [_item_scores(mine, arm, layer, m, order) for arm, m in cells]
            result = compare(*scores)  # baseline, steered, prompted, both[, negative]
            entry.update(result.to_dict())
        found[behavior] = entry
    return found


def _item_scores(items: pd.DataFrame, arm: str, layer: int, multiplier: float, order: pd.Index) -> np.ndarray:
    """One cell's per-item scores of one behavior, in the order of ``order`` (pair ids): [items]."""
    part = items[(items.system == arm) & (items.layer == layer) & (items.multiplier == multiplier)]
    return part.set_index("pair_id").score.reindex(order).to_numpy()


def prompting_meta(
    prompts: Mapping[str, SystemPrompts],
    skipped: Sequence[str],
    compared: Mapping[str, Any],
    layer: int | None,
) -> dict[str, Any]:
    """The sweep file's ``prompting`` metadata: the prompts per behavior, those skipped, the layer
    (None: every swept layer) and the comparisons."""
    return {
        "layer": layer,
        "prompts": {
            b: {"positive": p.positive, "negative": p.negative, "source": p.source}
            for b, p in prompts.items()
        },
        "skipped": list(skipped),
        "comparison": dict(compared),
    }
