"""`caa report`: one self-contained HTML page on a run's artifacts, readable offline.

Per behavior: the vectors' diagnostics per layer, the sweep (scores, fluency cost, reliability and
the recommendation), and the generations side by side per multiplier; then the provenance of every
file, with warnings where an input changed or is gone. Figures are PNGs embedded as base64; the page
loads nothing (its Content-Security-Policy forbids it) and runs one script of its own, which records
the rendered size of each figure on ``<body data-rendered>`` (the browser test reads it). Every text
that comes from a dataset or an artifact is HTML-escaped. Only the columns shown are read.

Here: finding a run's artifacts, the overview and the provenance; the page's HTML pieces are
:mod:`caa.report.html`, the sections drawn from artifacts :mod:`caa.report.sections`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from caa.errors import CaaError, InputError
from caa.report.html import esc, page, table
from caa.report.sections import generations_section, sweep_section, vectors_section
from caa.report.side_effects import side_effects_section
from caa.report.summary import Inspection, inspect_artifact, layer_spans
from caa.store.artifacts import read_meta
from caa.store.files import write_atomic
from caa.store.schemas import KINDS, META_KEY

# The sections drawn from artifacts, in page order: kind -> heading.
SECTIONS = {"vectors": "Vector diagnostics", "sweep": "Sweep", "generations": "Generations"}


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
    body = [f"<h1>{esc(title or 'caa run report')}</h1>", _overview(run, inspections, warnings)]
    body.append(_section("vectors", run.of("vectors"), vectors_section))
    body.append(_section("sweep", run.of("sweep"), sweep_section))
    if run.of("sweep_side_effects"):  # only where a sweep measured them (--side-effects)
        body.append('<h2 id="side-effects">Side effects</h2>')
        body.extend(side_effects_section(p) for p in run.of("sweep_side_effects"))
    body.append(_section("generations", run.of("generations"), lambda p: generations_section(p, max_prompts)))
    body.append(_provenance(inspections))
    return Report(page(title or "caa run report", "\n".join(body)), warnings)


def write_report(report: Report, out: Path) -> None:
    """The page into ``out``, atomically (a unique temporary beside it, then rename)."""
    write_atomic(Path(out), report.html.encode("utf-8"))


def _section(kind: str, paths: list[Path], render: Callable[[Path], str]) -> str:
    heading = f'<h2 id="{kind}">{SECTIONS[kind]}</h2>'
    if not paths:
        return f'{heading}<p class="note">No {kind} file among the inputs: this section is omitted.</p>'
    parts = [heading]
    for path in paths:
        if len(paths) > 1:
            parts.append(f'<p class="muted">from <code>{esc(path)}</code></p>')
        parts.append(render(path))
    return "\n".join(parts)


def _overview(run: Run, inspections: list[Inspection], warnings: list[str]) -> str:
    rows = [
        [f"<code>{esc(i.path)}</code>", esc(i.kind), esc(i.meta.get("command", "")), f"={i.rows}"]
        for i in inspections
    ]
    links = " · ".join(f'<a href="#{k}">{v}</a>' for k, v in SECTIONS.items())
    parts = [
        f'<p class="muted">Sections: {links} · <a href="#provenance">Provenance</a></p>',
        table(["file", "kind", "made by", "rows"], rows),
    ]
    missing = [k for k in SECTIONS if not run.of(k)]
    if missing:
        parts.append(
            f'<p class="note">Not among the inputs: {", ".join(missing)} (their sections are omitted).</p>'
        )
    if warnings:
        items = "".join(f"<li>{esc(w)}</li>" for w in warnings)
        parts.append(f'<div class="warnings"><strong>Warnings</strong><ul>{items}</ul></div>')
    return "\n".join(parts)


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
        parts.append(f"<h3><code>{esc(i.path)}</code></h3>")
        parts.append(_key_values(_provenance_rows(i)))
        if i.inputs:
            rows = [
                [
                    f"<code>{esc(c.path)}</code>",
                    f"<code>{esc(c.sha256[:16])}</code>",
                    _status(c.status, c.message),
                ]
                for c in i.inputs
            ]
            parts.append(table(["input", "recorded sha256", "now"], rows))
    return "\n".join(parts)


def _status(status: str, message: str) -> str:
    if status in ("unchanged", "unchecked"):
        return esc(message)
    return f'<strong style="color:#b35c00">{esc(message)}</strong>'


def _provenance_rows(i: Inspection) -> list[tuple[str, str]]:
    meta = i.meta
    rows = [
        ("kind", f"{esc(i.kind)}, {i.rows} rows, {i.size_bytes} bytes"),
        ("command", esc(meta.get("command", "–"))),
        ("caa version", esc(meta.get("caa_version", "–"))),
        ("created", esc(meta.get("created", "–"))),
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
        return ", ".join(f"<code>{esc(k)}</code>={_inline(v, str(k))}" for k, v in value.items())
    if key.endswith("layers") and isinstance(value, list) and value and all(type(v) is int for v in value):
        return esc(layer_spans(value))
    if isinstance(value, list) and len(value) > 8:
        return esc(f"{len(value)} items: {', '.join(json.dumps(v) for v in value[:4])}, ...")
    if isinstance(value, list):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    if isinstance(value, bool) or value is None:
        return esc(json.dumps(value))
    if isinstance(value, float):
        return esc(f"{value:.4g}")
    return esc(value)
