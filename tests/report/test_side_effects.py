"""The report's side-effects section and `caa inspect`'s summary of a side-effects file, on a small
artifact written directly (values chosen so that one change excludes 0 and one does not)."""

from __future__ import annotations

import html
from pathlib import Path

from caa.report.page import build_report, find_artifacts
from caa.report.summary import inspect_artifact
from caa.store.artifacts import columns_table, make_meta, write_artifact
from caa.store.schemas import SIDE_EFFECTS
from tests.report.test_page import vectors_file

HOSTILE = '<b>"mood"</b> & co'


def side_effects_file(path: Path) -> Path:
    columns = {
        "behavior": [HOSTILE, HOSTILE],
        "layer": [3, 3],
        "multiplier": [2.0, 2.0],
        "cell": ["recommended", "best"],
        "target": ["capability", "formality"],
        "source": ["built-in", "data/formality.jsonl"],
        "score_kind": ["p_match", "logp_diff"],
        "n": [50, 38],
        "unsteered": [0.612, -3.5],
        "steered": [0.548, -3.25],
        "delta": [-0.064, 0.25],
        "delta_low": [-0.101, -0.4],
        "delta_high": [-0.027, 0.9],
    }
    meta = make_meta(SIDE_EFFECTS, {"side_effects": ["capability", "data/formality.jsonl"]})
    write_artifact(columns_table(columns, SIDE_EFFECTS.schema()), path, SIDE_EFFECTS, meta)
    return path


def test_report_shows_each_change_with_its_interval(tmp_path: Path) -> None:
    path = side_effects_file(tmp_path / "sweep.side_effects.parquet")
    page = build_report(find_artifacts([tmp_path]), check_inputs=False).html
    assert '<h2 id="side-effects">Side effects</h2>' in page
    section = page[page.index('id="side-effects"') : page.index('id="provenance"')]
    assert html.escape(HOSTILE, quote=True) in section and HOSTILE not in section
    assert f"<code>{html.escape(str(path))}</code>" in section
    rows = section.split("<tr")[2:]  # the header row first
    assert len(rows) == 2
    # capability's drop excludes 0: marked; formality's interval holds 0: not marked
    assert ' class="picked"' in rows[0] and "capability" in rows[0]
    assert '<td class="n">-0.064 ✱</td>' in rows[0] and '<td class="n">-0.101 .. -0.027</td>' in rows[0]
    assert "picked" not in rows[1] and '<td class="n">+0.25</td>' in rows[1] and ">best<" in rows[1]
    assert '<td class="n">-0.40 .. +0.90</td>' in rows[1]


def test_a_report_without_side_effects_has_no_such_section(tmp_path: Path) -> None:
    vectors_file(tmp_path / "vectors.parquet")
    page = build_report(find_artifacts([tmp_path]), check_inputs=False).html
    assert "Side effects" not in page and "side-effects" not in page


def test_inspect_summarises_a_side_effects_file(tmp_path: Path) -> None:
    found = inspect_artifact(side_effects_file(tmp_path / "s.parquet"), check_inputs=False)
    assert found.kind == "sweep_side_effects" and found.rows == 2
    assert found.summary == {
        "behaviors": [HOSTILE],
        "targets": ["capability", "formality"],
        "rows": 2,
        "excluding_zero": 1,
    }
