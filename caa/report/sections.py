"""The sections of `caa report` drawn from artifacts: the vectors' diagnostics, the sweep (scores,
fluency cost, reliability and the recommendation) and the generations side by side, per behavior.

Only the columns shown are read (never the vectors themselves).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from caa.evaluation.comparison import read_comparison, sentence
from caa.evaluation.text_scores import SCORES, score_table
from caa.report.html import esc, figure, new_figure, num, number, table, wrap
from caa.report.plots import PLAIN, draw_score_and_cost, legend
from caa.report.summary import layer_spans
from caa.store.artifacts import read_artifact
from caa.store.schemas import GENERATIONS, SWEEP, VECTORS

VECTOR_COLUMNS = [
    "behavior",
    "layer",
    "method",
    "n_train",
    "n_test",
    "vector_norm",
    "mean_residual_norm",
    "norm_ratio",
    "pair_consistency",
    "cos_prev_layer",
    "cos_next_layer",
    "test_accuracy",
    "test_auc",
]
GENERATION_COLUMNS = ["prompt_index", "prompt", "behavior", "layer", "multiplier", "text", *SCORES]

# --- vectors -------------------------------------------------------------------------------------


def vectors_section(path: Path) -> str:
    frame = read_artifact(path, VECTORS, columns=VECTOR_COLUMNS).table.to_pandas()  # never the vectors
    frame["ratio"] = frame.norm_ratio  # |v| / |h|, as compute-vectors stored it
    parts = [
        '<p class="note">Per layer: |v| the vector\'s norm, |h| the mean residual norm there, their ratio; '
        "cons: mean cosine of the training pairs' differences with their mean; cos−1 / cos+1: cosine with "
        "the adjacent layers' vectors; acc, AUC: separability of the held-out pairs along the vector.</p>"
    ]
    for behavior, part in frame.groupby("behavior", sort=False):
        part = part.sort_values("layer")
        parts.append(f"<h3>{esc(behavior)}</h3>")
        parts.append(_vectors_figure(part))
        parts.append(_vectors_table(part))
    return "\n".join(parts)


def _vectors_figure(part: pd.DataFrame) -> str:
    from matplotlib.ticker import MaxNLocator

    fig, (ratio_ax, sep_ax, cos_ax) = new_figure(3, 12, 2.8)
    ratio_ax.plot(part.layer, part.ratio, marker="o")
    ratio_ax.set_title("|v| / |h|", fontsize=10, **PLAIN)
    sep_ax.plot(part.layer, part.test_auc, marker="o", label="test AUC")
    sep_ax.plot(part.layer, part.pair_consistency, marker="s", label="pair consistency")
    sep_ax.set_title("separability and consistency", fontsize=10, **PLAIN)
    legend(sep_ax, fontsize=8)
    cos_ax.plot(part.layer, part.cos_prev_layer, marker="o")
    cos_ax.set_title("cosine with the previous layer's vector", fontsize=10, **PLAIN)
    for ax in (ratio_ax, sep_ax, cos_ax):
        ax.set_xlabel("layer", **PLAIN)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    layers = layer_spans(int(x) for x in part.layer)
    return figure(fig, f"Diagnostics at layers {layers} ({esc(part.method.iloc[0])} vectors).")


def _vectors_table(part: pd.DataFrame) -> str:
    headers = ["layer", "n train", "n test", "|v|", "|h|", "|v|/|h|", "AUC", "acc", "cons", "cos−1", "cos+1"]
    rows = [
        [
            f"={r.layer}",
            f"={r.n_train}",
            f"={r.n_test}",
            "=" + num(r.vector_norm, "{:.2f}"),
            "=" + num(r.mean_residual_norm, "{:.1f}"),
            "=" + num(r.ratio),
            "=" + num(r.test_auc),
            "=" + num(r.test_accuracy),
            "=" + num(r.pair_consistency),
            "=" + num(r.cos_prev_layer),
            "=" + num(r.cos_next_layer),
        ]
        for r in part.itertuples()
    ]
    return table(headers, rows)


# --- sweep ---------------------------------------------------------------------------------------


def sweep_section(path: Path) -> str:
    art = read_artifact(path, SWEEP)
    frame, meta = art.table.to_pandas(), art.meta
    options = meta.get("options") or {}
    parts = [f"<p>Fluency cost: {_fluency(meta.get('fluency') or {})}.</p>"]
    prompting = meta.get("prompting") or {}
    arms, frame = frame, frame[frame.system == "none"]
    for behavior, part in frame.groupby("behavior", sort=False):
        part = part.sort_values(["layer", "multiplier"])
        pick = _cell((meta.get("recommended") or {}).get(behavior))
        parts.append(f"<h3>{esc(behavior)}</h3>")
        parts.append(_recommendation(meta, str(behavior), part, options))
        parts.append(_sweep_figure(part, pick, options.get("max_kl")))
        parts.append(_sweep_table(part, pick))
        parts.append("<h4>Reliability per layer</h4>")
        parts.append(_reliability_table(part))
        entry = (prompting.get("comparison") or {}).get(behavior)
        if entry is not None:
            parts.append(_against_prompting(arms[arms.behavior == behavior], str(behavior), entry, prompting))
    if prompting.get("skipped"):
        names = ", ".join(str(b) for b in prompting["skipped"])
        parts.append(f'<p class="note">Not compared with prompting (no system prompts): {esc(names)}.</p>')
    return "\n".join(parts)


def _against_prompting(
    rows: pd.DataFrame, behavior: str, entry: Mapping[str, Any], prompting: Mapping[str, Any]
) -> str:
    """Steering against prompting: the score per system prompt and multiplier at the steering
    cell's layer (the paper's Table 3), each gain with its paired interval, and the verdict."""
    parts = ["<h4>Steering against prompting</h4>"]
    prompts = (prompting.get("prompts") or {}).get(behavior) or {}
    said = [f"{arm}: <q>{esc(prompts[arm])}</q>" for arm in ("positive", "negative") if prompts.get(arm)]
    source = f" (from {esc(prompts['source'])})" if prompts.get("source") else ""
    parts.append(f'<p class="note">System prompts{source}: {"; ".join(said)}</p>')
    if entry.get("cell") is None:
        return "\n".join([*parts, f"<p>Not compared: {esc(entry.get('cell_kind'))}.</p>"])
    layer, mult = int(entry["cell"][0]), float(entry["cell"][1])
    rows = rows[rows.layer == layer]
    digits = 3 if rows.score_kind.iloc[0] == "p_match" else 2
    fmt = f"{{:+.{digits}f}}"
    multipliers = sorted(set(rows.multiplier))
    arms = [
        [esc(arm), *(f"={num(means.get(m), f'{{:.{digits}f}}')}" for m in multipliers)]
        for arm, part in rows.groupby("system", sort=False)
        for means in [dict(zip(part.multiplier, part.score_mean, strict=True))]
    ]
    parts.append(f"<p>Mean score per system prompt and multiplier at layer {layer}:</p>")
    parts.append(table(["system prompt", *(f"×{m:g}" for m in multipliers)], arms))
    c = read_comparison(dict(entry))
    gains = [
        [
            label,
            esc(f"layer {layer} ×{mult:g}" if at_cell else "×0"),
            "=" + fmt.format(g.mean),
            f"={num(g.low, fmt)} .. {num(g.high, fmt)}",
        ]
        for label, at_cell, g in c.shown()
    ]
    parts.append(
        f"<p>Gains over the unsteered score without a system prompt ({c.baseline:.{digits}f}), paired over "
        f"the same {c.n} held-out items; the steering cell is the {esc(entry.get('cell_kind'))} one.</p>"
    )
    parts.append(table(["", "cell", "gain", "95% CI"], gains))
    parts.append(f'<p class="recommend"><strong>{esc(sentence(behavior, c, fmt))}</strong></p>')
    return "\n".join(parts)


def _cell(value: Any) -> tuple[int, float] | None:
    return (int(value[0]), float(value[1])) if value else None


def _fluency(fluency: Mapping[str, Any]) -> str:
    """What the KL and perplexity columns measured (the sweep's ``fluency`` metadata), as HTML."""
    source = f" from <code>{esc(fluency['source'])}</code>" if fluency.get("source") else ""
    tokens = f", {esc(fluency['tokens'])} tokens in all" if fluency.get("tokens") is not None else ""
    if fluency.get("kind") == "continuation":
        return (
            "mean KL(unsteered ‖ steered) per token, and the perplexity, over the unsteered model's "
            f"{esc(fluency.get('continuation_tokens'))}-token greedy continuations of "
            f"{esc(fluency.get('texts'))} neutral prompts{source}{tokens}"
        )
    if fluency.get("kind") == "text":
        return (
            "mean KL(unsteered ‖ steered) per token, and the perplexity, at every position of "
            f"{esc(fluency.get('texts'))} neutral texts{source}{tokens}"
        )
    return "the file does not say what the KL and perplexity were measured on"


def _recommendation(
    meta: Mapping[str, Any], behavior: str, part: pd.DataFrame, options: Mapping[str, Any]
) -> str:
    max_kl, max_anti = options.get("max_kl"), options.get("max_anti")
    budget = f"KL ≤ {number(max_kl)}"
    if max_anti is not None:
        budget += f", anti-steerable ≤ {number(max_anti)}"
    pick = _cell((meta.get("recommended") or {}).get(behavior))
    best = _cell((meta.get("best_unreliable") or {}).get(behavior))

    def anti(layer: int) -> str:
        value = part[part.layer == layer].anti_fraction
        share = value.iloc[0] if len(value) else None
        return (
            ""
            if share is None or share != share
            else f"; {share:.0%} of the items steer backwards at this layer"
        )

    if pick:
        return (
            f'<p class="recommend"><strong>Recommended: layer {pick[0]}, multiplier {pick[1]:g}</strong> '
            f"(the largest gain whose paired 95% interval lies above 0, with {budget}{anti(pick[0])}).</p>"
        )
    if best:
        return (
            f'<p class="unreliable"><strong>No cell steers this behavior reliably</strong> with {budget}: '
            f"the best, layer {best[0]} ×{best[1]:g}, has a gain whose 95% interval includes 0"
            f"{anti(best[0])}.</p>"
        )
    return f'<p class="unreliable">No (layer, multiplier) raises the score with {budget}.</p>'


def _sweep_figure(part: pd.DataFrame, pick: tuple[int, float] | None, max_kl: Any) -> str:
    fig, (score_ax, kl_ax) = new_figure(2, 10, 3.4)
    draw_score_and_cost(score_ax, kl_ax, part, pick)  # the same lines as sweep.png
    if isinstance(max_kl, (int, float)):
        kl_ax.axhline(max_kl, color="grey", linestyle="--", linewidth=1, label=f"--max-kl {max_kl:g}")
    score_p = part.score_kind.iloc[0] == "p_match"
    score_ax.set_ylabel("p(matching answer)" if score_p else "log p(pos) − log p(neg)", **PLAIN)
    score_ax.set_title(f"score on {part.n.iloc[0]} held-out pairs (± sem)", fontsize=10, **PLAIN)
    kl_ax.set_ylabel("KL, nats/token", **PLAIN)
    kl_ax.set_title("fluency cost", fontsize=10, **PLAIN)
    kl_ax.set_yscale("symlog", linthresh=0.01)
    highest = max([float(part.kl_mean.max()), max_kl if isinstance(max_kl, (int, float)) else 0, 0.01])
    kl_ax.set_ylim(0, highest * 2)  # room above the highest point on the log part of the scale
    multipliers = sorted(set(part.multiplier))
    for ax in (score_ax, kl_ax):
        ax.set_xlabel("multiplier", **PLAIN)
        if len(multipliers) <= 11:
            ax.set_xticks(multipliers, [f"{m:g}" for m in multipliers], **PLAIN)
        ax.grid(alpha=0.3)
        legend(ax, fontsize=8)
    return figure(fig, "Score (mean ± standard error) and fluency cost per layer and multiplier.")


def _sweep_table(part: pd.DataFrame, pick: tuple[int, float] | None) -> str:
    digits = 3 if part.score_kind.iloc[0] == "p_match" else 2
    rows, classes = [], []
    for r in part.itertuples():
        ci = (
            ""
            if r.multiplier == 0
            else f"{num(r.delta_low, f'{{:+.{digits}f}}')} .. {num(r.delta_high, f'{{:+.{digits}f}}')}"
        )
        rows.append(
            [
                f"={r.layer}",
                f"={r.multiplier:g}",
                "=" + num(r.score_mean),
                "=" + num(r.score_sem),
                f"={r.delta:+.3f}",
                "=" + ci,
                "=" + num(r.kl_mean),
                "=" + num(r.perplexity, "{:.2f}"),
                "=" + num(r.perplexity_delta, "{:+.2f}"),
            ]
        )
        classes.append("picked" if pick == (r.layer, r.multiplier) else "")
    headers = ["layer", "mult", "score", "± sem", "delta", "delta 95% CI", "KL", "ppl", "Δppl"]
    return table(headers, rows, classes)


def _reliability_table(part: pd.DataFrame) -> str:
    rows = []
    for r in part.drop_duplicates("layer").itertuples():
        backward = ", ".join(str(i) for i in list(r.backward_items)[:3])
        rows.append(
            [
                f"={r.layer}",
                "=" + num(r.slope_mean, "{:+.4f}"),
                "=" + num(r.slope_median, "{:+.4f}"),
                "=" + num(r.anti_fraction, "{:.0%}"),
                "=" + f"{num(r.anti_low, '{:.0%}')} .. {num(r.anti_high, '{:.0%}')}",
                f"<code>{esc(backward)}</code>" if backward else "",
            ]
        )
    headers = ["layer", "mean slope", "median slope", "anti-steerable", "95% CI", "most backwards (ids)"]
    note = (
        '<p class="note">Each held-out item\'s score is fitted against the multiplier; anti-steerable is the '
        "share of items with a negative slope (seeded bootstrap interval).</p>"
    )
    return note + table(headers, rows)


# --- generations ---------------------------------------------------------------------------------


def generations_section(path: Path, max_prompts: int) -> str:
    frame = read_artifact(path, GENERATIONS, columns=GENERATION_COLUMNS).table.to_pandas()
    parts = []
    for (behavior, layer), part in frame.groupby(["behavior", "layer"], sort=False):
        multipliers = sorted(set(part.multiplier))
        prompts = sorted(set(part.prompt_index))
        parts.append(f"<h3>{esc(behavior)} at layer {esc(layer)}</h3>")
        if len(prompts) > max_prompts:
            parts.append(f'<p class="note">The first {max_prompts} of {len(prompts)} prompts.</p>')
        texts = {(r.prompt_index, r.multiplier): r.text for r in part.itertuples()}
        first = part.drop_duplicates("prompt_index").set_index("prompt_index").prompt
        rows = [
            [esc(first[i]), *(f"{esc(texts.get((i, m), ''))}" for m in multipliers)]
            for i in prompts[:max_prompts]
        ]
        headers = ["prompt", *(f"×{m:g}" + (" (unsteered)" if m == 0 else "") for m in multipliers)]
        parts.append(_scores_table(part))
        parts.append(_generation_table(headers, rows, [m == 0 for m in multipliers]))
    return "\n".join(parts)


SCORE_HEADS = {"probe": "probe score", "judge": "judge rating (1-10)"}


def _scores_table(part: pd.DataFrame) -> str:
    """The probe score and the judge's rating per multiplier, over all the prompts (not only those
    shown), each a mean with its 95% interval; nothing when neither was taken."""
    scores = score_table(part)
    names = [n for n in SCORE_HEADS if f"{n}_mean" in scores]
    if not names:
        return ""
    rows = []
    for r in scores.to_dict(orient="records"):
        cells = [f"=×{r['multiplier']:g}"]
        for n in names:
            cells += [
                "=" + num(r[f"{n}_mean"], "{:.3g}"),
                "=" + f"{num(r[f'{n}_low'], '{:.3g}')} .. {num(r[f'{n}_high'], '{:.3g}')}",
                f"={r[f'{n}_n']}",
            ]
        rows.append(cells)
    headers = ["multiplier", *(h for n in names for h in (SCORE_HEADS[n], "95% CI", "n"))]
    note = (
        '<p class="note">Probe score: the unsteered model\'s residual stream at the layer, averaged over '
        "the generated tokens (not the prompt), projected on the unit vector. Judge rating: the judge "
        "model's 1-10 rating for the behavior (unparseable replies left out). Means over the prompts, "
        "with 95% t-intervals.</p>"
    )
    return note + table(headers, rows)


def _generation_table(headers: list[str], rows: list[list[str]], zero: list[bool]) -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + f'<td class="gen">{row[0]}</td>'
        + "".join(
            f'<td class="gen{" zero" if z else ""}">{c}</td>' for c, z in zip(row[1:], zero, strict=True)
        )
        + "</tr>"
        for row in rows
    )
    return wrap(head, body)
