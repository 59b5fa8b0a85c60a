"""`caa report`: the page's sections, escaping, provenance warnings and bad inputs (on small artifacts
written directly), and the page of a real tiny run rendered in headless Chromium."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from caa.cli import app
from caa.report.page import build_report, find_artifacts
from caa.store.artifacts import columns_table, make_meta, write_artifact
from caa.store.schemas import GENERATIONS, SWEEP, VECTORS

runner = CliRunner()
MODEL = {"name": "tiny", "weights_hash": "abc123", "architecture": "llama", "num_layers": 4, "hidden_size": 4}
HOSTILE = '<script>alert("x")</script> & co'


def vectors_file(path: Path, behavior: str = "mood", inputs: dict[str, Path] | None = None) -> Path:
    layers = [0, 1, 2]
    columns: dict[str, Any] = {
        "behavior": [behavior] * 3,
        "layer": layers,
        "method": ["mean"] * 3,
        "n_train": [8] * 3,
        "n_test": [4] * 3,
        "vector_norm": [1.5, 2.5, 3.5],
        "mean_residual_norm": [10.0, 12.0, 14.0],
        "norm_ratio": [1.5 / 10, 2.5 / 12, 3.5 / 14],
        "pair_consistency": [0.31, 0.52, 0.63],
        "cos_prev_layer": [None, 0.8, 0.9],
        "cos_next_layer": [0.8, 0.9, None],
        "test_accuracy": [0.5, 0.75, 1.0],
        "test_auc": [0.625, 0.875, 1.0],
        "vector": np.ones((3, 4), dtype=np.float32),
    }
    meta = make_meta(VECTORS, {"method": "mean"}, inputs, model=MODEL, layers=layers, behaviors=[behavior])
    write_artifact(columns_table(columns, VECTORS.schema(4)), path, VECTORS, meta)
    return path


def sweep_file(path: Path, behavior: str = "mood", recommended: Any = (1, 2.0), best: Any = (1, 2.0)) -> Path:
    rows = []
    for layer in (1, 2):
        for m in (-2.0, 0.0, 2.0):
            rows.append(
                {
                    "behavior": behavior,
                    "layer": layer,
                    "multiplier": m,
                    "score_kind": "logp_diff",
                    "score_mean": 1.0 + m * layer,
                    "score_sem": 0.25,
                    "n": 4,
                    "delta": m * layer,
                    "delta_low": m * layer - 0.5 if m else None,
                    "delta_high": m * layer + 0.5 if m else None,
                    "kl_mean": abs(m) * 0.1 * layer,
                    "perplexity": 20.0 + abs(m),
                    "perplexity_delta": abs(m),
                    "slope_mean": 0.4321 * layer,
                    "slope_median": 0.4 * layer,
                    "anti_fraction": 0.25,
                    "anti_low": 0.05,
                    "anti_high": 0.6,
                    "backward_items": ["<i>item7</i>"],
                    "system": "none",
                }
            )
    frame = pd.DataFrame(rows)
    table = pa.Table.from_pandas(frame[[f.name for f in SWEEP.fields]], preserve_index=False)
    fluency = {
        "kind": "continuation",
        "texts": 8,
        "tokens": 256,
        "continuation_tokens": 32,
        "source": "n.txt",
    }
    meta = make_meta(
        SWEEP,
        {"max_kl": 0.5, "max_anti": None},
        model=MODEL,
        recommended={behavior: list(recommended) if recommended else None},
        best_unreliable={behavior: list(best) if best else None},
        fluency=fluency,
    )
    write_artifact(table, path, SWEEP, meta)
    return path


def generations_file(path: Path, behavior: str = "mood", text: str = "text", prompts: int = 2) -> Path:
    rows = [
        {
            "prompt_index": i,
            "prompt": f"prompt {i}",
            "behavior": behavior,
            "layer": 1,
            "multiplier": m,
            "text": f"{text} {i} at x{m:g}",
            "n_tokens": 5,
        }
        for i in range(prompts)
        for m in (-2.0, 0.0, 2.0)
    ]
    table = pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False)
    write_artifact(table, path, GENERATIONS, make_meta(GENERATIONS, {"layer": 1}, model=MODEL))
    return path


def full_run(directory: Path, behavior: str = "mood", text: str = "text") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    vectors_file(directory / "vectors.parquet", behavior)
    sweep_file(directory / "sweep.parquet", behavior)
    generations_file(directory / "generations.parquet", behavior, text)
    return directory


def report(*args: str) -> Any:
    return runner.invoke(app, ["report", *args])


def test_report_shows_every_section(tmp_path: Path) -> None:
    run = full_run(tmp_path / "run")
    out = tmp_path / "report.html"
    result = report(str(run), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (3 files)" in result.output
    page = out.read_text()
    for heading in ("Vector diagnostics", "Sweep", "Generations", "Provenance"):
        assert f">{heading}</h2>" in page
    assert "omitted" not in page and "Warnings" not in page
    # vectors: |v|/|h|, AUC, consistency, adjacent cosines, per layer
    assert all(x in page for x in ("0.150", "0.208", "0.875", "0.520", "0.800", "0.900"))
    # sweep: the recommendation, its row marked, the reliability numbers, what the fluency cost measured
    assert "Recommended: layer 1, multiplier 2</strong>" in page
    assert "25% of the items steer backwards" in page
    assert '<tr class="picked"><td class="n">1</td><td class="n">2</td>' in page
    assert all(x in page for x in ("+0.4321", "+0.8642", "5% .. 60%", "+1.50 .. +2.50", "&lt;i&gt;item7"))
    assert "32-token greedy continuations of 8 neutral prompts from <code>n.txt</code>, 256 tokens" in page
    # generations: prompt x multiplier, side by side
    assert "×0 (unsteered)" in page and "text 1 at x-2" in page and "text 1 at x2" in page
    # two figures, both embedded; nothing loaded from elsewhere; one script, our own
    assert page.count('<img src="data:image/png;base64,') == 2
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page) and "url(" not in page
    assert page.count("<script") == 1
    assert "Content-Security-Policy" in page
    again = report(str(run), "-o", str(out))  # a rerun replaces its own page without --force
    assert again.exit_code == 0 and "exists (a report from `caa report`): replacing it" in again.output


def test_no_reliable_cell_names_the_best(tmp_path: Path) -> None:
    sweep = sweep_file(tmp_path / "s.parquet", recommended=None, best=(2, 2.0))
    page = build_report(find_artifacts([sweep])).html
    assert "No cell steers this behavior reliably" in page and "the best, layer 2 ×2" in page
    assert 'class="picked"' not in page
    nothing = sweep_file(tmp_path / "t.parquet", recommended=None, best=None)
    assert (
        "No (layer, multiplier) raises the score with KL ≤ 0.5"
        in build_report(find_artifacts([nothing])).html
    )


def test_text_from_data_is_escaped(tmp_path: Path) -> None:
    text = "<script>alert(1)</script> & <b>bold</b>\x1b[2J"
    run = full_run(tmp_path / "run", behavior=HOSTILE, text=text)
    page = build_report(find_artifacts([run])).html
    assert HOSTILE not in page and "<b>bold" not in page and "\x1b" not in page
    assert html.escape(HOSTILE) in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;\\x1b[2J" in page
    assert page.count("<script") == 1  # our own


def test_missing_kinds_omit_their_sections(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    vectors_file(tmp_path / "run" / "vectors.parquet")
    page = build_report(find_artifacts([tmp_path / "run"])).html
    assert "No sweep file among the inputs: this section is omitted." in page
    assert "No generations file among the inputs: this section is omitted." in page
    assert "Not among the inputs: sweep, generations" in page
    assert page.count("<figure>") == 1


def test_changed_and_missing_inputs_are_warned(tmp_path: Path) -> None:
    source, gone = tmp_path / "acts.txt", tmp_path / "gone.txt"
    source.write_text("one")
    gone.write_text("two")
    vectors = vectors_file(tmp_path / "vectors.parquet", inputs={"a": source, "b": gone})
    source.write_text("changed")
    gone.unlink()
    out = tmp_path / "r.html"
    result = report(str(vectors), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert f"warning: {vectors}: its input {source} is changed since this file was written" in result.output
    assert f"its input {gone} is not found" in result.output
    page = out.read_text()
    assert "Warnings" in page and "changed since this file was written" in page and "not found" in page
    quiet = report(str(vectors), "-o", str(out), "--no-check-inputs")
    assert quiet.exit_code == 0 and "its input" not in quiet.output


def test_files_of_different_models_are_warned(tmp_path: Path) -> None:
    vectors = vectors_file(tmp_path / "vectors.parquet")
    generations = generations_file(tmp_path / "generations.parquet")
    meta = json.loads(pq.read_schema(generations).metadata[b"caa"])
    table = pq.read_table(generations)
    write_artifact(table, generations, GENERATIONS, {**meta, "model": {**MODEL, "weights_hash": "other"}})
    warnings = build_report(find_artifacts([vectors, generations])).warnings
    assert warnings == [
        "the files were made with different models: "
        "tiny (abc123): vectors.parquet; tiny (other): generations.parquet"
    ]


def test_generations_beyond_max_prompts_are_left_out(tmp_path: Path) -> None:
    generations = generations_file(tmp_path / "g.parquet", prompts=3)
    page = build_report(find_artifacts([generations]), max_prompts=2).html
    assert "The first 2 of 3 prompts." in page and "text 1 at x2" in page and "text 2 at" not in page


def test_other_parquet_files_in_the_directory_are_passed_over(tmp_path: Path) -> None:
    run = full_run(tmp_path / "run")
    pd.DataFrame({"x": [1]}).to_parquet(run / "dataset.parquet")
    (run / "notes.txt").write_text("not parquet, not looked at")
    result = report(str(run), "-o", str(tmp_path / "r.html"))
    assert result.exit_code == 0, result.output
    assert "dataset.parquet: a Parquet file that is not a caa artifact: not shown" in result.output


def _truncated(tmp_path: Path) -> Path:
    run = full_run(tmp_path / "run")
    data = (run / "sweep.parquet").read_bytes()
    (run / "sweep.parquet").write_bytes(data[: len(data) // 2])
    return run


def _text_file(name: str, text: str) -> Any:
    def make(tmp_path: Path) -> Path:
        (tmp_path / name).write_text(text)
        return tmp_path / name

    return make


def _empty_dir(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda t: t / "nowhere", "nowhere: not found"),
        (_empty_dir, "empty: no caa artifacts in this directory"),
        (_truncated, "sweep.parquet: not a readable Parquet file"),
        (_text_file("x.parquet", "PAR1 no"), "x.parquet: not a readable Parquet file"),
        (_text_file("a.txt", "hi"), "a.txt: not a readable Parquet file"),
    ],
)
def test_bad_inputs_fail_with_one_line(tmp_path: Path, make: Any, message: str) -> None:
    out = tmp_path / "report.html"
    result = report(str(make(tmp_path)), "-o", str(out))
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and message in result.output
    assert result.output.count("\n") == 1
    assert not out.exists()


def test_corrupt_data_pages_fail_naming_the_file(tmp_path: Path) -> None:
    run = full_run(tmp_path / "run")
    path = run / "generations.parquet"
    data = bytearray(path.read_bytes())
    data[8:200] = bytes(192)  # the footer intact: the kind is found, the columns cannot be read
    path.write_bytes(bytes(data))
    result = report(str(run), "-o", str(tmp_path / "r.html"))
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: {path}: ")


def test_outputs_that_would_destroy_data_are_refused(tmp_path: Path) -> None:
    run = full_run(tmp_path / "run")
    vectors = run / "vectors.parquet"
    before = vectors.read_bytes()
    result = report(str(run), "-o", str(vectors))
    assert result.exit_code == 2 and "is the input" in result.output
    assert vectors.read_bytes() == before
    notes = tmp_path / "notes.html"
    notes.write_text("<html>mine</html>")
    result = report(str(run), "-o", str(notes))
    assert result.exit_code == 2 and "add --force to replace it" in result.output
    assert report(str(run), "-o", str(notes), "--force").exit_code == 0
    assert report(str(run), "-o", str(run)).exit_code == 2
    assert "--max-prompts 0" in report(str(run), "--max-prompts", "0").output


# --- the page of a real run in a real browser --------------------------------------------------------


def chromium() -> str | None:
    for name in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


@pytest.fixture(scope="module")
def tiny_run(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run on the tiny llama: vectors, a sweep at two layers and generations at three multipliers."""
    from tests.helpers import make_vectors

    run = tmp_path_factory.mktemp("run")
    model = str(tiny_models["llama"])
    pairs, vectors = make_vectors(tiny_models["llama"], run)
    neutral = run / "neutral.txt"
    neutral.write_text("the weather is warm today\nwe walk to work in the morning\nmusic and books help\n")
    sweep = ["sweep", str(vectors), str(pairs), "-m", model, "--layers", "1,2", "--multipliers", "-1,1"]
    result = runner.invoke(
        app, [*sweep, "--neutral", str(neutral), "--max-kl", "100", "-o", str(run / "sweep.parquet")]
    )
    assert result.exit_code == 0, result.output
    generate = ["generate", "-v", str(vectors), "--behavior", "mood", "--layer", "2", "-m", model]
    prompts = ["-p", "tell me about the city", "-p", HOSTILE, "--max-new-tokens", "6"]
    result = runner.invoke(
        app, [*generate, *prompts, "--multipliers", "-4,0,4", "-o", str(run / "gen.parquet")]
    )
    assert result.exit_code == 0, result.output
    return run


