"""caa.report.sections: the report's vectors, sweep and generations sections, from small artifacts
written here: the numbers shown, the recommendation's wording, the escaping of data."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from caa.errors import InputError
from caa.report.sections import generations_section, sweep_section, vectors_section
from caa.store.artifacts import columns_table, make_meta, write_artifact
from caa.store.schemas import GENERATIONS, SWEEP, VECTORS

MODEL = {"name": "tiny", "weights_hash": "abc", "architecture": "llama", "num_layers": 4, "hidden_size": 2}
HOSTILE = "<b>bold</b> & \x1b[31m"


def _vectors(path: Path, behavior: str) -> Path:
    n = 2
    columns: dict[str, Any] = {
        "behavior": [behavior] * n,
        "layer": [3, 1],  # out of order: the section sorts by layer
        "method": ["mean"] * n,
        "n_train": [8, 8],
        "n_test": [4, 4],
        "vector_norm": [2.5, 1.25],
        "mean_residual_norm": [10.0, 5.0],
        "norm_ratio": [0.25, 0.25],
        "pair_consistency": [0.5, 0.4],
        "cos_prev_layer": [0.9, None],
        "cos_next_layer": [None, 0.9],
        "test_accuracy": [1.0, 0.75],
        "test_auc": [1.0, 0.875],
        "vector": np.ones((n, 2), dtype=np.float32),
    }
    meta = make_meta(VECTORS, {}, model=MODEL, layers=[1, 3], behaviors=[behavior])
    write_artifact(columns_table(columns, VECTORS.schema(2)), path, VECTORS, meta)
    return path


def _sweep(path: Path, behavior: str, recommended: Any, best: Any, fluency: dict[str, Any]) -> Path:
    rows = [
        {
            "behavior": behavior,
            "layer": layer,
            "multiplier": m,
            "score_kind": "p_match",
            "score_mean": 0.5 + 0.1 * m,
            "score_sem": 0.05,
            "n": 4,
            "delta": 0.1 * m,
            "delta_low": 0.1 * m - 0.05 if m else None,
            "delta_high": 0.1 * m + 0.05 if m else None,
            "kl_mean": 0.1 * abs(m),
            "perplexity": 20.0,
            "perplexity_delta": 0.0,
            "slope_mean": 0.1,
            "slope_median": 0.1,
            "anti_fraction": 0.25,
            "anti_low": 0.0,
            "anti_high": 0.5,
            "backward_items": ["id<1>"],
            "system": "none",
        }
        for layer in (1, 2)
        for m in (0.0, 2.0)
    ]
    table = pa.Table.from_pandas(pd.DataFrame(rows)[[f.name for f in SWEEP.fields]], preserve_index=False)
    meta = make_meta(
        SWEEP,
        {"max_kl": 0.5, "max_anti": None},
        model=MODEL,
        recommended={behavior: recommended},
        best_unreliable={behavior: best},
        fluency=fluency,
    )
    write_artifact(table, path, SWEEP, meta)
    return path


def _generations(path: Path, behavior: str, prompts: int) -> Path:
    rows = [
        {
            "prompt_index": i,
            "prompt": f"prompt {i} <p>",
            "behavior": behavior,
            "layer": 2,
            "multiplier": m,
            "text": f"said {i} x{m:g} &",
            "n_tokens": 3,
        }
        for i in range(prompts)
        for m in (0.0, -1.0)
    ]
    table = pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False)
    write_artifact(table, path, GENERATIONS, make_meta(GENERATIONS, {}, model=MODEL))
    return path


def _cells(html: str) -> list[list[str]]:
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr[^>]*>(.*?)</tr>", html)]


def test_vectors_section_shows_each_layer_sorted_with_its_numbers(tmp_path: Path) -> None:
    html = vectors_section(_vectors(tmp_path / "v.parquet", HOSTILE))
    assert "<h3>&lt;b&gt;bold&lt;/b&gt; &amp; \\x1b[31m</h3>" in html
    rows = [r for r in _cells(html) if r]
    assert rows == [
        ["1", "8", "4", "1.25", "5.0", "0.250", "0.875", "0.750", "0.400", "–", "0.900"],
        ["3", "8", "4", "2.50", "10.0", "0.250", "1.000", "1.000", "0.500", "0.900", "–"],
    ]
    assert "Diagnostics at layers 1,3 (mean vectors)." in html
    assert html.count("data:image/png;base64,") == 1


def test_sweep_section_recommends_and_marks_the_picked_row(tmp_path: Path) -> None:
    fluency = {
        "kind": "continuation",
        "texts": 8,
        "tokens": 256,
        "continuation_tokens": 32,
        "source": "n<.txt",
    }
    html = sweep_section(_sweep(tmp_path / "s.parquet", "agree", [2, 2.0], [2, 2.0], fluency))
    assert "<strong>Recommended: layer 2, multiplier 2</strong>" in html
    assert "with KL ≤ 0.5; 25% of the items steer backwards at this layer" in html
    assert (
        "32-token greedy continuations of 8 neutral prompts from <code>n&lt;.txt</code>, 256 tokens in all"
        in html
    )
    picked = re.findall(r'<tr class="picked">(.*?)</tr>', html)
    assert len(picked) == 1 and re.findall(r"<td[^>]*>(.*?)</td>", picked[0])[:2] == ["2", "2"]
    assert "<code>id&lt;1&gt;</code>" in html  # the backward items, escaped
    unsteered = [r for r in _cells(html) if len(r) == 9 and r[1] == "0"]
    assert unsteered and all(r[5] == "" for r in unsteered)  # x0 has no interval


def test_sweep_section_without_a_reliable_cell_names_the_best(tmp_path: Path) -> None:
    html = sweep_section(
        _sweep(tmp_path / "s.parquet", "agree", None, [1, 2.0], {"kind": "text", "texts": 3})
    )
    assert "No cell steers this behavior reliably</strong> with KL ≤ 0.5: the best, layer 1 ×2" in html
    assert "at every position of 3 neutral texts" in html
    assert 'class="picked"' not in html
    none = sweep_section(_sweep(tmp_path / "t.parquet", "agree", None, None, {}))
    assert "No (layer, multiplier) raises the score with KL ≤ 0.5." in none
    assert "the file does not say what the KL and perplexity were measured on" in none


def test_generations_section_puts_multipliers_side_by_side(tmp_path: Path) -> None:
    html = generations_section(_generations(tmp_path / "g.parquet", "mood", prompts=3), max_prompts=2)
    assert "<h3>mood at layer 2</h3>" in html
    assert "<th>prompt</th><th>×-1</th><th>×0 (unsteered)</th>" in html
    assert "The first 2 of 3 prompts." in html
    assert [r for r in _cells(html) if r] == [
        ["prompt 0 &lt;p&gt;", "said 0 x-1 &amp;", "said 0 x0 &amp;"],
        ["prompt 1 &lt;p&gt;", "said 1 x-1 &amp;", "said 1 x0 &amp;"],
    ]
    assert html.count('class="gen zero"') == 2
    assert "probe score" not in html  # no scores taken: no score table


def test_generations_section_shows_the_scores_per_multiplier_over_all_prompts(tmp_path: Path) -> None:
    path = _generations(tmp_path / "g.parquet", "mood", prompts=3)
    frame = pd.read_parquet(path)
    frame["probe_score"] = [1.0, -2.0, 3.0, -4.0, 5.0, np.nan]  # rows: prompt-major, x0 then x-1
    frame["judge_rating"] = pd.array([7, 2, None, 3, 9, 4], dtype="Int8")
    table = pa.Table.from_pandas(frame, preserve_index=False)
    write_artifact(table, path, GENERATIONS, make_meta(GENERATIONS, {}, model=MODEL))
    html = generations_section(path, max_prompts=1)
    head = "<th>multiplier</th><th>probe score</th><th>95% CI</th><th>n</th><th>judge rating (1-10)</th>"
    assert head in html
    rows = [r for r in _cells(html) if r and r[0].startswith("×")]
    # x-1: probe -2, -4 (the third has none): mean -3, sd sqrt(2), t(0.975, 1) 12.706: -3 +- 12.7;
    # judge 2, 3, 4: mean 3, interval 3 -+ 2.4841 clipped to the 1-10 scale;
    # x0: probe 1, 3, 5: mean 3; judge 7, 9 (one unparseable): mean 8
    assert rows[0][:2] == ["×-1", "-3"] and rows[0][2] == "-15.7 .. 9.71" and rows[0][3] == "2"
    assert rows[0][4:] == ["3", f"1 .. {3 + 2.4841:.3g}", "3"]
    assert rows[1][:2] == ["×0", "3"] and rows[1][3] == "3" and rows[1][4] == "8" and rows[1][6] == "2"


def test_a_section_given_another_kind_names_the_file(tmp_path: Path) -> None:
    path = _generations(tmp_path / "g.parquet", "mood", prompts=1)
    with pytest.raises(InputError) as e:
        sweep_section(path)
    assert e.value.path == str(path) and e.value.field == "kind"
