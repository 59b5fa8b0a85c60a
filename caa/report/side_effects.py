"""The report's side-effects section (`caa sweep --side-effects`): what each behavior's chosen cell
does to the held-out items of other sets of pairs and to the capability probe."""

from __future__ import annotations

from pathlib import Path

from caa.report.html import esc, num, table
from caa.store.artifacts import read_artifact
from caa.store.schemas import SIDE_EFFECTS


def side_effects_section(path: Path) -> str:
    """One table per file: a row per (behavior, other set), the change with its paired interval;
    rows whose interval excludes 0 are marked."""
    art = read_artifact(path, SIDE_EFFECTS)
    frame = art.table.to_pandas()
    created = esc(art.meta.get("created", "?"))
    made = f'<p class="muted">from <code>{esc(path)}</code>, the sweep of {created}</p>'
    note = (
        '<p class="note">Each behavior\'s recommended cell (or, marked "best", its best gain when none was '
        "recommended) scored on the held-out items of the other sets: p(match) on A/B sets (on capability, "
        "p(the correct answer)), log p(pos) − log p(neg) on free-form ones. Change: steered minus unsteered "
        "on the same items, with its paired 95% interval; ✱ where the interval excludes 0.</p>"
    )
    note = made + note
    if frame.empty:
        return (
            note
            + '<p class="note">No behavior had a cell to evaluate (no positive gain within the budget).</p>'
        )
    rows, classes = [], []
    for r in frame.itertuples():
        digits = "{:+.3f}" if r.score_kind == "p_match" else "{:+.2f}"
        moved = r.delta_low == r.delta_low and not r.delta_low <= 0 <= r.delta_high
        rows.append(
            [
                esc(r.behavior),
                f"={r.layer}",
                f"={r.multiplier:g}",
                esc(r.cell),
                esc(r.target),
                esc(r.source),
                f"={r.n}",
                "=" + num(r.unsteered),
                "=" + num(r.steered),
                "=" + num(r.delta, digits) + (" ✱" if moved else ""),
                f"={num(r.delta_low, digits)} .. {num(r.delta_high, digits)}",
            ]
        )
        classes.append("picked" if moved else "")
    headers = [
        "behavior",
        "layer",
        "mult",
        "cell",
        "on",
        "source",
        "n",
        "unsteered",
        "steered",
        "change",
        "95% CI",
    ]
    return note + table(headers, rows, classes)
