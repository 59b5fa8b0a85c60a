"""`caa report`: one self-contained HTML page on a run's artifacts, readable offline.

Per behavior: the vectors' diagnostics per layer, the sweep (scores, fluency cost, reliability and
the recommendation), and the generations side by side per multiplier; then the provenance of every
file, with warnings where an input changed or is gone. Figures are PNGs embedded as base64; the page
loads nothing (its Content-Security-Policy forbids it) and runs one script of its own, which records
the rendered size of each figure on ``<body data-rendered>`` (the browser test reads it). Every text
that comes from a dataset or an artifact is HTML-escaped. Only the columns shown are read.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from caa.artifacts import (
    GENERATIONS,
    KINDS,
    META_KEY,
    REPORT_GENERATOR,
    SWEEP,
    VECTORS,
    atomic_path,
    read_artifact,
    read_meta,
)
from caa.errors import CaaError, InputError
from caa.inspection import Inspection, inspect_artifact, layer_spans
from caa.plots import draw_score_and_cost
from caa.text import clean

# The sections drawn from artifacts, in page order: kind -> heading.
SECTIONS = {"vectors": "Vector diagnostics", "sweep": "Sweep", "generations": "Generations"}
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
GENERATION_COLUMNS = ["prompt_index", "prompt", "behavior", "layer", "multiplier", "text"]

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


@dataclass(frozen=True)
class Found:
    """One artifact among the report's inputs, and the kind its metadata declares."""

    path: Path
    kind: str


@dataclass
class Run:
    """The artifacts of a run, in the pipeline's order (by name within a kind), and the notes of
    Parquet files that were passed over (not caa artifacts)."""

    files: list[Found]
    skipped: list[str] = field(default_factory=list)

    def of(self, kind: str) -> list[Path]:
        return [f.path for f in self.files if f.kind == kind]


@dataclass
class Report:
    """The page, and its warnings (inputs changed or missing, files of different models)."""

    html: str
    warnings: list[str]


