"""caa.report.plots: the sweep's PNG figure from its two tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from caa.report.html import new_figure
from caa.report.plots import draw_score_and_cost, plot_sweep, sweep_figure
from caa.store.schemas import PNG_SOFTWARE

PNG = b"\x89PNG\r\n\x1a\n"


def _tables(behaviors: list[str], multipliers: list[float]) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, items = [], []
    for b, behavior in enumerate(behaviors):
        for layer in (1, 2):
            for m in multipliers:
                rows.append(
                    {
                        "behavior": behavior,
                        "layer": layer,
                        "multiplier": m,
                        "score_kind": "p_match" if b == 0 else "logp_diff",
                        "score_mean": 0.5 + 0.1 * m * layer,
                        "score_sem": np.nan if layer == 2 else 0.02,
                        "n": 3,
                        "kl_mean": 0.01 * abs(m) * layer,
                        "anti_fraction": np.nan if len(multipliers) == 1 else 1 / 3,
                    }
                )
                for i in range(3):
                    slope = np.nan if len(multipliers) == 1 else 0.1 * (i - 1) * layer
                    items.append({"behavior": behavior, "layer": layer, "multiplier": m, "pair_id": f"p{i}",
                                  "score": 0.5, "slope": slope})  # fmt: skip
    return pd.DataFrame(rows), pd.DataFrame(items)


def test_plot_sweep_writes_a_png_marked_as_caa_sweeps(tmp_path: Path) -> None:
    table, items = _tables(["agree", "mood"], [-1.0, 0.0, 1.5])
    out = tmp_path / "sweep.png"
    plot_sweep(table, items, {"agree": (2, 1.5), "mood": None}, out, max_kl=0.1, fluency_kind="continuation",
               residual=False)  # fmt: skip
    assert out.read_bytes().startswith(PNG)
    with Image.open(out) as image:
        assert image.info["Software"] == PNG_SOFTWARE
        assert image.size == (16 * 110, round(4.3 * 2 * 110))  # a row of panels per behavior


@pytest.mark.parametrize("behavior", ["cost $5", "a $x$ b", "50% _under_ {braces} \\n", "greed$$"])
def test_plot_sweep_takes_any_behavior_name(tmp_path: Path, behavior: str) -> None:
    table, items = _tables([behavior], [0.0, 2.0])
    out = tmp_path / "sweep.png"
    plot_sweep(table, items, {behavior: (1, 2.0)}, out, max_kl=1.0, fluency_kind="text", residual=True)
    assert out.read_bytes().startswith(PNG)


def test_one_multiplier_has_no_slopes_and_still_plots(tmp_path: Path) -> None:
    table, items = _tables(["agree"], [0.0])
    out = tmp_path / "sweep.png"
    plot_sweep(table, items, {}, out, max_kl=1.0, fluency_kind=None, residual=False)
    with Image.open(out) as image:
        assert image.size == (16 * 110, round(4.3 * 110))


def test_draw_score_and_cost_draws_a_line_per_layer_and_circles_the_pick() -> None:
    table, _ = _tables(["agree"], [-1.0, 0.0, 1.0])
    _, (score_ax, kl_ax) = new_figure(2, 6, 3)
    draw_score_and_cost(score_ax, kl_ax, table, (2, 1.0))
    assert [line.get_label() for line in kl_ax.get_lines()] == ["layer 1", "layer 2"]
    np.testing.assert_allclose(kl_ax.get_lines()[1].get_ydata(), [0.02, 0.0, 0.02])
    circled = [c for c in score_ax.collections if c.get_label().startswith("recommended")]
    assert [c.get_label() for c in circled] == ["recommended: layer 2, x1"]
    np.testing.assert_allclose(circled[0].get_offsets(), [[1.0, 0.7]])
    _, (s2, k2) = new_figure(2, 6, 3)
    draw_score_and_cost(s2, k2, table, (5, 1.0))  # a pick not in the table: no circle
    assert not [c for c in s2.collections if c.get_label().startswith("recommended")]


# two dollars make mathtext (an empty formula fails to draw); `cost $5 vs $6` would lose its dollars;
# a backslash before a dollar is matplotlib's escape, and must stay as written too
LITERAL_NAMES = ["greed$$", "cost $5 vs $6", "a $x$ b", "\\$ and $\\", "$\\frac{1}{0}$", "^_{}%"]


@pytest.mark.parametrize("behavior", LITERAL_NAMES)
def test_plot_labels_are_drawn_as_written(tmp_path: Path, behavior: str) -> None:
    """The figure draws, and every title, label and legend entry renders its text literally."""
    import matplotlib as mpl

    table, items = _tables([behavior], [-1.0, 0.0, 2.0])
    with mpl.rc_context({"text.usetex": False}):
        fig = sweep_figure(
            table, items, {behavior: (1, 2.0)}, max_kl=1.0, fluency_kind="text", residual=False
        )
        fig.savefig(tmp_path / "sweep.png", format="png")  # draws every artist
    titles = [ax.title for ax in fig.axes]
    assert [t.get_text().split(": ")[0] for t in titles] == [behavior] * 3
    texts = [*titles, *(t for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts())]
    texts += [ax.xaxis.label for ax in fig.axes] + [ax.yaxis.label for ax in fig.axes]
    for text in texts:
        # what matplotlib draws: the string as given, not parsed as math (False) nor handed to TeX
        assert text._preprocess_math(text.get_text()) == (text.get_text(), False)
    assert titles[0].get_text() == f"{behavior}: score on held-out pairs (n=3)"


def test_report_figures_draw_text_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """The report's figures (caa.report.sections) use the same plain text artists."""
    import caa.report.sections as sections

    drawn: list[Any] = []
    real = sections.figure
    monkeypatch.setattr(sections, "figure", lambda fig, caption: drawn.append(fig) or real(fig, caption))
    table, _ = _tables(["cost $5 vs $6"], [-1.0, 0.0, 1.0])
    sections._sweep_figure(table, (1, 1.0), 0.5)
    (fig,) = drawn
    for ax in fig.axes:
        for text in [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.get_legend().get_texts()]:
            assert not text.get_usetex() and not text.get_parse_math(), text.get_text()
