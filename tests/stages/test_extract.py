from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from caa.cli import app
from caa.core.prompts import collate, encode, prompt_format
from caa.models.loading import load_model
from caa.stages.extract import encode_pairs, extract_activations
from caa.stages.ingest import read_pairs
from caa.store.artifacts import read_artifact
from caa.store.schemas import ACTIVATIONS
from tests.helpers import AB_ROWS, FREEFORM_ROWS, launch, ranks_reported, write_pairs_file

runner = CliRunner()


def reference_activation(loaded, ids: list[int], read: list[int], layer: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Unbatched: hidden_states[l + 1] (the last block's own output by a hook), mean over ``read``."""
    captured = {}

    def hook(module, args, output):  # type: ignore[no-untyped-def]
        captured["h"] = output[0] if isinstance(output, tuple) else output

    handle = loaded.blocks[-1].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            out = loaded.model(torch.tensor([ids]), output_hidden_states=True)
    finally:
        handle.remove()
    hidden = captured["h"] if layer == loaded.num_layers - 1 else out.hidden_states[layer + 1]
    return hidden[0, read].float().mean(0)


def extracted_frame(pairs: pd.DataFrame, loaded, layers, **kw) -> tuple[pd.DataFrame, np.ndarray]:  # type: ignore[no-untyped-def]
    groups = list(extract_activations(pairs, loaded, layers, **kw))
    keys = pd.DataFrame({k: np.concatenate([g[k] for g in groups]) for k in groups[0] if k != "activation"})
    return keys, np.concatenate([g["activation"] for g in groups])


@pytest.mark.parametrize("position", ["last", "mean"])
def test_activations_equal_unbatched_hidden_states(
    tiny_model_dir: Path, pairs_file: Path, position: str
) -> None:
    loaded = load_model(str(tiny_model_dir), device="cpu")
    pairs, _ = read_pairs(pairs_file)
    layers = list(range(loaded.num_layers))
    keys, values = extracted_frame(pairs, loaded, layers, position=position, batch_size=7)
    assert len(keys) == len(pairs) * 2 * len(layers)
    style = prompt_format(loaded.tokenizer)
    for row in pairs.itertuples():
        for side in ("positive", "negative"):
            rule = "answer" if row.format == "ab" else position
            enc = encode(loaded.tokenizer, style, row.prompt, getattr(row, side), row.format, rule)
            for layer in layers:
                hit = np.flatnonzero(
                    (keys.pair_id == row.pair_id) & (keys.side == side) & (keys.layer == layer)
                )
                assert len(hit) == 1
                ref = reference_activation(loaded, enc.input_ids, enc.read, layer)
                torch.testing.assert_close(torch.from_numpy(values[hit[0]]), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_equals_unbatched_and_early_stop_changes_nothing(
    tiny_models: dict[str, Path], pairs_file: Path, padding_side: str
) -> None:
    loaded = load_model(str(tiny_models["gemma3"]), device="cpu")  # sliding-window layers and padding
    pairs, _ = read_pairs(pairs_file)
    full_keys, full = extracted_frame(pairs, loaded, [0, 1, 2, 3], batch_size=1)
    keys, batched = extracted_frame(pairs, loaded, [1], batch_size=8, padding_side=padding_side)
    lengths = {
        len(it.encoded.input_ids)
        for it in encode_pairs(pairs, loaded, prompt_format(loaded.tokenizer), "last")
    }
    assert len(lengths) > 3  # mixed lengths, so batches are padded
    merged = keys.reset_index().merge(full_keys.reset_index(), on=["pair_id", "side", "layer"])
    assert len(merged) == len(keys)
    np.testing.assert_allclose(batched[merged.index_x], full[merged.index_y], atol=1e-5, rtol=1e-5)


def test_positions_come_from_offsets(tiny_models: dict[str, Path]) -> None:
    loaded = load_model(str(tiny_models["llama"]), device="cpu")
    tok = loaded.tokenizer
    style = prompt_format(tok)
    enc = encode(tok, style, AB_ROWS[0]["question"], "(B)", "ab", "answer")
    assert tok.decode([enc.input_ids[enc.read[0]]]) == "B"
    # the template ends in a space that merges with "(" into one token: that token starts the completion
    assert tok.decode(enc.input_ids[enc.completion_start :]) == " (B"
    assert tok.decode(enc.input_ids[: enc.completion_start]).endswith("<|assistant|>")
    row = FREEFORM_ROWS[0]
    last = encode(tok, style, row["prompt"], row["positive"], "freeform", "last")
    mean = encode(tok, style, row["prompt"], row["positive"], "freeform", "mean")
    assert last.read == [len(last.input_ids) - 1]
    assert mean.read == list(range(mean.completion_start, len(mean.input_ids)))
    assert tok.decode(mean.input_ids[mean.completion_start :]) == " " + row["positive"]
    # plain text for base use: no template tokens
    plain = encode(tok, prompt_format(tok, "off"), row["prompt"], row["positive"], "freeform", "last")
    assert "<|user|>" not in tok.decode(plain.input_ids)
    batch = collate([last, plain], pad_id=tok.pad_token_id)
    assert batch.read_weights.sum(1).tolist() == [1.0, 1.0]
    assert batch.position_ids[1, -1] == len(plain.input_ids) - 1


def test_consistency_of_pair_differences() -> None:
    from caa.stages.vectors import consistency

    assert consistency(np.array([[1.0, 0.0], [2.0, 0.0]])) == pytest.approx(1.0)
    assert consistency(np.array([[1.0, 1.0], [1.0, -1.0]])) == pytest.approx(np.sqrt(0.5))
    assert consistency(np.array([[1.0, 0.0], [0.0, 0.0]])) == pytest.approx(
        1.0
    )  # a zero difference is skipped
    assert consistency(np.zeros((2, 3))) is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layers", "9"], "layer 9 is out of range; valid layers are 0-3"),
        (["--model", "nonexistent-model"], "unknown model 'nonexistent-model'"),
        (["--behavior", "nosuch"], "no behavior nosuch"),
        (["--position", "middle"], "--position 'middle'"),
        (["--chat-template", "on", "--model", "BASE"], "has no chat template"),
    ],
)
def test_extract_bad_input(
    tiny_models: dict[str, Path], pairs_file: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    from tests.tiny_models import save_tiny_model

    if "BASE" in args:
        args[args.index("BASE")] = str(save_tiny_model("llama", tmp_path / "base", chat=False))
    if "--model" not in args:
        args = [*args, "--model", str(tiny_models["llama"])]
    out = tmp_path / "acts.parquet"
    result = runner.invoke(app, ["extract", str(pairs_file), "-o", str(out), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists()


def test_extract_missing_and_wrong_artifacts(
    tiny_models: dict[str, Path], pairs_file: Path, tmp_path: Path
) -> None:
    model = str(tiny_models["llama"])
    result = runner.invoke(app, ["extract", str(tmp_path / "none.parquet"), "-m", model])
    assert result.exit_code == 2 and "none.parquet: file not found" in result.output
    acts = tmp_path / "acts.parquet"
    assert (
        runner.invoke(
            app, ["extract", str(pairs_file), "-m", model, "-o", str(acts), "--layers", "0"]
        ).exit_code
        == 0
    )
    result = runner.invoke(app, ["extract", str(acts), "-m", model, "-o", str(tmp_path / "x.parquet")])
    assert result.exit_code == 2
    assert "is a 'activations' file (from `caa extract`), expected a 'pairs' file" in result.output
    result = runner.invoke(app, ["compute-vectors", str(pairs_file), "-o", str(tmp_path / "v.parquet")])
    assert result.exit_code == 2 and "expected a 'activations' file" in result.output


def test_empty_split(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    pairs = write_pairs_file(tmp_path / "p.parquet", {"mood": FREEFORM_ROWS[:3]}, test_fraction=0.0)
    result = runner.invoke(
        app,
        [
            "extract",
            str(pairs),
            "-m",
            str(tiny_models["llama"]),
            "--split",
            "test",
            "-o",
            str(tmp_path / "a.parquet"),
        ],
    )
    assert result.exit_code == 2
    assert "no pairs in split 'test'" in result.output


def test_two_real_processes_write_the_one_process_file(
    tiny_models: dict[str, Path], pairs_file: Path, tmp_path: Path
) -> None:
    """torchrun with 2 CPU processes (both ranks report themselves) against one process: the same
    batches, shared out whole, so the same rows in the same order, bit for bit."""
    model = str(tiny_models["llama"])
    one, two = tmp_path / "one.parquet", tmp_path / "two.parquet"
    args = ["extract", str(pairs_file), "-m", model, "--batch-size", "4"]
    assert runner.invoke(app, [*args, "-o", str(one)]).exit_code == 0
    proc = launch([*args, "-o", str(two)], 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks_reported(proc, 2)
    assert proc.stdout.count("wrote ") == 1  # the main process alone prints
    a, b = read_artifact(one, ACTIVATIONS).table, read_artifact(two, ACTIVATIONS).table
    assert a.num_rows == 2 * 20 * 4 and a.equals(b)
    assert not list(tmp_path.glob("two.parquet.part*"))


def test_truncate_counts_the_pairs_it_cut(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    long_prompt = "Tell me all about " + "the long and winding road, " * 60  # > 256 tokens
    rows = [dict(r) for r in FREEFORM_ROWS]
    rows[0]["prompt"] = long_prompt
    pairs = write_pairs_file(tmp_path / "pairs.parquet", {"mood": rows})
    out = tmp_path / "acts.parquet"
    args = ["extract", str(pairs), "-m", str(tiny_models["llama"]), "--layers", "1", "-o", str(out)]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "longer than the model's context of 256" in refused.output
    assert not out.exists() and not (tmp_path / "acts.parquet.partial").exists()
    result = runner.invoke(app, [*args, "--truncate"])
    assert result.exit_code == 0, result.output
    assert "--truncate: cut the start of 1 of 10 pairs to the context of 256 tokens" in result.output
    table = read_artifact(out, ACTIVATIONS).table
    assert table.num_rows == 20 and int(max(table.column("n_tokens").to_pylist())) == 256