def find_artifacts(paths: Sequence[Path]) -> Run:
    """The caa artifacts of a run directory (every ``*.parquet`` with caa metadata in it; other
    Parquet files are noted and passed over), or of the files named. A path that does not exist, a
    file that is not a readable caa artifact, or a directory without any, raises naming it."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise CaaError("give a run's directory or its artifact files")
    if len(paths) == 1 and paths[0].is_dir():
        run = _scan(paths[0])
    else:
        for path in paths:
            if path.is_dir():
                raise InputError(path, "is a directory: give one run directory, or artifact files")
        run = Run([_found(path) for path in dict.fromkeys(paths)])
    order = list(KINDS)  # the pipeline's order: pairs, activations, vectors, sweep, ...
    run.files.sort(key=lambda f: order.index(f.kind))  # stable: by name within a kind
    return run


def _scan(directory: Path) -> Run:
    candidates = sorted(
        p
        for p in directory.iterdir()
        if p.suffix == ".parquet" and not p.name.startswith(".") and p.is_file()
    )
    run = Run([])
    for path in candidates:
        if _has_caa_entry(path):
            run.files.append(_found(path))
        else:
            run.skipped.append(f"{path}: a Parquet file that is not a caa artifact: not shown")
    if not run.files:
        raise InputError(directory, "no caa artifacts in this directory (no *.parquet with caa metadata)")
    return run


def _has_caa_entry(path: Path) -> bool:
    """Whether a Parquet file carries caa metadata; a file that is no readable Parquet says True,
    so that reading it reports what is wrong."""
    try:
        return META_KEY in (pq.read_schema(path).metadata or {})
    except (pa.ArrowException, OSError):
        return True


def _found(path: Path) -> Found:
    if not path.exists():
        raise InputError(path, "not found")
    kind = read_meta(path).get("kind")
    if kind not in KINDS:
        raise InputError(path, f"unknown artifact kind {kind!r}; caa writes {', '.join(KINDS)}", field="kind")
    return Found(path, str(kind))


def build_report(run: Run, check_inputs: bool = True, max_prompts: int = 12, title: str = "") -> Report:
    """The page for ``run``: every file validated as its kind (a bad one raises naming it), every
    recorded input hashed again unless ``check_inputs`` is off, at most ``max_prompts`` prompts
    per generations table."""
    inspections = [inspect_artifact(f.path, check_inputs=check_inputs) for f in run.files]
    warnings = [*run.skipped, *_input_warnings(inspections), *_model_warnings(inspections)]
    body = [f"<h1>{_e(title or 'caa run report')}</h1>", _overview(run, inspections, warnings)]
    body.append(_section("vectors", run.of("vectors"), _vectors_section))
    body.append(_section("sweep", run.of("sweep"), _sweep_section))
    body.append(
        _section("generations", run.of("generations"), lambda p: _generations_section(p, max_prompts))
    )
    body.append(_provenance(inspections))
    return Report(_page(title or "caa run report", "\n".join(body)), warnings)


def write_report(report: Report, out: Path) -> None:
    """The page into ``out``, atomically (a unique temporary beside it, then rename)."""
    with atomic_path(Path(out)) as tmp:
        tmp.write_text(report.html, encoding="utf-8")


# --- the page ------------------------------------------------------------------------------------


def _page(title: str, body: str) -> str:
    from caa import __version__

    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">\n'
        f'<meta name="generator" content="{REPORT_GENERATOR} {_e(__version__)}">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{_STYLE}</style>\n"
        f"<script>{_MEASURE}</script>\n"
        f"</head><body>\n{body}\n</body></html>\n"
    )


def _e(value: Any) -> str:
    """Any value as HTML text: control characters (but line breaks and tabs) shown as escapes, as on
    the terminal (caa.text.clean: bidi overrides too), then HTML-escaped, quotes included."""
    return html.escape(clean(str(value), "\n\t"), quote=True)


def _num(value: Any, fmt: str = "{:.3f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return fmt.format(value)


def _number(value: Any) -> str:
    """An option's value as written on the command line: 0.5, 100 (not 100.0)."""
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else _e(value)


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], row_classes: Sequence[str] = ()) -> str:
    """A table of cells given as HTML (already escaped); a cell starting with ``=`` is numeric."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    lines = []
    for i, row in enumerate(rows):
        cells = "".join(f'<td class="n">{c[1:]}</td>' if c.startswith("=") else f"<td>{c}</td>" for c in row)
        cls = f' class="{row_classes[i]}"' if i < len(row_classes) and row_classes[i] else ""
        lines.append(f"<tr{cls}>{cells}</tr>")
    return _wrap(head, "".join(lines))


def _wrap(head: str, body: str) -> str:
    """A table from its header cells and body rows, scrolling sideways where it is wide."""
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _figure(fig: Any, caption: str) -> str:
    """A Matplotlib figure as an embedded PNG with its caption (``caption`` is HTML)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    width, height = (round(x) for x in fig.get_size_inches() * 100)
    data = base64.b64encode(buf.getvalue()).decode()
    return (
        f'<figure><img src="data:image/png;base64,{data}" width="{width}" height="{height}" '
        f'alt="figure"><figcaption>{caption}</figcaption></figure>'
    )


