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
    steered = f"L{layer} x{mult:g}"
    shown = [
        ("steering", steered, comparison.steering),
        ("positive prompt", "x0", comparison.prompt),
        ("prompt + steering", steered, comparison.both),
    ]
    if comparison.negative_prompt is not None:
        shown.append(("negative prompt", "x0", comparison.negative_prompt))
    for label, where, gain in shown:
        ci = "-" if gain.low != gain.low else f"{gain.low:+.{digits}f}..{gain.high:+.{digits}f}"
        gains.add_row(label, where, f"{gain.mean:+.{digits}f}", ci)
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


def inspection(file: Path, report: Any) -> None:
    """An artifact's metadata, inputs, summary and breakdown, as tables."""

    out.print(
        f"[bold]{escape(str(file))}[/]: {report.kind}, {_size(report.size_bytes)}, "
        f"{report.rows} rows in {report.row_groups} row group(s)"
    )
    meta = report.meta
    shown = ("kind", "command", "schema_version", "caa_version", "created", "options", "model", "prompt")
    info = _key_value_table("metadata")
    for key in shown:
        if meta.get(key) is not None:
            info.add_row(key, _shown(key, meta[key]))
    for key, value in meta.items():
        if key not in (*shown, "inputs"):
            brief = (
                f"{len(value)} items: {', '.join(map(str, value[:4]))}, ..."
                if isinstance(value, list) and len(value) > 8
                else json.dumps(value)
            )  # e.g. the thousands of train_pair_ids of a vectors file
            info.add_row(escape(key), escape(brief))
    out.print(info)
    if report.inputs:
        inputs = Table(
            "input", "sha256", "status", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title="inputs"
        )
        colour = {"unchanged": "green", "changed": "yellow", "missing": "yellow", "unchecked": "dim"}
        for i in report.inputs:
            shade = colour.get(i.status, "yellow")  # special files and unreadable ones: not hashed
            inputs.add_row(escape(i.path), escape(str(i.sha256)[:12]), f"[{shade}]{i.message}[/]")
        out.print(inputs)
    summary = _key_value_table(f"{report.kind} summary")
    for key, value in report.summary.items():
        summary.add_row(key, _shown(key, value))
    out.print(summary)
    if report.breakdown:
        names = list(report.breakdown[0])
        headers = [n.replace("_", " ") for n in names]  # lets a narrow terminal wrap the headers
        rows = Table(
            Column(headers[0], no_wrap=True),
            *headers[1:],
            box=box.SIMPLE_HEAD,
            show_edge=False,
            pad_edge=False,
        )
        for row in report.breakdown:
            rows.add_row(*[_shown(k, row[k]) for k in names])
        out.print(rows)
    for i in report.inputs:
        if i.status not in ("unchanged", "unchecked"):
            out.print(f"[yellow]note:[/] input {escape(i.path)} {i.message}")


def _key_value_table(title: str) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_header=False, show_edge=False, pad_edge=False, title=title)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    return table


def _shown(key: str, value: Any, inline: bool = False) -> str:
    """One metadata or summary value as table text: layers as spans, ranges as a..b, dicts as lines."""
    layer_spans = api.layer_spans
    if value is None or value == [] or value == {}:
        return "-"
    if isinstance(value, dict):
        sep, join = ("=", ", ") if inline else (": ", "\n")
        return join.join(f"{escape(str(k))}{sep}{_shown(str(k), v, True)}" for k, v in value.items())
    if isinstance(value, list) and key.endswith("layers") and all(isinstance(v, int) for v in value):
        return layer_spans(value)
    if isinstance(value, list) and key.endswith("_range") and len(value) == 2:
        return f"{_shown(key, value[0])} .. {_shown(key, value[1])}"
    if isinstance(value, list):
        return ", ".join(_shown(key, v) for v in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return escape(str(value))


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


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