class _Body(HTMLParser):
    """The ``data-rendered`` attribute of a dumped page's <body>."""

    rendered: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "body":
            self.rendered = dict(attrs).get("data-rendered")


@pytest.mark.skipif(chromium() is None, reason="no Chromium installed")
def test_report_renders_in_headless_chromium(tiny_run: Path, tmp_path: Path) -> None:
    """The page of a real run, opened offline in headless Chromium.

    How it is checked: the page holds one small script of its own, the only one its
    Content-Security-Policy lets run (by its SHA-256), which on `load` writes each figure's rendered
    [width, height, decoded width] to ``<body data-rendered>``. ``--dump-dom`` prints the DOM after the
    load event, so the attribute says that every figure was laid out with a non-zero size and its PNG
    decoded. With ``--enable-logging=stderr`` Chromium logs every console message of the page as a
    ``CONSOLE`` line: script errors (``Uncaught ...``) and CSP violations (a script that escaped the
    escaping, anything fetched from the network) alike. The page logs nothing itself, so any such
    line fails the test. A screenshot (1400 x 3000) is taken too and must not be blank.
    """
    out = tmp_path / "report.html"
    result = report(str(tiny_run), "-o", str(out))
    assert result.exit_code == 0, result.output
    browser = chromium()
    assert browser is not None
    common = [
        browser,
        "--headless",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1400,3000",
        "--hide-scrollbars",
    ]
    url = out.resolve().as_uri()
    dump = subprocess.run(
        [*common, "--enable-logging=stderr", "--v=0", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dump.returncode == 0, dump.stderr[-2000:]
    console = [line for line in dump.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []
    body = _Body()
    body.feed(dump.stdout)
    assert body.rendered is not None, "the page's load script did not run"
    sizes = json.loads(body.rendered)
    page = out.read_text()
    assert len(sizes) == page.count("<figure>") == 2 + 2  # vectors of two behaviors, their two sweeps
    assert all(width > 100 and height > 50 and decoded > 0 for width, height, decoded in sizes), sizes
    assert "<script>alert" not in dump.stdout and html.escape(HOSTILE) in page

    shot = tmp_path / "report.png"
    subprocess.run([*common, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1400, 3000)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50  # text, tables and plots: far from blank