def _new_figure(panels: int, width: float, height: float) -> tuple[Any, Any]:
    """A figure of ``panels`` side by side, made without pyplot (no global state, no GUI backend)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, panels, squeeze=False)[0]


def _section(kind: str, paths: list[Path], render: Callable[[Path], str]) -> str:
    heading = f'<h2 id="{kind}">{SECTIONS[kind]}</h2>'
    if not paths:
        return f'{heading}<p class="note">No {kind} file among the inputs: this section is omitted.</p>'
    parts = [heading]
    for path in paths:
        if len(paths) > 1:
            parts.append(f'<p class="muted">from <code>{_e(path)}</code></p>')
        parts.append(render(path))
    return "\n".join(parts)


def _overview(run: Run, inspections: list[Inspection], warnings: list[str]) -> str:
    rows = [
        [f"<code>{_e(i.path)}</code>", _e(i.kind), _e(i.meta.get("command", "")), f"={i.rows}"]
        for i in inspections
    ]
    links = " · ".join(f'<a href="#{k}">{v}</a>' for k, v in SECTIONS.items())
    parts = [
        f'<p class="muted">Sections: {links} · <a href="#provenance">Provenance</a></p>',
        _table(["file", "kind", "made by", "rows"], rows),
    ]
    missing = [k for k in SECTIONS if not run.of(k)]
    if missing:
        parts.append(
            f'<p class="note">Not among the inputs: {", ".join(missing)} (their sections are omitted).</p>'
        )
    if warnings:
        items = "".join(f"<li>{_e(w)}</li>" for w in warnings)
        parts.append(f'<div class="warnings"><strong>Warnings</strong><ul>{items}</ul></div>')
    return "\n".join(parts)


# --- vectors -------------------------------------------------------------------------------------


def _vectors_section(path: Path) -> str:
    frame = read_artifact(path, VECTORS, columns=VECTOR_COLUMNS).table.to_pandas()  # never the vectors
    frame["ratio"] = frame.norm_ratio  # |v| / |h|, as compute-vectors stored it
    parts = [
        '<p class="note">Per layer: |v| the vector\'s norm, |h| the mean residual norm there, their ratio; '
        "cons: mean cosine of the training pairs' differences with their mean; cos−1 / cos+1: cosine with "
        "the adjacent layers' vectors; acc, AUC: separability of the held-out pairs along the vector.</p>"
    ]
    for behavior, part in frame.groupby("behavior", sort=False):
        part = part.sort_values("layer")
        parts.append(f"<h3>{_e(behavior)}</h3>")
        parts.append(_vectors_figure(part))
        parts.append(_vectors_table(part))
    return "\n".join(parts)


def _vectors_figure(part: pd.DataFrame) -> str:
    from matplotlib.ticker import MaxNLocator

    fig, (ratio_ax, sep_ax, cos_ax) = _new_figure(3, 12, 2.8)
    ratio_ax.plot(part.layer, part.ratio, marker="o")
    ratio_ax.set_title("|v| / |h|", fontsize=10)
    sep_ax.plot(part.layer, part.test_auc, marker="o", label="test AUC")
    sep_ax.plot(part.layer, part.pair_consistency, marker="s", label="pair consistency")
    sep_ax.set_title("separability and consistency", fontsize=10)
    sep_ax.legend(fontsize=8)
    cos_ax.plot(part.layer, part.cos_prev_layer, marker="o")
    cos_ax.set_title("cosine with the previous layer's vector", fontsize=10)
    for ax in (ratio_ax, sep_ax, cos_ax):
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    layers = layer_spans(int(x) for x in part.layer)
    return _figure(fig, f"Diagnostics at layers {layers} ({_e(part.method.iloc[0])} vectors).")


def _vectors_table(part: pd.DataFrame) -> str:
    headers = ["layer", "n train", "n test", "|v|", "|h|", "|v|/|h|", "AUC", "acc", "cons", "cos−1", "cos+1"]
    rows = [
        [
            f"={r.layer}",
            f"={r.n_train}",
            f"={r.n_test}",
            "=" + _num(r.vector_norm, "{:.2f}"),
            "=" + _num(r.mean_residual_norm, "{:.1f}"),
            "=" + _num(r.ratio),
            "=" + _num(r.test_auc),
            "=" + _num(r.test_accuracy),
            "=" + _num(r.pair_consistency),
            "=" + _num(r.cos_prev_layer),
            "=" + _num(r.cos_next_layer),
        ]
        for r in part.itertuples()
    ]
    return _table(headers, rows)


# --- sweep ---------------------------------------------------------------------------------------


def _sweep_section(path: Path) -> str:
    art = read_artifact(path, SWEEP)
    frame, meta = art.table.to_pandas(), art.meta
    options = meta.get("options") or {}
    parts = [f"<p>Fluency cost: {_fluency(meta.get('fluency') or {})}.</p>"]
    for behavior, part in frame.groupby("behavior", sort=False):
        part = part.sort_values(["layer", "multiplier"])
        pick = _cell((meta.get("recommended") or {}).get(behavior))
        parts.append(f"<h3>{_e(behavior)}</h3>")
        parts.append(_recommendation(meta, str(behavior), part, options))
        parts.append(_sweep_figure(part, pick, options.get("max_kl")))
        parts.append(_sweep_table(part, pick))
        parts.append("<h4>Reliability per layer</h4>")
        parts.append(_reliability_table(part))
    return "\n".join(parts)


def _cell(value: Any) -> tuple[int, float] | None:
    return (int(value[0]), float(value[1])) if value else None


def _fluency(fluency: Mapping[str, Any]) -> str:
    """What the KL and perplexity columns measured (the sweep's ``fluency`` metadata), as HTML."""
    source = f" from <code>{_e(fluency['source'])}</code>" if fluency.get("source") else ""
    tokens = f", {_e(fluency['tokens'])} tokens in all" if fluency.get("tokens") is not None else ""
    if fluency.get("kind") == "continuation":
        return (
            "mean KL(unsteered ‖ steered) per token, and the perplexity, over the unsteered model's "
            f"{_e(fluency.get('continuation_tokens'))}-token greedy continuations of "
            f"{_e(fluency.get('texts'))} neutral prompts{source}{tokens}"
        )
    if fluency.get("kind") == "text":
        return (
            "mean KL(unsteered ‖ steered) per token, and the perplexity, at every position of "
            f"{_e(fluency.get('texts'))} neutral texts{source}{tokens}"
        )
    return "the file does not say what the KL and perplexity were measured on"


def _recommendation(
    meta: Mapping[str, Any], behavior: str, part: pd.DataFrame, options: Mapping[str, Any]
) -> str:
    max_kl, max_anti = options.get("max_kl"), options.get("max_anti")
    budget = f"KL ≤ {_number(max_kl)}"
    if max_anti is not None:
        budget += f", anti-steerable ≤ {_number(max_anti)}"
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
    fig, (score_ax, kl_ax) = _new_figure(2, 10, 3.4)
    draw_score_and_cost(score_ax, kl_ax, part, pick)  # the same lines as sweep.png
    if isinstance(max_kl, (int, float)):
        kl_ax.axhline(max_kl, color="grey", linestyle="--", linewidth=1, label=f"--max-kl {max_kl:g}")
    score_p = part.score_kind.iloc[0] == "p_match"
    score_ax.set_ylabel("p(matching answer)" if score_p else "log p(pos) − log p(neg)")
    score_ax.set_title(f"score on {part.n.iloc[0]} held-out pairs (± sem)", fontsize=10)
    kl_ax.set_ylabel("KL, nats/token")
    kl_ax.set_title("fluency cost", fontsize=10)
    kl_ax.set_yscale("symlog", linthresh=0.01)
    highest = max([float(part.kl_mean.max()), max_kl if isinstance(max_kl, (int, float)) else 0, 0.01])
    kl_ax.set_ylim(0, highest * 2)  # room above the highest point on the log part of the scale
    multipliers = sorted(set(part.multiplier))
    for ax in (score_ax, kl_ax):
        ax.set_xlabel("multiplier")
        if len(multipliers) <= 11:
            ax.set_xticks(multipliers, [f"{m:g}" for m in multipliers])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _figure(fig, "Score (mean ± standard error) and fluency cost per layer and multiplier.")


def _sweep_table(part: pd.DataFrame, pick: tuple[int, float] | None) -> str:
    digits = 3 if part.score_kind.iloc[0] == "p_match" else 2
    rows, classes = [], []
    for r in part.itertuples():
        ci = (
            ""
            if r.multiplier == 0
            else f"{_num(r.delta_low, f'{{:+.{digits}f}}')} .. {_num(r.delta_high, f'{{:+.{digits}f}}')}"
        )
        rows.append(
            [
                f"={r.layer}",
                f"={r.multiplier:g}",
                "=" + _num(r.score_mean),
                "=" + _num(r.score_sem),
                f"={r.delta:+.3f}",
                "=" + ci,
                "=" + _num(r.kl_mean),
                "=" + _num(r.perplexity, "{:.2f}"),
                "=" + _num(r.perplexity_delta, "{:+.2f}"),
            ]
        )
        classes.append("picked" if pick == (r.layer, r.multiplier) else "")
    headers = ["layer", "mult", "score", "± sem", "delta", "delta 95% CI", "KL", "ppl", "Δppl"]
    return _table(headers, rows, classes)


def _reliability_table(part: pd.DataFrame) -> str:
    rows = []
    for r in part.drop_duplicates("layer").itertuples():
        backward = ", ".join(str(i) for i in list(r.backward_items)[:3])
        rows.append(
            [
                f"={r.layer}",
                "=" + _num(r.slope_mean, "{:+.4f}"),
                "=" + _num(r.slope_median, "{:+.4f}"),
                "=" + _num(r.anti_fraction, "{:.0%}"),
                "=" + f"{_num(r.anti_low, '{:.0%}')} .. {_num(r.anti_high, '{:.0%}')}",
                f"<code>{_e(backward)}</code>" if backward else "",
            ]
        )
    headers = ["layer", "mean slope", "median slope", "anti-steerable", "95% CI", "most backwards (ids)"]
    note = (
        '<p class="note">Each held-out item\'s score is fitted against the multiplier; anti-steerable is the '
        "share of items with a negative slope (seeded bootstrap interval).</p>"
    )
    return note + _table(headers, rows)


# --- generations ---------------------------------------------------------------------------------


def _generations_section(path: Path, max_prompts: int) -> str:
    frame = read_artifact(path, GENERATIONS, columns=GENERATION_COLUMNS).table.to_pandas()
    parts = []
    for (behavior, layer), part in frame.groupby(["behavior", "layer"], sort=False):
        multipliers = sorted(set(part.multiplier))
        prompts = sorted(set(part.prompt_index))
        parts.append(f"<h3>{_e(behavior)} at layer {_e(layer)}</h3>")
        if len(prompts) > max_prompts:
            parts.append(f'<p class="note">The first {max_prompts} of {len(prompts)} prompts.</p>')
        texts = {(r.prompt_index, r.multiplier): r.text for r in part.itertuples()}
        first = part.drop_duplicates("prompt_index").set_index("prompt_index").prompt
        rows = [
            [_e(first[i]), *(f"{_e(texts.get((i, m), ''))}" for m in multipliers)]
            for i in prompts[:max_prompts]
        ]
        headers = ["prompt", *(f"×{m:g}" + (" (unsteered)" if m == 0 else "") for m in multipliers)]
        parts.append(_generation_table(headers, rows, [m == 0 for m in multipliers]))
    return "\n".join(parts)


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
    return _wrap(head, body)


# --- provenance ----------------------------------------------------------------------------------


def _input_warnings(inspections: list[Inspection]) -> list[str]:
    return [
        f"{i.path}: its input {check.path} is {check.message}"
        for i in inspections
        for check in i.inputs
        if check.status not in ("unchanged", "unchecked")
    ]


def _model_warnings(inspections: list[Inspection]) -> list[str]:
    """One warning if the files were made with different models (by the weights' hash)."""
    models: dict[str, list[str]] = {}
    for i in inspections:
        model = i.meta.get("model") or {}
        if model.get("weights_hash"):
            label = f"{model.get('name', '?')} ({str(model['weights_hash'])[:12]})"
            models.setdefault(label, []).append(i.path.name)
    if len(models) < 2:
        return []
    listed = "; ".join(f"{label}: {', '.join(files)}" for label, files in models.items())
    return [f"the files were made with different models: {listed}"]


def _provenance(inspections: list[Inspection]) -> str:
    parts = [
        '<h2 id="provenance">Provenance</h2>',
        '<p class="note">What made each file, from its metadata. Inputs are hashed again and compared with '
        "the SHA-256 recorded when the file was written (relative paths from the directory `caa report` "
        "ran in).</p>",
    ]
    for i in inspections:
        parts.append(f"<h3><code>{_e(i.path)}</code></h3>")
        parts.append(_key_values(_provenance_rows(i)))
        if i.inputs:
            rows = [
                [
                    f"<code>{_e(c.path)}</code>",
                    f"<code>{_e(c.sha256[:16])}</code>",
                    _status(c.status, c.message),
                ]
                for c in i.inputs
            ]
            parts.append(_table(["input", "recorded sha256", "now"], rows))
    return "\n".join(parts)


def _status(status: str, message: str) -> str:
    if status in ("unchanged", "unchecked"):
        return _e(message)
    return f'<strong style="color:#b35c00">{_e(message)}</strong>'


def _provenance_rows(i: Inspection) -> list[tuple[str, str]]:
    meta = i.meta
    rows = [
        ("kind", f"{_e(i.kind)}, {i.rows} rows, {i.size_bytes} bytes"),
        ("command", _e(meta.get("command", "–"))),
        ("caa version", _e(meta.get("caa_version", "–"))),
        ("created", _e(meta.get("created", "–"))),
        ("options", _inline(meta.get("options"))),
    ]
    for key in ("model", "prompt", "fluency"):
        if meta.get(key) is not None:
            rows.append((key, _inline(meta[key])))
    rows.append(("summary", _inline(i.summary)))
    return rows


def _key_values(rows: list[tuple[str, str]]) -> str:
    lines = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<div class="scroll"><table class="kv"><tbody>{lines}</tbody></table></div>'


def _inline(value: Any, key: str = "") -> str:
    """A metadata value as escaped HTML: objects as ``key=value, ...``, layers as spans (``4-20``),
    other long lists shortened."""
    if isinstance(value, dict):
        if not value:
            return "–"
        return ", ".join(f"<code>{_e(k)}</code>={_inline(v, str(k))}" for k, v in value.items())
    if key.endswith("layers") and isinstance(value, list) and value and all(type(v) is int for v in value):
        return _e(layer_spans(value))
    if isinstance(value, list) and len(value) > 8:
        return _e(f"{len(value)} items: {', '.join(json.dumps(v) for v in value[:4])}, ...")
    if isinstance(value, list):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    if isinstance(value, bool) or value is None:
        return _e(json.dumps(value))
    if isinstance(value, float):
        return _e(f"{value:.4g}")
    return _e(value)
