"""The sweep's figure: per behavior, score and fluency cost against the multiplier, and the items'
slopes per layer.

Every label is text, never math: matplotlib reads a string with two ``$`` as mathtext (a behavior
``greed$$`` fails to draw, ``cost $5 vs $6`` is drawn in italics without its dollars) and, under a
matplotlibrc with ``text.usetex``, hands it to TeX. Every text artist drawn here and in
:mod:`caa.report.sections` is made with :data:`PLAIN` (legends through :func:`legend`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from caa.store.schemas import PNG_SOFTWARE

PLAIN: dict[str, Any] = {"usetex": False, "parse_math": False}  # Text properties: drawn as written


def legend(ax: Any, **kwargs: Any) -> Any:
    """``ax.legend(**kwargs)`` with its labels drawn as written (see :data:`PLAIN`)."""
    made = ax.legend(**kwargs)
    for text in made.get_texts():
        text.update(PLAIN)
    return made


def plot_sweep(
    table: pd.DataFrame,
    items: pd.DataFrame,
    recommended: Mapping[str, tuple[int, float] | None],
    out: Path,
    *,
    max_kl: float,
    fluency_kind: str | None,
    residual: bool,
) -> None:
    """One row per behavior: score vs multiplier per layer (with standard errors), the KL cost, and
    the distribution of per-item slopes per layer (how many items steer backwards). ``table`` and
    ``items`` are a sweep's two tables; ``fluency_kind`` is what its cost read (``continuation`` or
    neutral text); ``residual``: the multipliers are in units of the layer's mean residual norm."""
    fig = sweep_figure(table, items, recommended, max_kl=max_kl, fluency_kind=fluency_kind, residual=residual)
    # into ``out`` as it is: a temporary of ``atomic_paths``, committed with the table
    fig.savefig(out, dpi=110, format="png", metadata={"Software": PNG_SOFTWARE})


def sweep_figure(
    table: pd.DataFrame,
    items: pd.DataFrame,
    recommended: Mapping[str, tuple[int, float] | None],
    *,
    max_kl: float,
    fluency_kind: str | None,
    residual: bool,
) -> Any:
    """The figure :func:`plot_sweep` saves (a matplotlib ``Figure``), laid out, not yet drawn."""
    from matplotlib.figure import Figure  # no pyplot: no global figures, no GUI backend, a faster import

    behaviors = list(dict.fromkeys(table.behavior))
    unit = "multiplier (x the layer's mean residual norm)" if residual else "multiplier (x the vector)"
    fig = Figure(figsize=(16, 4.3 * len(behaviors)))
    axes = fig.subplots(len(behaviors), 3, squeeze=False)
    for (score_ax, kl_ax, slope_ax), behavior in zip(axes, behaviors, strict=True):
        part = table[table.behavior == behavior]
        draw_score_and_cost(score_ax, kl_ax, part, recommended.get(behavior))
        kind = part.score_kind.iloc[0]
        score_ax.set_ylabel("p(matching answer)" if kind == "p_match" else "log p(pos) - log p(neg)", **PLAIN)
        score_ax.set_title(f"{behavior}: score on held-out pairs (n={part.n.iloc[0]})", fontsize=10, **PLAIN)
        kl_ax.axhline(max_kl, color="grey", linestyle="--", linewidth=1, label=f"--max-kl {max_kl}")
        continuation = fluency_kind == "continuation"
        kl_ax.set_title(
            f"{behavior}: fluency cost on "
            + ("continuations of neutral prompts" if continuation else "neutral text"),
            fontsize=10,
            **PLAIN,
        )
        kl_ax.set_ylabel("mean KL(unsteered || steered), nats/token", **PLAIN)
        kl_ax.set_yscale("symlog", linthresh=0.01)
        kl_ax.set_ylim(bottom=0)
        for ax in (score_ax, kl_ax):
            ax.set_xlabel(unit, **PLAIN)
            ax.grid(alpha=0.3)
            legend(ax, fontsize=8)
        _plot_slopes(slope_ax, items[items.behavior == behavior], part, behavior)
    fig.tight_layout()
    # tight_layout leaves a placeholder layout engine, which makes savefig draw the figure twice
    fig.set_layout_engine(None)
    return fig


def draw_score_and_cost(
    score_ax: Any, kl_ax: Any, part: pd.DataFrame, pick: tuple[int, float] | None = None
) -> None:
    """One behavior's sweep rows: score (± standard error) and KL against the multiplier, a line per
    layer, with the recommended cell circled."""
    for layer, g in part.groupby("layer"):
        label = f"layer {layer}"
        score_ax.errorbar(
            g.multiplier, g.score_mean, yerr=g.score_sem.fillna(0), marker="o", capsize=3, label=label
        )
        kl_ax.plot(g.multiplier, g.kl_mean, marker="o", label=label)
    row = part[(part.layer == pick[0]) & (part.multiplier == pick[1])] if pick else part.iloc[:0]
    if pick and len(row):
        score_ax.scatter(
            [pick[1]],
            [row.score_mean.iloc[0]],
            s=250,
            facecolors="none",
            edgecolors="red",
            label=f"recommended: layer {pick[0]}, x{pick[1]:g}",
        )


def _plot_slopes(ax: Any, items: pd.DataFrame, part: pd.DataFrame, behavior: str) -> None:
    """Per layer, each item's slope (a dot) over a box of their distribution, with the share below 0."""
    per_item = items.drop_duplicates(["layer", "pair_id"])
    layers = sorted(per_item.layer.unique())
    data = [per_item[per_item.layer == layer].slope.dropna().to_numpy() for layer in layers]
    if not any(len(d) for d in data):
        ax.text(
            0.5, 0.5, "one multiplier: no slopes", ha="center", va="center", transform=ax.transAxes, **PLAIN
        )
        ax.set_axis_off()
        return
    ax.boxplot(data, positions=range(len(layers)), widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)
    labels = []
    for x, values in enumerate(data):
        ax.scatter(x + rng.uniform(-0.15, 0.15, len(values)), values, s=9, alpha=0.5, color="tab:blue")
        anti = part[part.layer == layers[x]].anti_fraction.iloc[0]
        labels.append(f"layer {layers[x]}" + (f"\n{anti:.0%} backwards" if anti == anti else ""))
    ax.axhline(0, color="tab:red", linewidth=1, linestyle=":")
    ax.set_xticks(range(len(layers)), labels, **PLAIN)
    ax.set_ylabel("per-item slope: score change per unit multiplier", **PLAIN)
    ax.set_title(f"{behavior}: per-item steerability (below 0: steers backwards)", fontsize=10, **PLAIN)
    ax.grid(alpha=0.3, axis="y")
