"""Mean-difference and PCA vectors (caa.vectors): values against a naive reference, and refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import caa
from caa.cli import app
from caa.stages import vectors as vectors_module
from caa.stages.extract import read_activations
from caa.stages.vectors import VectorSet, vector_rows
from caa.store.artifacts import read_artifact, vectors_of
from caa.store.schemas import ACTIVATIONS

runner = CliRunner()


def test_vectors_equal_naive_mean_and_pca_sign(
    tiny_models: dict[str, Path], pairs_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "acts.parquet"
    result = runner.invoke(app, ["extract", str(pairs_file), "-m", str(tiny_models["llama"]), "-o", str(out)])
    assert result.exit_code == 0, result.output
    art = read_artifact(out, ACTIVATIONS)
    assert art.meta["model"]["architecture"] == "llama"
    assert art.meta["layers"] == [0, 1, 2, 3]
    keys = art.table.drop_columns("activation").to_pandas()
    values = vectors_of(art.table, "activation")
    acts = read_activations([out])
    mean = vector_rows(acts, "mean")
    pca = vector_rows(acts, "pca")
    for behavior in ("agree", "mood"):
        for layer in range(4):
            sel = (keys.behavior == behavior) & (keys.layer == layer) & (keys.split.astype(str) == "train")
            pos = keys[sel & (keys.side == "positive")].sort_values("pair_id")
            neg = keys[sel & (keys.side == "negative")].sort_values("pair_id")
            naive = (values[pos.index].astype(np.float64) - values[neg.index]).mean(0)
            row = mean[(mean.behavior == behavior) & (mean.layer == layer)].iloc[0]
            np.testing.assert_allclose(row.vector, naive, atol=1e-6, rtol=1e-5)
            assert row.n_train == len(pos)
            assert row.vector_norm == pytest.approx(np.linalg.norm(naive), rel=1e-5)
            diffs = values[pos.index].astype(np.float64) - values[neg.index]
            cosines = [d @ naive / np.linalg.norm(d) / np.linalg.norm(naive) for d in diffs]
            assert row.pair_consistency == pytest.approx(np.mean(cosines), rel=1e-6)
            assert row.norm_ratio == pytest.approx(row.vector_norm / row.mean_residual_norm)
            p = pca[(pca.behavior == behavior) & (pca.layer == layer)].iloc[0]
            assert float(p.vector @ naive) > 0  # PCA sign agrees with the mean difference
            assert 0.0 <= row.test_auc <= 1.0
    middle = mean[(mean.behavior == "mood") & (mean.layer == 1)].iloc[0]
    a = mean[(mean.behavior == "mood") & (mean.layer == 0)].iloc[0].vector
    b = middle.vector
    assert middle.cos_prev_layer == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), rel=1e-5)
    result = runner.invoke(app, ["compute-vectors", str(out), "-o", str(tmp_path / "v.parquet")])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "cons" in result.output
    check_one_vector_set(acts, mean, tmp_path)


def check_one_vector_set(acts: Any, rows: pd.DataFrame, tmp_path: Path) -> None:
    """The frame of :func:`vector_rows` is what caa.compute_vectors's VectorSet holds; the set saves
    and reads back equal through its own methods, and the CLI's helpers are those methods."""
    made = caa.compute_vectors(acts)
    assert isinstance(made, VectorSet) and not hasattr(vectors_module, "compute_vectors")
    np.testing.assert_array_equal(made.values, np.stack(rows.vector.to_list()))
    pd.testing.assert_frame_equal(made.frame, rows.drop(columns="vector"))
    back = VectorSet.read(made.save(tmp_path / "saved.parquet"))
    np.testing.assert_array_equal(back.values, made.values)
    pd.testing.assert_frame_equal(back.frame[made.frame.columns], made.frame, check_dtype=False)
    assert back.meta == made.meta and back.path == tmp_path / "saved.parquet"
    assert not hasattr(vectors_module, "write_vectors") and not hasattr(vectors_module, "read_vectors")
    source = Path(vectors_module.__file__).read_text()
    assert source.count("write_artifact(") == 1 and source.count("read_artifact(") == 1


def test_compute_vectors_refuses_mixed_models(
    tiny_models: dict[str, Path], pairs_file: Path, tmp_path: Path
) -> None:
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    for model, out in ((tiny_models["llama"], a), (tiny_models["qwen2"], b)):
        result = runner.invoke(
            app, ["extract", str(pairs_file), "-m", str(model), "-o", str(out), "--layers", "1"]
        )
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["compute-vectors", str(a), str(b), "-o", str(tmp_path / "v.parquet")])
    assert result.exit_code == 2
    assert f"{a} and {b} come from different models: field 'model.weights_hash'" in result.output
    assert not (tmp_path / "v.parquet").exists()
