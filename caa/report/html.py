"""The HTML of `caa report`'s page: its shell (style, Content-Security-Policy, one measuring script)
and the pieces every section is made of (escaped text, numbers, tables, embedded figures).

The page loads nothing: figures are PNGs embedded as base64, and the only script allowed to run is
named by its hash. Every text from a dataset or an artifact goes through :func:`esc`.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import math
from collections.abc import Iterable, Sequence
from typing import Any

from caa.store.schemas import REPORT_GENERATOR
from caa.store.text import clean

# Records each figure's rendered [width, height, decoded width] on <body data-rendered> once the
# page has loaded; the only script the page's Content-Security-Policy lets run (by its hash).
_MEASURE = (
    'addEventListener("load",function(){var s=[];'
    'document.querySelectorAll("figure img").forEach(function(e){var r=e.getBoundingClientRect();'
    "s.push([Math.round(r.width),Math.round(r.height),e.naturalWidth])});"
    'document.body.setAttribute("data-rendered",JSON.stringify(s))});'
)
_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    f"script-src 'sha256-{base64.b64encode(hashlib.sha256(_MEASURE.encode()).digest()).decode()}'"
)
_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;
 max-width:1240px;margin:0 auto;padding:16px 24px 48px;background:#fff}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:18px;margin:28px 0 6px;border-bottom:1px solid #ccc}
h3{font-size:15px;margin:18px 0 6px}h4{font-size:14px;margin:12px 0 4px}
p,li{max-width:980px}.note{color:#555}.muted{color:#777}
.warnings{background:#fff4e0;border:1px solid #e0a040;padding:6px 14px;border-radius:4px}
.recommend{background:#eaf6ea;border-left:4px solid #3a9a3a;padding:6px 10px}
.unreliable{background:#fff4e0;border-left:4px solid #e0a040;padding:6px 10px}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:4px 0 10px;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 7px;vertical-align:top}
th{background:#f4f4f6;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.picked td{background:#eaf6ea;font-weight:600}
td.gen{white-space:pre-wrap;min-width:220px;max-width:420px}
td.gen.zero{background:#f7f7f9}
table.kv th{width:130px}table.kv td{max-width:1000px}
figure{margin:6px 0 12px}figure img{max-width:100%;height:auto;display:block}
figcaption{color:#555;font-size:12px}
code{font-size:12px}
"""


def page(title: str, body: str) -> str:
    """The whole page: ``body`` (HTML) in the shell, with its style, policy and measuring script."""
    from caa.store.artifacts import package_version

    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">\n'
        f'<meta name="generator" content="{REPORT_GENERATOR} {esc(package_version())}">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{_STYLE}</style>\n"
        f"<script>{_MEASURE}</script>\n"
        f"</head><body>\n{body}\n</body></html>\n"
    )


def esc(value: Any) -> str:
    """Any value as HTML text: control characters (but line breaks and tabs) shown as escapes, as on
    the terminal (caa.store.text.clean: bidi overrides too), then HTML-escaped, quotes included."""
    return html.escape(clean(str(value), "\n\t"), quote=True)


def num(value: Any, fmt: str = "{:.3f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return fmt.format(value)


def number(value: Any) -> str:
    """An option's value as written on the command line: 0.5, 100 (not 100.0)."""
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else esc(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], row_classes: Sequence[str] = ()) -> str:
    """A table of cells given as HTML (already escaped); a cell starting with ``=`` is numeric."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    lines = []
    for i, row in enumerate(rows):
        cells = "".join(f'<td class="n">{c[1:]}</td>' if c.startswith("=") else f"<td>{c}</td>" for c in row)
        cls = f' class="{row_classes[i]}"' if i < len(row_classes) and row_classes[i] else ""
        lines.append(f"<tr{cls}>{cells}</tr>")
    return wrap(head, "".join(lines))


def wrap(head: str, body: str) -> str:
    """A table from its header cells and body rows, scrolling sideways where it is wide."""
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def figure(fig: Any, caption: str) -> str:
    """A Matplotlib figure as an embedded PNG with its caption (``caption`` is HTML)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    width, height = (round(x) for x in fig.get_size_inches() * 100)
    data = base64.b64encode(buf.getvalue()).decode()
    return (
        f'<figure><img src="data:image/png;base64,{data}" width="{width}" height="{height}" '
        f'alt="figure"><figcaption>{caption}</figcaption></figure>'
    )


def new_figure(panels: int, width: float, height: float) -> tuple[Any, Any]:
    """A figure of ``panels`` side by side, made without pyplot (no global state, no GUI backend)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, panels, squeeze=False)[0]
