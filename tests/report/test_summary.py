from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from caa.cli import app
from caa.errors import InputError
from caa.report.summary import inspect_artifact, layer_spans
from caa.store.artifacts import make_meta, read_artifact, write_artifact
from caa.store.schemas import ACTIVATIONS, GENERATIONS, META_KEY, PAIRS, SWEEP, VECTORS
from tests.helpers import AB_ROWS, FREEFORM_ROWS, write_pairs_file

runner = CliRunner()
JSON_KEYS = {"path", "kind", "size_bytes", "rows", "row_groups", "meta", "summary", "breakdown", "inputs"}
MODEL = {"name": "tiny", "architecture": "llama", "num_layers": 4, "hidden_size": 32, "weights_hash": "abc"}


@pytest.fixture(scope="module")
def pipeline(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """pairs -> activations (layers 1,2) -> vectors, made by the real commands on the tiny llama."""
    tmp = tmp_path_factory.mktemp("inspect")
    pairs = write_pairs_file(tmp / "pairs.parquet", {"agree": AB_ROWS, "mood": FREEFORM_ROWS}, 0.5)
    acts, vectors = tmp / "acts.parquet", tmp / "vectors.parquet"
    model = str(tiny_models["llama"])
    result = runner.invoke(app, ["extract", str(pairs), "-m", model, "-o", str(acts), "--layers", "1,2"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["compute-vectors", str(acts), "-o", str(vectors)]).exit_code == 0
    return {"pairs": pairs, "activations": acts, "vectors": vectors}


def split_counts(pairs: Path) -> dict[str, dict[str, int]]:
    frame = read_artifact(pairs, PAIRS).table.select(["behavior", "split"]).to_pandas()
    counts = frame.groupby(["behavior", frame.split.astype(str)]).size()
    return {b: {s: int(counts.get((b, s), 0)) for s in ("train", "test")} for b in ("agree", "mood")}


def by_behavior(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["behavior"]: r for r in rows}


def test_layer_spans() -> None:
    assert layer_spans([8, 0, 1, 2, 5, 7]) == "0-2,5,7-8"
    assert layer_spans([3]) == "3"
    assert layer_spans([]) == ""


def test_pairs(pairs_file: Path) -> None:
    report = inspect_artifact(pairs_file)
    expected = split_counts(pairs_file)
    assert (report.kind, report.rows, report.row_groups) == ("pairs", 20, 1)
    assert report.size_bytes == pairs_file.stat().st_size
    assert report.summary["pairs"] == 20
    assert report.summary["behaviors"] == ["agree", "mood"]
    assert report.summary["formats"] == {"ab": 10, "freeform": 10}
    assert report.summary["train"] == sum(c["train"] for c in expected.values())
    rows = by_behavior(report.breakdown)
    assert rows["agree"]["format"] == "ab" and rows["mood"]["format"] == "freeform"
    for name, counts in expected.items():
        assert (rows[name]["train"], rows[name]["test"], rows[name]["pairs"]) == (
            counts["train"],
            counts["test"],
            10,
        )
    assert [i.status for i in report.inputs] == ["unchanged", "unchanged"]

    result = runner.invoke(app, ["inspect", str(pairs_file)])
    assert result.exit_code == 0, result.output
    assert "pairs, " in result.output and "20 rows in 1 row group(s)" in result.output
    assert "caa ingest" in result.output and "freeform" in result.output
    line = next(ln for ln in result.output.splitlines() if ln.startswith("agree "))
    agree = expected["agree"]
    assert line.split() == ["agree", "ab", "10", str(agree["train"]), str(agree["test"])]
    assert "note:" not in result.output


def test_activations_summary_reads_no_vectors(
    pipeline: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    acts = pipeline["activations"]
    columns_read: list[list[str] | None] = []
    real = pq.read_table

    def spy(source, *args, columns=None, **kwargs):
        columns_read.append(columns)
        return real(source, *args, columns=columns, **kwargs)

    monkeypatch.setattr(pq, "read_table", spy)
    report = inspect_artifact(acts)
    assert columns_read and all(c is not None and "activation" not in c for c in columns_read)

    meta = report.meta
    assert report.rows == 20 * 2 * 2  # pairs x sides x layers
    assert report.summary["layers"] == [1, 2]
    assert report.summary["d_model"] == meta["model"]["hidden_size"] == 32
    assert report.summary["pairs"] == 20 and report.summary["texts"] == 40
    assert report.summary["sides"] == ["negative", "positive"]
    assert report.summary["behaviors"] == ["agree", "mood"]
    expected = split_counts(pipeline["pairs"])
    for name, row in by_behavior(report.breakdown).items():
        assert (row["train"], row["test"]) == (expected[name]["train"], expected[name]["test"])
        assert row["pairs"] == 10
        assert row["layers"] == [1, 2]
    assert report.inputs[0].path == str(pipeline["pairs"]) and report.inputs[0].status == "unchanged"

    result = runner.invoke(app, ["inspect", str(acts)])
    assert result.exit_code == 0, result.output
    assert "caa extract" in result.output
    assert "architecture: llama" in result.output and "hidden_size: 32" in result.output
    assert "chat_template" in result.output  # the prompt format
    summary = {ln.split()[0]: ln.split()[1:] for ln in result.output.splitlines() if ln.split()}
    assert summary["layers"] == ["1-2"] and summary["d_model"] == ["32"]
    assert summary["pairs"] == ["20"] and summary["texts"] == ["40"]


def test_vectors(pipeline: dict[str, Path]) -> None:
    report = inspect_artifact(pipeline["vectors"])
    frame = read_artifact(pipeline["vectors"], VECTORS).table.drop_columns("vector").to_pandas()
    assert report.summary["behaviors"] == ["agree", "mood"] and report.summary["layers"] == [1, 2]
    assert report.summary["vectors"] == 4 and report.summary["method"] == ["mean"]
    assert report.summary["d_model"] == 32
    assert report.summary["vector_norm_range"] == [frame.vector_norm.min(), frame.vector_norm.max()]
    assert report.summary["test_auc_range"] == [frame.test_auc.min(), frame.test_auc.max()]
    for name, row in by_behavior(report.breakdown).items():
        part = frame[frame.behavior == name]
        assert row["layers"] == [1, 2]
        assert row["vector_norm_range"] == [part.vector_norm.min(), part.vector_norm.max()]
        assert row["best_auc"] == part.test_auc.max()
        assert row["best_auc_layer"] == part.layer.iloc[int(np.argmax(part.test_auc.to_numpy()))]
    assert report.inputs[0].path == str(pipeline["activations"])

    result = runner.invoke(app, ["inspect", str(pipeline["vectors"]), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == JSON_KEYS
    assert data["kind"] == "vectors" and data["rows"] == 4
    assert data["meta"]["command"] == "caa compute-vectors"
    assert data["meta"]["model"] == read_artifact(pipeline["activations"], ACTIVATIONS).meta["model"]
    assert data["summary"]["layers"] == [1, 2]
    assert data["inputs"][0]["status"] == "unchanged"


def write_sweep(path: Path) -> pd.DataFrame:
    grid = pd.MultiIndex.from_product(
        [["agree", "mood"], [1, 2], [-1.0, 0.0, 1.0]], names=["behavior", "layer", "multiplier"]
    )
    frame = grid.to_frame(index=False)
    frame["score_kind"] = np.where(frame.behavior == "agree", "p_match", "logp_diff")
    frame["score_mean"] = np.linspace(0.1, 0.9, len(frame))
    frame["score_sem"] = 0.01
    frame["n"] = np.where(frame.behavior == "agree", 5, 7).astype(np.int32)
    frame["delta"] = frame.multiplier * frame.layer / 10
    frame["kl_mean"] = frame.multiplier.abs() * frame.layer / 100
    frame["perplexity"] = 10.0
    frame["perplexity_delta"] = 0.5
    frame["delta_low"] = frame.delta - 0.05
    frame["delta_high"] = frame.delta + 0.05
    frame["slope_mean"] = frame["slope_median"] = frame.layer / 10
    frame["anti_fraction"] = frame["anti_low"] = frame["anti_high"] = 0.25
    frame["backward_items"] = [["p1"]] * len(frame)
    frame["system"] = "none"
    meta = make_meta(SWEEP, {"max_kl": 0.5}, model=MODEL, recommended={"agree": [2, 1.0], "mood": None})
    frame = frame[[f.name for f in SWEEP.fields]]
    write_artifact(pa.Table.from_pandas(frame, preserve_index=False), path, SWEEP, meta)
    return frame


def test_sweep(tmp_path: Path) -> None:
    path = tmp_path / "sweep.parquet"
    frame = write_sweep(path)
    report = inspect_artifact(path)
    assert report.summary["behaviors"] == ["agree", "mood"]
    assert report.summary["layers"] == [1, 2]
    assert report.summary["multipliers"] == [-1.0, 0.0, 1.0]
    assert report.summary["cells"] == 12 and report.summary["max_kl"] == 0.5
    assert report.summary["recommended"] == {"agree": {"layer": 2, "multiplier": 1.0}, "mood": None}
    rows = by_behavior(report.breakdown)
    assert rows["agree"]["score_kind"] == "p_match" and rows["agree"]["n"] == 5
    assert rows["agree"]["recommended"] == {
        "layer": 2,
        "multiplier": 1.0,
        "delta": pytest.approx(0.2),
        "delta_low": pytest.approx(0.15),
        "kl_mean": pytest.approx(0.02),
        "anti_fraction": 0.25,
    }
    assert rows["mood"]["recommended"] is None
    assert rows["mood"]["best_delta"] == frame[frame.behavior == "mood"].delta.max()
    assert report.summary["system_prompts"] == ["none"]
    assert report.inputs == []

    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "caa sweep" in result.output
    assert "agree: layer=2, multiplier=1" in result.output and "mood: -" in result.output
    assert "-1, 0, 1" in result.output


def test_sweep_summarises_arm_none_and_names_the_system_prompts(tmp_path: Path) -> None:
    """A sweep with --prompting: its prompting arms' rows (a larger gain, no fluency cost) are not
    the summary's best gain; the summary names the arms."""
    path = tmp_path / "sweep.parquet"
    frame = write_sweep(path)
    arm = frame[frame.behavior == "mood"].assign(system="positive", delta=9.0, kl_mean=np.nan)
    both = pd.concat([frame, arm], ignore_index=True)
    meta = read_artifact(path, SWEEP).meta
    write_artifact(pa.Table.from_pandas(both, preserve_index=False), path, SWEEP, meta)
    report = inspect_artifact(path)
    assert report.summary["system_prompts"] == ["none", "positive"] and report.summary["cells"] == 12
    assert by_behavior(report.breakdown)["mood"]["best_delta"] == frame[frame.behavior == "mood"].delta.max()


def test_generations(tmp_path: Path) -> None:
    path = tmp_path / "generations.parquet"
    frame = pd.DataFrame(
        {
            "prompt_index": np.repeat([0, 1], 3).astype(np.int32),
            "prompt": np.repeat(["Hi.", "Describe your day."], 3),
            "behavior": "mood",
            "layer": np.int16(2),
            "multiplier": np.tile([-4.0, 0.0, 4.0], 2),
            "text": ["a", "b", "c", "d", "e", "f"],
            "n_tokens": np.array([4, 6, 8, 2, 6, 10], dtype=np.int32),
        }
    )
    meta = make_meta(GENERATIONS, {"layer": 2}, model=MODEL)
    write_artifact(pa.Table.from_pandas(frame, preserve_index=False), path, GENERATIONS, meta)
    report = inspect_artifact(path)
    assert report.summary["prompts"] == 2 and report.summary["completions"] == 6
    assert report.summary["multipliers"] == [-4.0, 0.0, 4.0]
    assert report.summary["layers"] == [2] and report.summary["behaviors"] == ["mood"]
    assert report.summary["mean_tokens"] == 6.0
    assert report.breakdown == [
        {"multiplier": -4.0, "completions": 2, "mean_tokens": 3.0},
        {"multiplier": 0.0, "completions": 2, "mean_tokens": 6.0},
        {"multiplier": 4.0, "completions": 2, "mean_tokens": 9.0},
    ]
    result = runner.invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["summary"]["prompts"] == 2


def test_changed_and_missing_inputs_are_noted(pairs_file: Path) -> None:
    agree, mood = pairs_file.parent / "agree.jsonl", pairs_file.parent / "mood.jsonl"
    agree.write_text(agree.read_text() + json.dumps(AB_ROWS[0]) + "\n")
    mood.unlink()
    report = inspect_artifact(pairs_file)
    status = {Path(i.path).name: i.status for i in report.inputs}
    assert status == {"agree.jsonl": "changed", "mood.jsonl": "missing"}

    result = runner.invoke(app, ["inspect", str(pairs_file)])
    assert result.exit_code == 0, result.output  # information, not an error
    assert f"note: input {agree} changed since this file was written" in result.output
    assert f"note: input {mood} not found" in result.output

    data = json.loads(runner.invoke(app, ["inspect", str(pairs_file), "--json"]).stdout)
    assert {Path(i["path"]).name: i["status"] for i in data["inputs"]} == status

    result = runner.invoke(app, ["inspect", str(pairs_file), "--no-check-inputs"])
    assert result.exit_code == 0 and "note:" not in result.output and "not checked" in result.output


def missing(src: Path, path: Path) -> Path:
    return path


def not_caa(src: Path, path: Path) -> Path:
    pq.write_table(pa.table({"x": [1, 2]}), path)
    return path


def truncated(src: Path, path: Path) -> Path:
    path.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return path


def version_99(src: Path, path: Path) -> Path:
    return with_meta(src, path, schema_version=99)


def unknown_kind(src: Path, path: Path) -> Path:
    return with_meta(src, path, kind="nonsense")


def with_meta(source: Path, target: Path, **changes: object) -> Path:
    table = pq.read_table(source)
    meta = {**json.loads(table.schema.metadata[META_KEY]), **changes}
    pq.write_table(table.replace_schema_metadata({META_KEY: json.dumps(meta)}), target)
    return target


def bad_activations(src: Path, path: Path) -> Path:
    """An activations file whose 'layer' column is int64 instead of int16."""
    table = pa.table(
        {
            "pair_id": ["p"],
            "behavior": ["b"],
            "split": pa.array(["train"]).dictionary_encode().cast(pa.dictionary(pa.int8(), pa.string())),
            "side": ["positive"],
            "layer": pa.array([1], pa.int64()),
            "n_tokens": pa.array([3], pa.int32()),
            "activation": pa.FixedSizeListArray.from_arrays(pa.array([0.0, 1.0], pa.float32()), 2),
        }
    )
    meta = make_meta(ACTIVATIONS, {})
    pq.write_table(table.replace_schema_metadata({META_KEY: json.dumps(meta)}), path)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (missing, "file not found"),
        (not_caa, "not a caa artifact"),
        (truncated, "not a readable Parquet file"),
        (version_99, "field 'schema_version': schema version 99, this caa reads version 1"),
        (unknown_kind, "field 'kind': unknown artifact kind 'nonsense'"),
        (bad_activations, "field 'layer': column has type int64, expected int16"),
    ],
)
def test_bad_files_exit_2_naming_the_file(
    pairs_file: Path, tmp_path: Path, make: Callable[[Path, Path], Path], message: str
) -> None:
    path = make(pairs_file, tmp_path / "bad.parquet")
    with pytest.raises(InputError, match=message):
        inspect_artifact(path)
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 2, result.output
    assert f"error: {path}: " in result.output and message in result.output


def test_generations_with_scores_break_them_down_per_multiplier(tmp_path: Path) -> None:
    path = tmp_path / "generations.parquet"
    frame = pd.DataFrame(
        {
            "prompt_index": np.repeat([0, 1], 2).astype(np.int32),
            "prompt": np.repeat(["Hi.", "Describe your day."], 2),
            "behavior": "mood",
            "layer": np.int16(2),
            "multiplier": np.tile([-4.0, 4.0], 2),
            "text": ["a", "b", "c", "d"],
            "n_tokens": np.array([4, 6, 8, 2], dtype=np.int32),
            "probe_score": [-3.0, 1.0, -5.0, 2.0],
        }
    )
    write_artifact(
        pa.Table.from_pandas(frame, preserve_index=False), path, GENERATIONS, make_meta(GENERATIONS, {})
    )
    breakdown = inspect_artifact(path).breakdown
    assert [(b["multiplier"], b["probe_mean"], b["probe_n"]) for b in breakdown] == [
        (-4.0, -4.0, 2),
        (4.0, 1.5, 2),
    ]
    assert "judge_mean" not in breakdown[0]  # not judged: no judge columns
