"""caa.store.artifacts: Parquet artifacts written atomically with their provenance and read back
validated, every error naming the file and the field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from caa.errors import InputError
from caa.store.artifacts import (
    StreamWriter,
    columns_table,
    make_meta,
    read_artifact,
    read_meta,
    require_file,
    vectors_of,
    write_artifact,
)
from caa.store.files import file_sha256
from caa.store.schemas import ACTIVATIONS, GENERATIONS, META_KEY, PAIRS, SCHEMA_VERSION, VECTORS


def _vectors_columns(rows: int, d: int) -> dict[str, object]:
    return {
        "behavior": ["b"] * rows,
        "layer": list(range(rows)),
        "method": ["mean_diff"] * rows,
        "n_train": [3] * rows,
        "n_test": [None] * rows,
        "vector_norm": [1.0] * rows,
        "mean_residual_norm": [None] * rows,
        "norm_ratio": [None] * rows,
        "pair_consistency": [None] * rows,
        "cos_prev_layer": [None] * rows,
        "cos_next_layer": [None] * rows,
        "test_accuracy": [None] * rows,
        "test_auc": [None] * rows,
        "vector": np.arange(rows * d, dtype=np.float32).reshape(rows, d),
    }


def test_write_then_read_round_trips_table_and_meta(tmp_path: Path) -> None:
    src = tmp_path / "in.txt"
    src.write_text("input")
    meta = make_meta(VECTORS, {"out": tmp_path / "v.parquet", "layers": (1, 2)}, {"acts": src}, layers=[0, 1])
    assert meta["kind"] == "vectors" and meta["schema_version"] == SCHEMA_VERSION
    assert meta["command"] == "caa compute-vectors"
    assert meta["options"] == {"out": str(tmp_path / "v.parquet"), "layers": [1, 2]}
    assert meta["inputs"] == {str(src): file_sha256(src)}
    table = columns_table(_vectors_columns(2, 4), VECTORS.schema(4))
    path = tmp_path / "v.parquet"
    write_artifact(table, path, VECTORS, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "v.parquet"]  # no temporary left
    art = read_artifact(path, VECTORS)
    assert art.meta == meta
    assert art.table.equals(table)
    np.testing.assert_array_equal(
        vectors_of(art.table, "vector"), np.arange(8, dtype=np.float32).reshape(2, 4)
    )
    assert read_artifact(path, VECTORS, columns=["layer"]).table.column_names == ["layer"]


def test_stream_writer_appends_row_groups_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "v.parquet"
    with StreamWriter(path, VECTORS, make_meta(VECTORS, {}), d_model=3) as w:
        w.write(_vectors_columns(2, 3))
        w.write(_vectors_columns(1, 3))
    assert pq.ParquetFile(path).num_row_groups == 2
    assert read_artifact(path, VECTORS).table.num_rows == 3
    failed = tmp_path / "failed.parquet"
    with pytest.raises(RuntimeError), StreamWriter(failed, VECTORS, make_meta(VECTORS, {}), d_model=3) as w:
        w.write(_vectors_columns(1, 3))
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.parquet"]


def test_read_artifact_names_a_missing_column(tmp_path: Path) -> None:
    table = columns_table(_vectors_columns(1, 2), VECTORS.schema(2)).drop_columns(["method"])
    path = tmp_path / "v.parquet"
    pq.write_table(table.replace_schema_metadata({META_KEY: json.dumps(make_meta(VECTORS, {}))}), path)
    with pytest.raises(InputError) as e:
        read_artifact(path, VECTORS)
    assert (e.value.path, e.value.field, e.value.problem) == (str(path), "method", "column missing")


def test_read_artifact_refuses_another_kind_and_another_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "v.parquet"
    write_artifact(
        columns_table(_vectors_columns(1, 2), VECTORS.schema(2)), path, VECTORS, make_meta(VECTORS, {})
    )
    with pytest.raises(InputError) as e:
        read_artifact(path, PAIRS)
    assert e.value.field == "kind"
    assert "is a 'vectors' file (from `caa compute-vectors`), expected a 'pairs' file" in str(e.value)
    old = tmp_path / "old.parquet"
    write_artifact(
        columns_table(_vectors_columns(1, 2), VECTORS.schema(2)),
        old,
        VECTORS,
        {**make_meta(VECTORS, {}), "schema_version": 0},
    )
    with pytest.raises(InputError, match="schema version 0, this caa reads version 1") as e:
        read_artifact(old, VECTORS)
    assert e.value.field == "schema_version"


def test_read_meta_names_the_metadata_field_of_the_wrong_type(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    meta = make_meta(ACTIVATIONS, {}, model={"name": "m", "hidden_size": "32"}, layers=[0, "x"])
    pq.write_table(pa.table({"x": [1]}).replace_schema_metadata({META_KEY: json.dumps(meta)}), path)
    with pytest.raises(InputError) as e:
        read_meta(path)
    assert e.value.field == "model.hidden_size"
    assert "expected an integer in the 'caa' metadata, found a JSON string" in e.value.problem


def test_read_meta_of_plain_parquet_and_of_files_that_are_not(tmp_path: Path) -> None:
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"x": [1]}), plain)
    with pytest.raises(InputError, match="not a caa artifact: its Parquet metadata has no 'caa' entry"):
        read_meta(plain)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        read_meta(junk)
    with pytest.raises(InputError, match="file not found"):
        require_file(tmp_path / "missing.parquet")
    with pytest.raises(InputError, match="is a directory, not a file"):
        require_file(tmp_path)


def test_read_artifact_refuses_nulls_in_a_non_nullable_column(tmp_path: Path) -> None:
    columns = _vectors_columns(2, 2)
    columns["behavior"] = ["b", None]
    loose = pa.schema([f.with_nullable(True) for f in VECTORS.schema(2)])
    path = tmp_path / "v.parquet"
    table = columns_table(columns, loose).replace_schema_metadata(
        {META_KEY: json.dumps(make_meta(VECTORS, {}))}
    )
    pq.write_table(table, path)
    with pytest.raises(InputError) as e:
        read_artifact(path, VECTORS)
    assert (e.value.field, e.value.problem) == ("behavior", "column has null values")


def _generations_table(**extra: pa.Array) -> pa.Table:
    columns = {
        "prompt_index": pa.array([0, 0], pa.int32()),
        "prompt": ["hi", "hi"],
        "behavior": ["mood", "mood"],
        "layer": pa.array([2, 2], pa.int16()),
        "multiplier": [-1.0, 1.0],
        "text": ["sad", "glad"],
        "n_tokens": pa.array([1, 1], pa.int32()),
    }
    return pa.table({**columns, **extra})


def test_columns_added_in_a_later_version_are_written_null_and_read_null_from_older_files(
    tmp_path: Path,
) -> None:
    written = tmp_path / "new.parquet"
    write_artifact(_generations_table(), written, GENERATIONS, make_meta(GENERATIONS, {}))
    assert pq.read_schema(written).names[-2:] == ["probe_score", "judge_rating"]  # written, null
    older = tmp_path / "old.parquet"  # as caa wrote it before the columns were added: version 1
    meta = json.dumps({**make_meta(GENERATIONS, {}), "schema_version": 1})
    pq.write_table(_generations_table().replace_schema_metadata({META_KEY: meta}), older)
    for path in (written, older):
        table = read_artifact(path, GENERATIONS).table
        assert table.column("probe_score").null_count == 2 and table.column("judge_rating").type == pa.int8()
        assert read_artifact(path, GENERATIONS, columns=["text", "judge_rating"]).table.column_names == [
            "text",
            "judge_rating",
        ]


def test_an_added_column_of_the_wrong_type_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    table = _generations_table(probe_score=pa.array(["high", "low"]))
    pq.write_table(table.replace_schema_metadata({META_KEY: json.dumps(make_meta(GENERATIONS, {}))}), path)
    with pytest.raises(InputError, match="field 'probe_score': column has type string, expected double"):
        read_artifact(path, GENERATIONS)
