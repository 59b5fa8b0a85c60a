"""Every table the command line prints, in one place: a command computes through the API, then hands
its values here. Tables are rich tables on the standard output; text from data goes through
:func:`caa.cli.common.escape`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Column, Table

from caa import api
from caa.cli.common import escape, out


def vectors(frame: Any, method: str) -> None:
    """The vectors and their diagnostics, one row per behavior x layer."""
    table = Table(
        Column("behavior", no_wrap=True),
        "layer",
        "n",
        "|v|",
        "|h|",
        "v/h",
        "cos-1",
        "cos+1",
        "cons",
        "acc",
        "AUC",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1, 0, 0),  # one space between columns: the table fits an 80-column terminal
        title=f"{method} vectors",
        caption="|h|: mean residual norm; v/h: |v| / |h|; cos±1: with the adjacent layers' vectors; cons: "
        "mean cosine of the training pairs' differences with their mean; acc, AUC: separability on the "
        "test split",
    )

    def num(x: object, fmt: str = "{:.3f}") -> str:
        return "-" if x is None or x != x else fmt.format(x)

    for r in frame.itertuples():
        table.add_row(
            escape(r.behavior),
            str(r.layer),
            str(r.n_train),
            num(r.vector_norm, "{:.2f}"),
            num(r.mean_residual_norm, "{:.0f}"),
            num(r.norm_ratio),
            num(r.cos_prev_layer, "{:.2f}"),
            num(r.cos_next_layer, "{:.2f}"),
            num(r.pair_consistency, "{:.2f}"),
            num(r.test_accuracy, "{:.2f}"),
            num(r.test_auc, "{:.2f}"),
        )
    out.print(table)


def sweep(result: Any, max_kl: float, max_anti: float | None) -> None:
    fluency_label = api.fluency_label

    def num(x: float, fmt: str) -> str:
        return "-" if x != x else fmt.format(x)

    residual = (result.meta.get("options") or {}).get("scale") == "residual"
    unit = "the layer's mean residual norm" if residual else "the vector"
    prompting = result.meta.get("prompting")
    for name, part in api.unprompted(result.table).groupby("behavior", sort=False):
        kind = "p(match)" if part.score_kind.iloc[0] == "p_match" else "log p(pos) - log p(neg)"
        table = Table(
            "layer",
            "mult",
            "score",
            "± sem",
            "delta",
            "95% CI",
            "KL",
            "ppl",
            "Δppl",
            box=box.SIMPLE_HEAD,
            show_edge=False,
            pad_edge=False,
            title=f"{escape(name)}: score = {kind} on {part.n.iloc[0]} held-out pairs; "
            f"delta's paired 95% CI; KL {fluency_label(result.fluency)}; multipliers of {unit}",
        )
        for r in part.itertuples():
            digits = 3 if r.score_kind == "p_match" else 2
            ci = (
                ""
                if r.multiplier == 0
                else "-"
                if r.delta_low != r.delta_low
                else f"{r.delta_low:+.{digits}f}..{r.delta_high:+.{digits}f}"
            )
            table.add_row(
                str(r.layer),
                f"{r.multiplier:g}",
                f"{r.score_mean:.3f}",
                num(r.score_sem, "{:.3f}"),
                f"{r.delta:+.3f}",
                ci,
                f"{r.kl_mean:.3f}",
                f"{r.perplexity:.2f}",
                f"{r.perplexity_delta:+.2f}",
            )
        out.print(table)
        steerability(part)
        recommendation(result, name, part, max_kl, max_anti)
        if prompting and name in (prompting.get("comparison") or {}):
            against_prompting(result.table, str(name), prompting)
    if prompting and prompting.get("skipped"):
        names = ", ".join(escape(str(b)) for b in prompting["skipped"])
        out.print(f"[yellow]not compared with prompting[/] (no system prompts): {names}")


def against_prompting(table: Any, name: str, prompting: dict[str, Any]) -> None:
    """One behavior under each system prompt per multiplier (the paper's Table 3), and steering
    against prompting: each gain over the unsteered, unprompted score with its paired 95% interval."""
    entry = prompting["comparison"][name]
    cell = entry.get("cell")
    if cell is None:
        out.print(f"{escape(name)}: not compared with prompting: {escape(entry['cell_kind'])}")
        return
    layer, mult = int(cell[0]), float(cell[1])
    rows = table[(table.behavior == name) & (table.layer == layer)]
    digits = 3 if rows.score_kind.iloc[0] == "p_match" else 2
    multipliers = sorted(set(rows.multiplier))
    arms = Table(
        "system prompt",
        *[f"x{m:g}" for m in multipliers],
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        title=f"{escape(name)} at layer {layer}: mean score per system prompt and multiplier",
    )
    for arm, part in rows.groupby("system", sort=False):
        means = dict(zip(part.multiplier, part.score_mean, strict=True))
        arms.add_row(escape(str(arm)), *[f"{means[m]:.{digits}f}" if m in means else "" for m in multipliers])
    out.print(arms)
    comparison = api.read_comparison(entry)
    gains = Table(
        "",
        "cell",
        "gain",
        "95% CI",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        title=f"{escape(name)}: gains over the unsteered score without a system prompt "
        f"({comparison.baseline:.{digits}f}), paired over the same {comparison.n} items; steering cell: "
        f"{escape(entry['cell_kind'])}",
    )
    for label, at_cell, gain in comparison.shown():
        ci = "-" if gain.low != gain.low else f"{gain.low:+.{digits}f}..{gain.high:+.{digits}f}"
        gains.add_row(label, f"L{layer} x{mult:g}" if at_cell else "x0", f"{gain.mean:+.{digits}f}", ci)
    out.print(gains)
    out.print(f"[bold]{escape(api.sentence(name, comparison, f'{{:+.{digits}f}}'))}[/]")


def steerability(part: Any) -> None:
    """Per layer: the items' slopes, and the share (with its interval) that steers backwards."""
    table = Table(
        "layer",
        "mean slope",
        "median",
        "anti-steerable",
        "95% CI",
        "most backwards",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        title="per-item steerability (slope of each item's score against the multiplier)",
    )
    for _, r in part.drop_duplicates("layer").iterrows():
        if r.anti_fraction != r.anti_fraction:
            table.add_row(str(r.layer), "-", "-", "-", "-", "")
            continue
        table.add_row(
            str(r.layer),
            f"{r.slope_mean:+.4f}",
            f"{r.slope_median:+.4f}",
            f"{r.anti_fraction:.0%}",
            f"[{r.anti_low:.0%}, {r.anti_high:.0%}]",
            escape(", ".join(i[:8] for i in r.backward_items[:2])),
        )
    out.print(table)


def recommendation(result: Any, name: str, part: Any, max_kl: float, max_anti: float | None) -> None:
    budget = f"KL <= {max_kl:g}" + (f", anti-steerable <= {max_anti:.0%}" if max_anti is not None else "")

    def anti(layer: int) -> str:
        value = part[part.layer == layer].anti_fraction.iloc[0]
        return "" if value != value else f"; {value:.0%} of items steer backwards at this layer"

    pick, best = result.recommended.get(name), result.best.get(name)
    if pick:
        out.print(
            f"[bold]recommended for {escape(name)}: layer {pick[0]}, multiplier {pick[1]:g}[/] "
            f"(largest gain whose 95% interval is above 0, with {budget}{anti(pick[0])})"
        )
    elif best:
        out.print(
            f"[yellow]no cell steers {escape(name)} reliably[/] with {budget}: the best, layer {best[0]} "
            f"x{best[1]:g}, has a gain whose 95% interval includes 0{anti(best[0])}"
        )
    else:
        out.print(f"no (layer, multiplier) raises the {escape(name)} score with {budget}")


def generations(gens: Any, layer: int, scale: str, mults: list[float]) -> None:
    frame = gens.frame
    unit = "the layer's mean residual norm" if scale == "residual" else "the vector"
    title = f"{escape(frame.behavior.iloc[0])} at layer {layer} (multipliers of {unit})"
    table = Table("prompt", *[f"x{m:g}" for m in mults], title=title, show_lines=True)
    for _, group in frame.groupby("prompt_index", sort=True):
        table.add_row(
            escape(group.prompt.iloc[0], "\n"),
            *[escape(t, "\n") for t in group.sort_values("multiplier").text],
        )
    out.print(table)


def text_scores(gens: Any) -> None:
    """The probe score and the judge's rating per multiplier, each a mean with its 95% interval
    (nothing when neither was asked for), and how many ratings were unparseable."""
    scores = gens.scores()
    names = [n for n in ("probe", "judge") if f"{n}_mean" in scores]
    if not names:
        return
    heads = {"probe": "probe score (mean, 95% CI)", "judge": "judge rating 1-10 (mean, 95% CI)"}
    table = Table(
        "multiplier", *(heads[n] for n in names), box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False
    )
    for r in scores.to_dict(orient="records"):
        table.add_row(f"x{r['multiplier']:g}", *(_mean_interval(r, n) for n in names))
    out.print(table)
    judge = gens.meta.get("judge")
    if judge and judge.get("unparseable"):
        out.print(
            f"[yellow]{judge['unparseable']} of {judge['rated']} ratings unparseable[/] (stored as null, "
            "left out of the means)"
        )


def _mean_interval(row: dict[str, Any], name: str) -> str:
    mean, low, high, n = (row[f"{name}_{s}"] for s in ("mean", "low", "high", "n"))
    if n == 0:
        return "-"
    if n < 2:
        return f"{mean:.3g} (n=1)"
    return f"{mean:.3g} [{low:.3g}, {high:.3g}] (n={n})"


def pairs(result: Any) -> None:
    """What `caa ingest` read: pairs per behavior and split."""
    table = Table("behavior", "format", "train", "test", title=f"{len(result)} pairs")
    formats = dict(zip(result.frame.behavior, result.frame.format, strict=True))
    for name, counts in result.counts().items():
        table.add_row(escape(name), escape(formats[name]), str(counts["train"]), str(counts["test"]))
    out.print(table)


def datasets(found: Sequence[Any], where: Path) -> None:
    """The built-in datasets' cards, and where they are."""
    sources = sorted({card.source for card in found})
    table = Table(
        Column("name", no_wrap=True),
        Column("format", no_wrap=True),
        Column("size", justify="right", no_wrap=True),
        Column("licence", no_wrap=True),
        *([Column("source", ratio=1)] if len(sources) > 1 else []),
        Column("behavior", ratio=2),
        title=f"built-in datasets and neutral texts, in {escape(str(where))}",
        box=box.SIMPLE_HEAD,
    )
    for card in found:
        source = [escape(card.source)] if len(sources) > 1 else []
        size = f"{card.count} {escape(card.unit)}"
        table.add_row(
            escape(card.name),
            escape(card.format),
            size,
            escape(card.licence),
            *source,
            escape(card.description),
        )
    out.print(table)
    if len(sources) == 1:
        out.print(f"source of every file: {escape(sources[0])}")


def serving(plan: Any) -> None:
    """What ``caa serve`` prints once the server answers: where, what is loaded, and a request to copy."""
    behavior, layers = next(iter(plan.behaviors.items()))
    layer = layers[-1]
    key_header = " -H 'Authorization: Bearer $CAA_API_KEY'" if plan.api_key else ""
    key_arg = 'os.environ["CAA_API_KEY"]' if plan.api_key else '"unused"'
    body = {
        "model": plan.model_name,
        "messages": [{"role": "user", "content": "Describe your morning."}],
        "max_tokens": 48,
        "steering": {"behavior": behavior, "layer": layer, "multiplier": 2.0},
    }
    table = Table(
        Column("behavior"), Column("layers"), box=box.SIMPLE, title=f"steering vectors ({plan.vectors})"
    )
    for name, at in plan.behaviors.items():
        table.add_row(escape(name), ", ".join(map(str, at)))
    out.print(
        f"\n[bold green]caa serve[/] is up: [bold]{escape(plan.url)}[/] (model '{escape(plan.model_name)}')"
    )
    out.print(table)
    out.print(
        f"steerable layers {', '.join(map(str, plan.steerable))}; "
        f"GET/POST {escape(plan.url)}/steering/vectors"
        + ("; every /v1 route needs the API key" if plan.api_key else "")
    )
    out.print("\n[bold]curl[/]", highlight=False)
    out.out(
        f"curl {plan.url}/chat/completions -H 'Content-Type: application/json'{key_header} \\\n"
        f"  -d '{json.dumps(body)}'",
        highlight=False,
    )
    out.print("\n[bold]python (openai)[/]", highlight=False)
    out.out(
        "import os\nfrom openai import OpenAI\n"
        f'client = OpenAI(base_url="{plan.url}", api_key={key_arg})\n'
        "reply = client.chat.completions.create(\n"
        f'    model="{plan.model_name}",\n'
        '    messages=[{"role": "user", "content": "Describe your morning."}],\n'
        f'    extra_body={{"steering": {{"behavior": "{behavior}", "layer": {layer}, "multiplier": 2.0}}}})\n'
        "print(reply.choices[0].message.content)",
        highlight=False,
    )
    out.print("\nCtrl-C stops the server and its engine processes.")


def side_effects(frame: Any) -> None:
    """What each behavior's chosen cell does off target: one row per (behavior, other set)."""
    table = Table(
        Column("behavior", no_wrap=True),
        "cell",
        Column("on", no_wrap=True),
        "n",
        "x0",
        "steered",
        "change",
        Column("95% CI", no_wrap=True),
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1, 0, 0),
        title="side effects: each behavior's cell on the held-out items of the other sets",
        caption="score: p(match) on A/B sets (capability: p(correct answer)), log p(pos) - log p(neg) on "
        "free-form ones; x0: unsteered; change: steered minus unsteered on the same items, with its "
        "paired 95% CI",
    )
    for r in frame.itertuples():
        digits = 3 if r.score_kind == "p_match" else 2
        ci = "-" if r.delta_low != r.delta_low else f"{r.delta_low:+.{digits}f}..{r.delta_high:+.{digits}f}"
        moved = "" if r.delta_low != r.delta_low or r.delta_low <= 0 <= r.delta_high else " *"
        table.add_row(
            escape(r.behavior),
            f"{r.layer} x{r.multiplier:g}" + ("" if r.cell == "recommended" else " (best)"),
            escape(r.target),
            str(r.n),
            f"{r.unsteered:.{digits}f}",
            f"{r.steered:.{digits}f}",
            f"{r.delta:+.{digits}f}{moved}",
            ci,
        )
    out.print(table)
    if len(frame):
        out.print("* the interval excludes 0: steering changed this set; (best): no cell was recommended")
    else:
        out.print("side effects: no behavior had a cell to evaluate (no positive gain within the budget)")
