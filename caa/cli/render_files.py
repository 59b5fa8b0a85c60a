"""What `caa inspect` prints: a file's metadata and summary, every value shown in a few characters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Column, Table

from caa import api
from caa.cli.common import escape, out


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
