"""The in-memory Python API: its values, their files, and the README's example."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import caa
from caa.cli import app
from tests.helpers import AB_ROWS, FREEFORM_ROWS

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def test_public_api_names_every_stage_and_value() -> None:
    for name in ("ingest", "extract", "compute_vectors", "sweep", "generate", "steer", "load_model"):
        assert callable(getattr(caa, name)) and name in caa.__all__
    for name in ("PairSet", "Activations", "VectorSet", "SweepResult", "Generations", "LoadedModel"):
        assert isinstance(getattr(caa, name), type) and name in caa.__all__
    for name in ("IngestOptions", "ExtractOptions", "SweepOptions", "GenerateOptions"):
        assert isinstance(getattr(caa, name), type) and name in caa.__all__
    import caa.stages.sweep as stage  # a module, and caa.sweep stays the function

    assert callable(caa.sweep) and stage is not caa.sweep and stage.__name__ == "caa.stages.sweep"


def test_ingest_takes_paths_dicts_and_frames_alike(tmp_path: Path) -> None:
    import json

    source = tmp_path / "mood.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in FREEFORM_ROWS))
    from_file = caa.ingest(source)
    from_dicts = caa.ingest(FREEFORM_ROWS, caa.IngestOptions(behavior="mood"))
    from_frame = caa.ingest(pd.DataFrame(FREEFORM_ROWS), caa.IngestOptions(behavior="mood"))
    ids = [sorted(p.frame.pair_id) for p in (from_file, from_dicts, from_frame)]
    assert ids[0] == ids[1] == ids[2]
    assert list(from_file.frame.split) == list(from_dicts.frame.split)
    ab = caa.ingest(AB_ROWS, caa.IngestOptions(behavior="agree"))
    assert set(ab.frame.format) == {"ab"} and ab.behaviors() == ["agree"]
    with pytest.raises(caa.InputError, match=r"records: index 0: field 'negative'"):
        caa.ingest([{"prompt": "p", "positive": "a"}])
    saved = caa.PairSet.read(from_dicts.save(tmp_path / "pairs.parquet"))
    pd.testing.assert_frame_equal(saved.frame, from_dicts.frame)
    assert saved.counts() == from_dicts.counts()


def test_in_memory_pipeline_equals_the_command_line(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model_dir = str(tiny_models["llama"])
    model = caa.load_model(model_dir, device="cpu")
    pairs = caa.ingest([*AB_ROWS], caa.IngestOptions(behavior="agree", test_fraction=0.5))
    pairs_path = pairs.save(tmp_path / "pairs.parquet")
    mood = caa.ingest(FREEFORM_ROWS, caa.IngestOptions(behavior="mood", test_fraction=0.5))
    pairs = caa.PairSet(pd.concat([pairs.frame, mood.frame], ignore_index=True), pairs.meta)
    pairs_path = pairs.save(tmp_path / "pairs.parquet")

    acts = caa.extract(model, pairs, caa.ExtractOptions(layers=(1, 2), split="train"))
    vectors = caa.compute_vectors(acts)
    files = {name: tmp_path / f"{name}.parquet" for name in ("acts", "vectors", "sweep")}
    cli = [
        ["extract", str(pairs_path), "-m", model_dir, "--layers", "1,2", "--split", "train",
         "-o", str(files["acts"])],
        ["compute-vectors", str(files["acts"]), "-o", str(files["vectors"])],
        [
            "sweep", str(files["vectors"]), str(pairs_path), "-m", model_dir, "--multipliers", "-1,1",
            "--max-pairs", "3", "--neutral-count", "3", "-o", str(files["sweep"]),
        ],
    ]  # fmt: skip
    for args in cli:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    from_cli = caa.VectorSet.read(files["vectors"])
    np.testing.assert_allclose(vectors.values, from_cli.values, atol=1e-6, rtol=1e-6)
    assert vectors.meta["train_pair_ids"] == from_cli.meta["train_pair_ids"]
    assert vectors.meta["model"] == from_cli.meta["model"]

    swept = caa.sweep(
        model, vectors, pairs, caa.SweepOptions(multipliers=(-1, 1), max_pairs=3, neutral_count=3)
    )
    on_disk = caa.SweepResult.read(files["sweep"])
    columns = ["behavior", "layer", "multiplier", "score_mean", "delta", "kl_mean", "perplexity"]
    pd.testing.assert_frame_equal(
        swept.table[columns].reset_index(drop=True),
        on_disk.table[columns],
        check_exact=False,
        check_dtype=False,
        atol=1e-6,
    )
    assert swept.recommended == on_disk.recommended
    assert len(swept.items) == len(on_disk.items)

    # every value saves the file the CLI writes and reads back equal
    table, items, plot = swept.save(tmp_path / "again.parquet")
    assert plot.read_bytes()[:4] == b"\x89PNG" and items.name == "again.items.parquet"
    back = caa.SweepResult.read(table)
    pd.testing.assert_frame_equal(
        back.table[columns], swept.table[columns].reset_index(drop=True), check_dtype=False
    )
    acts_back = caa.Activations.read(acts.save(tmp_path / "mem-acts.parquet"))
    np.testing.assert_array_equal(acts_back.values, acts.values)
    gens = caa.generate(
        model, vectors, ["hello there"], caa.GenerateOptions(layer=2, behavior="mood", max_new_tokens=4)
    )
    assert sorted(gens.frame.multiplier) == [-1.0, 0.0, 1.0]
    gens_back = caa.Generations.read(gens.save(tmp_path / "gens.parquet"))
    assert list(gens_back.frame.text) == list(gens.frame.text)
    assert gens.side_by_side().shape == (1, 3)


def test_vector_set_tensor_owns_the_behavior_rule(tiny_models: dict[str, Path]) -> None:
    model = caa.load_model(str(tiny_models["llama"]), device="cpu")
    pairs = caa.ingest(FREEFORM_ROWS, caa.IngestOptions(behavior="mood"))
    vectors = caa.compute_vectors(caa.extract(model, pairs, caa.ExtractOptions(layers=(2,), split="train")))
    v = vectors.tensor()
    assert v.dtype == torch.float32 and v.shape == (model.hidden_size,)
    assert torch.equal(v, vectors.tensor("mood", 2))
    with pytest.raises(caa.CaaError, match="no behavior 'other'"):
        vectors.tensor("other", 2)


def test_load_model_wraps_a_model_in_memory(tiny_models: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    loaded = caa.load_model(model, tokenizer=tokenizer)
    assert loaded.model is model and loaded.num_layers == 4
    assert loaded.fingerprint.weights_hash.startswith("object:")
    assert caa.load_model(model, tokenizer=tokenizer).fingerprint == loaded.fingerprint
    with pytest.raises(caa.ModelError, match="needs its tokenizer"):
        caa.load_model(model)


@pytest.mark.slow
def test_the_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Python API block, taken from the README itself, on the embedded model."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(ROOT / "data")
    exec(compile(code.group(1), "README.md", "exec"), {})  # the README's own example
    assert (tmp_path / "sweep.items.parquet").is_file() and (tmp_path / "sweep.png").is_file()


def test_residual_scale_is_a_share_of_the_layers_residual_norm(
    pipelines: Callable[[str], tuple[Path, Path]], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    pairs_path, vectors_path = pipelines("llama")
    vectors = caa.VectorSet.read(vectors_path)
    row = vectors.frame[(vectors.frame.behavior == "mood") & (vectors.frame.layer == 2)].iloc[0]
    raw = vectors.vector("mood", 2)
    unit = vectors.vector("mood", 2, scale="residual")
    assert np.linalg.norm(unit) == pytest.approx(row.mean_residual_norm, rel=1e-5)
    np.testing.assert_allclose(unit / np.linalg.norm(unit), raw / np.linalg.norm(raw), atol=1e-6)
    # a sweep at x0.5 of the residual norm is the raw sweep at the multiplier with the same length
    model = caa.load_model(str(tiny_models["llama"]), device="cpu")
    pairs = caa.PairSet.read(pairs_path)
    same = 0.5 * row.mean_residual_norm / np.linalg.norm(raw)
    neutral = ["a walk in the park"]
    share = caa.SweepOptions(
        layers=(2,), behaviors=("mood",), max_pairs=3, multipliers=(0.5,), scale="residual"
    )
    by_share = caa.sweep(model, vectors, pairs, share, neutral=neutral)
    raw_options = dataclasses.replace(share, multipliers=(same,), scale="raw")
    by_raw = caa.sweep(model, vectors, pairs, raw_options, neutral=neutral)
    np.testing.assert_allclose(
        by_share.table.score_mean.to_numpy(), by_raw.table.score_mean.to_numpy(), atol=1e-4, rtol=1e-4
    )
    assert by_share.meta["options"]["scale"] == "residual"
    out = tmp_path / "residual.gguf"
    result = runner.invoke(
        app,
        ["export", str(vectors_path), "--behavior", "mood", "--layers", "2", "--scale", "residual",
         "--multiplier", "0.5", "-o", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    from gguf import GGUFReader

    tensor = next(t for t in GGUFReader(out).tensors if t.name == "direction.2")
    assert np.linalg.norm(np.asarray(tensor.data)) == pytest.approx(0.5 * row.mean_residual_norm, rel=1e-5)


def test_residual_scale_refuses_vectors_without_a_residual_norm(
    pipelines: Callable[[str], tuple[Path, Path]], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    _, vectors_path = pipelines("llama")
    gguf, imported = tmp_path / "v.gguf", tmp_path / "imported.parquet"
    args = ["export", str(vectors_path), "--behavior", "mood", "--layers", "2", "-o", str(gguf)]
    assert runner.invoke(app, args).exit_code == 0
    model = str(tiny_models["llama"])
    assert runner.invoke(app, ["import", str(gguf), "-m", model, "-o", str(imported)]).exit_code == 0
    result = runner.invoke(
        app,
        ["generate", "-v", str(imported), "--layer", "2", "-m", model, "-p", "hi", "--scale", "residual",
         "-o", str(tmp_path / "g.parquet")],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "--scale residual" in result.output and "field 'mean_residual_norm'" in result.output
    assert not (tmp_path / "g.parquet").exists()
