"""`caa export` and `caa import`: vectors out to llama.cpp, safetensors, .npy/.npz, and back in (with
SAELens sparse-autoencoder features), through the command line.

The valid inputs are the session's tiny llama model (4 blocks, hidden size 32) and its vectors
(behaviors agree and mood, layers 1 and 2) from tests/test_bad_inputs.py. The bad-input cases at the
end are listed in tests/bad_inputs/README.md ("Vectors in and out").
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from typer.testing import Result

from caa.cli import app
from caa.errors import InputError
from caa.stages.foreign import sae_layer
from caa.stages.vectors import VectorSet
from caa.store.artifacts import read_meta
from tests import test_bad_inputs as corpus
from tests.helpers import DATA, require_lm_eval
from tests.test_bad_inputs import BAD, Valid, _describe, runner
from tests.tiny_models import ARCHITECTURES

valid = corpus.valid  # the valid artifacts of the bad-input corpus, a fixture here too
_one_thread = corpus._one_thread  # autouse: the tiny models run on one thread


def cli(*args: object) -> Result:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, _describe(result)
    return result


def vector(path: Path, behavior: str, layer: int) -> np.ndarray:
    return VectorSet.read(path).vector(behavior, layer)


# --- export -----------------------------------------------------------------------------------------


def test_gguf_follows_llama_cpp_loader_rules(valid: Valid, tmp_path: Path) -> None:
    """What common_control_vector_load_one reads: tensors direction.N (N >= 1), F32, one dimension
    of d_model each; plus the control vector's metadata, and the multiplier baked in."""
    out = tmp_path / "happy.gguf"
    result = cli(
        "export", valid.vectors, "--format", "gguf", "--behavior", "mood", "--multiplier", "2.5", "-o", out
    )
    assert "'mood' at layers 1-2, x2.5" in result.output
    reader = gguf.GGUFReader(str(out))
    fields = {name: f.contents() for name, f in reader.fields.items()}
    assert fields["general.architecture"] == "controlvector"
    assert fields["controlvector.model_hint"] == "llama"
    assert fields["controlvector.layer_count"] == 2
    assert reader.fields["controlvector.layer_count"].types == [gguf.GGUFValueType.UINT32]
    assert (
        json.loads(fields["caa.model"])["weights_hash"] == read_meta(valid.vectors)["model"]["weights_hash"]
    )
    assert [t.name for t in reader.tensors] == ["direction.1", "direction.2"]
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert [int(n) for n in t.shape] == [32] and t.n_elements == 32
        layer = int(t.name.split(".")[1])
        expected = (vector(valid.vectors, "mood", layer).astype(np.float64) * 2.5).astype(np.float32)
        assert np.array_equal(np.asarray(t.data), expected)


def test_gguf_export_import_sweep_gives_the_same_table(valid: Valid, tmp_path: Path) -> None:
    """compute-vectors -> export gguf -> import -> sweep: the same table as the original vectors, on
    the same held-out pairs; and the sweep says its held-out check had nothing to check."""
    gguf_file, imported = tmp_path / "mood.gguf", tmp_path / "imported.parquet"
    cli("export", valid.vectors, "--behavior", "mood", "-o", gguf_file)
    result = cli("import", gguf_file, "-m", valid.model, "-o", imported)
    assert "imported 'mood' at layers 1-2" in result.output  # the name the export recorded
    grid = ["--layers", "1,2", "--multipliers", "-1,0,1", "--max-pairs", "2", "--neutral", valid.neutral]
    grid += ["--neutral-count", "2", "--behavior", "mood", "-m", valid.model]
    tables = []
    for name, vectors in (("original", valid.vectors), ("imported", imported)):
        result = cli("sweep", vectors, valid.pairs, *grid, "-o", tmp_path / f"sweep-{name}.parquet")
        skipped = "the held-out check was skipped" in " ".join(result.output.split())
        assert skipped == (name == "imported"), result.output
        tables.append(pq.read_table(tmp_path / f"sweep-{name}.parquet").to_pandas())
    numbers = tables[0].select_dtypes("number").columns
    assert len(numbers) > 10
    pd.testing.assert_frame_equal(tables[0][numbers], tables[1][numbers], rtol=0, atol=1e-6)
    assert tables[0].backward_items.map(list).equals(tables[1].backward_items.map(list))


def test_imported_vectors_carry_their_source_and_no_invented_diagnostics(
    valid: Valid, tmp_path: Path
) -> None:
    exported, imported = tmp_path / "agree.npz", tmp_path / "imported.parquet"
    cli("export", valid.vectors, "--behavior", "agree", "-o", exported)
    cli("import", exported, "-m", valid.model, "--behavior", "agreeable", "-o", imported)
    meta = read_meta(imported)
    assert meta["command"] == "caa import" and meta["train_pair_ids"] == [] and meta["prompt"] is None
    assert meta["model"] == read_meta(valid.vectors)["model"]
    assert meta["source"]["format"] == "npz" and meta["source"]["feature"] is None
    assert meta["source"]["sha256"] == meta["inputs"][str(exported)]
    table = pq.read_table(imported).to_pandas()
    assert list(table.behavior) == ["agreeable", "agreeable"] and list(table.layer) == [1, 2]
    for column in (
        "n_train",
        "n_test",
        "mean_residual_norm",
        "pair_consistency",
        "test_accuracy",
        "test_auc",
    ):
        assert table[column].isna().all(), column
    assert table.cos_next_layer.notna().iloc[0]  # adjacent cosines need only the vectors
    vecs = VectorSet.read(imported)
    assert vecs.absurd_norms() == []  # no residual norm: nothing to judge, nothing invented
    for layer in (1, 2):
        assert np.array_equal(vecs.vector("agreeable", layer), vector(valid.vectors, "agree", layer))
    report = json.loads(cli("inspect", imported, "--json").output)
    assert report["meta"]["source"]["format"] == "npz"


@pytest.mark.parametrize("fmt", ["safetensors", "npz", "npy"])
def test_round_trips(fmt: str, valid: Valid, tmp_path: Path) -> None:
    out, back = tmp_path / f"v.{fmt}", tmp_path / "back.parquet"
    layers = ["--layers", "2"] if fmt == "npy" else []
    cli("export", valid.vectors, "--behavior", "mood", *layers, "-o", out)
    cli("import", out, "-m", valid.model, *(["--layer", "2"] if fmt == "npy" else []), "-o", back)
    vecs = VectorSet.read(back)
    assert vecs.layers(vecs.behaviors()[0]) == ([2] if fmt == "npy" else [1, 2])
    for layer in vecs.layers(vecs.behaviors()[0]):
        assert np.array_equal(vecs.vector(vecs.behaviors()[0], layer), vector(valid.vectors, "mood", layer))
    if fmt == "safetensors":
        with safe_open(str(out), framework="np") as f:
            assert sorted(f.keys()) == ["layer.1", "layer.2"]
            meta = f.metadata()
        assert json.loads(meta["caa.model"]) == read_meta(valid.vectors)["model"]
        assert "output of decoder block N (0-based)" in meta["caa.layer_convention"]
        assert vecs.behaviors() == ["mood"]
    if fmt == "npz":
        assert sorted(np.load(out).files) == ["layer_1", "layer_2"]


def test_generate_and_export_accept_imported_vectors(valid: Valid, tmp_path: Path) -> None:
    imported = tmp_path / "imported.parquet"
    cli("export", valid.vectors, "--behavior", "mood", "-o", tmp_path / "mood.safetensors")
    cli("import", tmp_path / "mood.safetensors", "-m", valid.model, "-o", imported)
    texts = []
    for vectors in (valid.vectors, imported):
        out = tmp_path / "gen.parquet"
        args = [
            "--layer",
            "2",
            "--multipliers",
            "-2,2",
            "--max-new-tokens",
            "4",
            "-p",
            "tell me about the city",
        ]
        cli("generate", "-v", vectors, "--behavior", "mood", "-m", valid.model, *args, "-o", out, "--force")
        texts.append(pq.read_table(out).column("text").to_pylist())
    assert texts[0] == texts[1]
    cli("export", imported, "-o", tmp_path / "again.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "again.gguf"))
    assert [t.name for t in reader.tensors] == ["direction.1", "direction.2"]


def test_export_replaces_its_own_file_but_not_a_model(valid: Valid, tmp_path: Path) -> None:
    out = tmp_path / "mood.gguf"
    cli("export", valid.vectors, "--behavior", "mood", "-o", out)
    result = cli("export", valid.vectors, "--behavior", "mood", "--multiplier", "2", "-o", out)
    assert "a file from `caa export`): replacing it" in " ".join(result.output.split())
    model = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(model), "llama")
    writer.add_tensor("token_embd.weight", np.ones((4, 32), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    before = model.read_bytes()
    result = runner.invoke(app, ["export", str(valid.vectors), "--behavior", "mood", "-o", str(model)])
    assert result.exit_code == 2 and "exists and is a GGUF file" in result.output
    assert model.read_bytes() == before


@pytest.mark.parametrize("fmt", ["npy", "npz"])
def test_export_knows_its_own_npy_and_npz_but_not_anothers(fmt: str, valid: Valid, tmp_path: Path) -> None:
    """A rerun replaces its own .npy/.npz (marked in the .npy header's comment, the .npz's zip comment,
    both invisible to numpy), while an array from elsewhere is kept."""
    out = tmp_path / f"mood.{fmt}"
    line = ["export", valid.vectors, "--behavior", "mood", "--layers", "2", "-o", out]
    cli(*line)
    result = cli(*line[:-2], "--multiplier", "2", "-o", out)
    assert "a file from `caa export`): replacing it" in " ".join(result.output.split())
    loaded = np.load(out, allow_pickle=False)  # what any numpy user gets
    value = loaded if fmt == "npy" else loaded["layer_2"]
    expected = (vector(valid.vectors, "mood", 2).astype(np.float64) * 2).astype(np.float32)
    assert np.array_equal(value, expected)
    if fmt == "npz":
        assert loaded.files == ["layer_2"]
    foreign = tmp_path / f"theirs.{fmt}"
    np.save(foreign, _ones()) if fmt == "npy" else np.savez(foreign, layer_2=_ones())
    before = foreign.read_bytes()
    result = runner.invoke(app, [str(a) for a in line[:-1]] + [str(foreign)])
    assert result.exit_code == 2 and "not made by caa" in result.output, result.output
    assert foreign.read_bytes() == before


# --- lm-evaluation-harness ----------------------------------------------------------------------------


def _lm_eval_file(path: Path) -> dict[str, Any]:
    """The file as lm-eval reads it (torch.load), here without unpickling anything but plain data."""
    import torch

    loaded: dict[str, Any] = torch.load(path, weights_only=True)
    return loaded


def test_lm_eval_export_is_the_dict_the_steered_model_loads(valid: Valid, tmp_path: Path) -> None:
    """What lm_eval/models/hf_steered.py (lm-eval 0.4.13) reads: one entry per hookpoint (layer l of a
    Llama is ``layers.l`` below model.base_model), steering_vector the vector itself ([d_model], F32),
    steering_coefficient the multiplier, action add, no bias; the positions said in the file."""
    out = tmp_path / "mood.pt"
    result = cli("export", valid.vectors, "--behavior", "mood", "--multiplier", "2.5", "-o", out)
    text = " ".join(result.output.split())
    assert "lm-eval, 'mood' at layers 1-2, x2.5" in text
    assert "hookpoints layers.1, layers.2" in text
    assert "at every position, prompt included: caa's --steer-positions all" in text
    assert f"lm_eval --model steered --model_args pretrained={valid.model.resolve()},steer_path={out}" in text
    entries = _lm_eval_file(out)
    assert list(entries) == ["layers.1", "layers.2"]
    for layer, name in ((1, "layers.1"), (2, "layers.2")):
        entry = entries[name]
        assert set(entry) == {
            "steering_vector",
            "steering_coefficient",
            "action",
            "bias",
            "head_index",
            "caa",
        }
        assert entry["steering_vector"].dtype == torch.float32 and entry["steering_vector"].shape == (32,)
        assert np.array_equal(entry["steering_vector"].numpy(), vector(valid.vectors, "mood", layer))
        assert entry["steering_coefficient"] == 2.5 and entry["action"] == "add"
        assert entry["bias"] is None and entry["head_index"] is None
        assert entry["caa"]["caa.behavior"] == "mood" and entry["caa"]["caa.multiplier"] == "2.5"
        assert "at every position, prompt included" in entry["caa"]["caa.steer_positions"]
    note = json.loads(zipfile.ZipFile(out).comment)  # what a rerun reads, without unpickling
    assert next(iter(note)) == "caa.export" and note == entries["layers.1"]["caa"]
    residual = tmp_path / "residual.pth"
    cli(
        "export",
        valid.vectors,
        "--behavior",
        "mood",
        "--format",
        "lm-eval",
        "--scale",
        "residual",
        "-o",
        residual,
    )
    expected = VectorSet.read(valid.vectors).vector("mood", 2, "residual")
    assert np.array_equal(_lm_eval_file(residual)["layers.2"]["steering_vector"].numpy(), expected)
    assert not np.allclose(expected, vector(valid.vectors, "mood", 2))


def test_lm_eval_export_knows_its_own_pt_but_not_anothers(valid: Valid, tmp_path: Path) -> None:
    """A rerun replaces its own .pt (marked in the zip comment, which torch.load ignores); a .pt from
    elsewhere is kept (caa import refuses any .pt: the bad-input case import-pytorch-file)."""
    out = tmp_path / "mood.pt"
    line = ["export", valid.vectors, "--behavior", "mood", "--layers", "2", "-o", out]
    cli(*line)
    result = cli(*line[:-2], "--multiplier", "-3", "-o", out)
    assert "a file from `caa export`): replacing it" in " ".join(result.output.split())
    assert _lm_eval_file(out)["layers.2"]["steering_coefficient"] == -3.0
    theirs = tmp_path / "theirs.pt"
    torch.save({"layers.2": {"steering_vector": torch.ones(32), "action": "add"}}, theirs)
    before = theirs.read_bytes()
    result = runner.invoke(app, [str(a) for a in line[:-1]] + [str(theirs)])
    assert result.exit_code == 2 and "not made by caa" in result.output, result.output
    assert theirs.read_bytes() == before


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lm_eval_steered_model_adds_what_caa_adds_at_every_position(
    arch: str, pipelines: Callable[[str], tuple[Path, Path]], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """Real lm-eval: its steered model, loading the export, gives the logits of caa's steering at
    every position with the same vectors and multiplier (here two layers at once), on each fixture
    architecture (its hookpoints differ: h.N for GPT-2); unsteered logits do not match them."""
    require_lm_eval()
    from lm_eval.models.hf_steered import SteeredModel

    import caa
    from caa.core.hooks import steering

    _, vectors = pipelines(arch)
    out = tmp_path / "mood.pt"
    cli("export", vectors, "--behavior", "mood", "--layers", "1-2", "--multiplier", "3", "-o", out)
    harness = SteeredModel(pretrained=str(tiny_models[arch]), steer_path=str(out), device="cpu", batch_size=1)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.inference_mode():
        theirs = harness._model_call(ids)  # what lm-eval's loglikelihood reads
    loaded, vecs = caa.load_model(str(tiny_models[arch]), device="cpu"), VectorSet.read(vectors)
    deltas = {layer: 3 * torch.tensor(vecs.vector("mood", layer)) for layer in (1, 2)}
    with steering(loaded.blocks, deltas, start=None), torch.inference_mode():
        ours = loaded.model(ids).logits
    with torch.inference_mode():
        plain = loaded.model(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert (theirs - plain).abs().max() > 1e-2


@pytest.mark.parametrize("fmt", ["gguf", "safetensors", "npz", "npy"])
def test_import_refuses_the_export_of_another_model(fmt: str, valid: Valid, tmp_path: Path) -> None:
    """The export records its model; importing it for another model (same sizes, other weights) is
    refused, as `caa generate` would refuse the original vectors; for its own model it is imported."""
    out, back = tmp_path / f"agree.{fmt}", tmp_path / "back.parquet"
    cli("export", valid.other_vectors, "--behavior", "agree", "--layers", "2", "-o", out)
    args = ["import", str(out), "--layer", "2", "-o", str(back)]
    result = runner.invoke(app, [*args, "-m", str(valid.model)])
    assert result.exit_code == 2 and not back.exists(), _describe(result)
    assert f"{out}: field 'caa.model.weights_hash' is " in " ".join(result.output.split())
    assert "these vectors were made with another model" in " ".join(result.output.split())
    cli(*args, "-m", valid.other_model)
    assert read_meta(back)["model"] == read_meta(valid.other_vectors)["model"]


def test_control_vectors_that_record_no_model_or_its_architecture_import(
    valid: Valid, tmp_path: Path
) -> None:
    bare = _gguf(tmp_path / "bare.gguf", "controlvector", {"direction.1": _ones()})
    hinted = _gguf(
        tmp_path / "hinted.gguf", "controlvector", {"direction.1": _ones()}, controlvector__model_hint="LLaMA"
    )
    for path in (bare, hinted):
        cli("import", path, "-m", valid.model, "-o", tmp_path / f"{path.stem}.parquet")


def test_generate_checks_the_strength_as_the_sweep_does(valid: Valid, tmp_path: Path) -> None:
    """A multiplier whose product with the vector the model's activations cannot hold is refused
    before generating, with the sweep's message."""
    out = tmp_path / "gen.parquet"
    line = ["generate", "-v", valid.vectors, "-m", valid.model, "--layer", "1", "--behavior", "mood"]
    result = runner.invoke(app, [str(a) for a in line] + ["-p", "hi", "--multipliers=1e30", "-o", str(out)])
    assert result.exit_code == 2 and not out.exists(), _describe(result)
    assert "--multipliers: x1e+30 times the layer-1 vector" in result.output
    assert "beyond what torch.float32 activations hold" in result.output


# --- sparse autoencoders ----------------------------------------------------------------------------


def write_sae(
    directory: Path, hook: str = "blocks.2.hook_resid_post", d_sae: int = 12, d_in: int = 32
) -> np.ndarray:
    """A SAELens-layout SAE: cfg.json and sae_weights.safetensors (W_enc, W_dec, biases)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w_dec = rng.normal(size=(d_sae, d_in)).astype(np.float32)  # [d_sae, d_in]
    tensors = {
        "W_enc": np.ascontiguousarray(w_dec.T),
        "W_dec": w_dec,
        "b_enc": np.zeros(d_sae, np.float32),
        "b_dec": np.zeros(d_in, np.float32),
    }
    save_file(tensors, str(directory / "sae_weights.safetensors"))
    cfg = {"architecture": "standard", "d_in": d_in, "d_sae": d_sae, "hook_name": hook, "hook_layer": 2}
    (directory / "cfg.json").write_text(json.dumps(cfg))
    return w_dec


@pytest.mark.parametrize(
    ("hook", "layer"),
    [("blocks.2.hook_resid_post", 2), ("blocks.3.hook_resid_pre", 2), ("blocks.1.hook_resid_pre", 0)],
)
def test_sae_feature_is_exactly_its_decoder_row(hook: str, layer: int, valid: Valid, tmp_path: Path) -> None:
    w_dec = write_sae(tmp_path / "sae", hook)
    out = tmp_path / "feature.parquet"
    cli("import", tmp_path / "sae", "--feature", 7, "-m", valid.model, "-o", out)
    vecs = VectorSet.read(out)
    assert vecs.behaviors() == ["feature_7"] and vecs.layers("feature_7") == [layer]
    assert np.array_equal(vecs.vector("feature_7", layer), w_dec[7])
    source = read_meta(out)["source"]
    assert source["format"] == "sae" and source["feature"] == 7 and source["hook"] == hook


def test_sae_hooks_map_to_layers() -> None:
    assert sae_layer("blocks.12.hook_resid_post") == 12
    assert sae_layer("blocks.12.hook_resid_pre") == 11
    for hook in ("blocks.0.hook_resid_pre", "blocks.3.hook_resid_mid", "blocks.3.hook_mlp_out", "hook_embed"):
        with pytest.raises(InputError, match="field 'hook_name'"):
            sae_layer(hook)


# --- bad inputs: exit 2, one line naming the file and the field, no output ---------------------------


def _gguf(path: Path, arch: str, tensors: dict[str, np.ndarray], **kv: str) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    for key, text in kv.items():
        writer.add_string(key.replace("__", "."), text)
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _ones(n: int = 32, dtype: Any = np.float32) -> np.ndarray:
    return np.ones(n, dtype)


def _npy(value: np.ndarray) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        np.save(tmp / "bad.npy", value)
        return tmp / "bad.npy"

    return make


def _sae(hook: str, edit: Callable[[Path], object] = lambda sae: None) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        write_sae(tmp / "sae", hook)
        edit(tmp / "sae")
        return tmp / "sae"

    return make


def _safetensors(value: np.ndarray) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        save_file({"layer.1": value}, str(tmp / "typed.safetensors"))
        return tmp / "typed.safetensors"

    return make


def _renamed(make: Callable[[Path], Path], name: str) -> Callable[[Path], Path]:
    """The file ``make`` makes, under another name (another suffix)."""
    return lambda tmp: make(tmp).rename(tmp / name)


def _zip(tmp: Path, name: str, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(tmp / name, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    return tmp / name


def npz_bomb(tmp: Path, shape: tuple[int, ...] = (2048, 1024)) -> Path:
    """A deflated .npz of a few kilobytes whose one member unpacks to ``shape`` float64 zeros (16 MB)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": shape})
    deflated = zipfile.ZipFile(tmp / "bomb.npz", "w", zipfile.ZIP_DEFLATED)
    with deflated as archive, archive.open("layer_1.npy", "w", force_zip64=True) as member:
        member.write(header.getvalue())
        chunk = bytes(1 << 20)
        for _ in range(int(np.prod(shape)) * 8 // len(chunk)):
            member.write(chunk)
    return tmp / "bomb.npz"


def _w_dec_bool(sae: Path) -> None:
    tensors = {"W_dec": np.ones((12, 32), bool)}
    save_file(tensors, str(sae / "sae_weights.safetensors"))


def _d_sae(count: int) -> Callable[[Path], None]:
    def edit(sae: Path) -> None:
        cfg = json.loads((sae / "cfg.json").read_text())
        (sae / "cfg.json").write_text(json.dumps({**cfg, "d_sae": count}))

    return edit


def _not_regular(name: str) -> Callable[[Path], None]:
    def edit(sae: Path) -> None:
        (sae / name).unlink()
        if name == "cfg.json":
            os.mkfifo(sae / name)  # reading it would block forever
        else:
            (sae / name).symlink_to("/dev/zero")  # reading it would never end

    return edit


OTHER_MODEL = json.dumps(
    {"name": "elsewhere", "hidden_size": 32, "num_layers": 4, "weights_hash": "sha256:0"}
)


MAKERS: dict[str, Callable[[Path], Path]] = {
    "gguf_model": lambda tmp: _gguf(
        tmp / "model.gguf", "llama", {"token_embd.weight": np.ones((4, 32), np.float32)}
    ),
    "gguf_direction_0": lambda tmp: _gguf(tmp / "d0.gguf", "controlvector", {"direction.0": _ones()}),
    "gguf_f16": lambda tmp: _gguf(tmp / "f16.gguf", "controlvector", {"direction.1": _ones(32, np.float16)}),
    "gguf_other_tensor": lambda tmp: _gguf(tmp / "named.gguf", "controlvector", {"steer.1": _ones()}),
    "gguf_2d": lambda tmp: _gguf(
        tmp / "square.gguf", "controlvector", {"direction.1": np.ones((2, 32), np.float32)}
    ),
    "gguf_width_16": lambda tmp: _gguf(tmp / "narrow.gguf", "controlvector", {"direction.1": _ones(16)}),
    "gguf_layer_9": lambda tmp: _gguf(tmp / "deep.gguf", "controlvector", {"direction.9": _ones()}),
    "gguf_nan": lambda tmp: _gguf(tmp / "nan.gguf", "controlvector", {"direction.1": _ones() * np.nan}),
    "gguf_garbage": lambda tmp: (
        (tmp / "garbage.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40) and tmp / "garbage.gguf"
    ),
    "npy_ones": _npy(_ones()),
    "npy_width_16": _npy(_ones(16)),
    "npy_inf": _npy(np.array([np.inf] + [1.0] * 31, np.float32)),
    "npy_zeros": _npy(np.zeros(32, np.float32)),
    "npy_2d": _npy(np.ones((2, 32), np.float32)),
    "npy_pickled": _npy(np.array([{"a": 1}], dtype=object)),
    "npy_3e38": _npy(np.array([3e38] + [1.0] * 31, np.float32)),
    "pt_steering": lambda tmp: (
        torch.save({"layers.1": {"steering_vector": torch.ones(32), "action": "add"}}, tmp / "steer.pt")
        or tmp / "steer.pt"
    ),
    "gguf_arabic_digit": lambda tmp: _gguf(
        tmp / "arabic.gguf", "controlvector", {"direction.\u0663": _ones()}
    ),
    "gguf_column": lambda tmp: _gguf(
        tmp / "column.gguf", "controlvector", {"direction.1": np.ones((32, 1), np.float32)}
    ),
    "gguf_other_model": lambda tmp: _gguf(
        tmp / "other.gguf", "controlvector", {"direction.1": _ones()}, caa__model=OTHER_MODEL
    ),
    "gguf_other_width": lambda tmp: _gguf(
        tmp / "wide.gguf",
        "controlvector",
        {"direction.1": _ones()},
        caa__model=json.dumps({"hidden_size": 64, "num_layers": 4}),
    ),
    "gguf_other_hint": lambda tmp: _gguf(
        tmp / "qwen.gguf", "controlvector", {"direction.1": _ones()}, controlvector__model_hint="qwen2"
    ),
    "gguf_named_npy": _renamed(
        lambda tmp: _gguf(tmp / "cv.gguf", "controlvector", {"direction.1": _ones()}), "cv.npy"
    ),
    "npz_named_npy": _renamed(
        lambda tmp: np.savez(tmp / "arrays.npz", layer_1=_ones()) or tmp / "arrays.npz", "arrays.npy"
    ),
    "npz_member_no_suffix": lambda tmp: _zip(tmp, "bare.npz", {"layer_1": _npy(_ones())(tmp).read_bytes()}),
    "npz_bomb": npz_bomb,
    "safetensors_bool": _safetensors(np.ones(32, bool)),
    "safetensors_int64": _safetensors(np.ones(32, np.int64)),
    "npz_layer_7": lambda tmp: np.savez(tmp / "deep.npz", layer_7=_ones()) or tmp / "deep.npz",
    "npz_mixed_names": lambda tmp: (
        np.savez(tmp / "mixed.npz", layer_1=_ones(), bias=_ones()) or tmp / "mixed.npz"
    ),
    "text_file": lambda tmp: (tmp / "vector.txt").write_text("1 2 3\n") and tmp / "vector.txt",
    "sae_mlp_out": _sae("blocks.2.hook_mlp_out"),
    "sae_resid_pre_0": _sae("blocks.0.hook_resid_pre"),
    "sae_resid_post": _sae("blocks.2.hook_resid_post"),
    "sae_layer_9": _sae("blocks.9.hook_resid_post"),
    "sae_w_dec_bool": _sae("blocks.2.hook_resid_post", _w_dec_bool),
    "sae_d_sae_lies": _sae("blocks.2.hook_resid_post", _d_sae(16)),
    "sae_cfg_fifo": _sae("blocks.2.hook_resid_post", _not_regular("cfg.json")),
    "sae_weights_dev_zero": _sae("blocks.2.hook_resid_post", _not_regular("sae_weights.safetensors")),
}


@dataclass(frozen=True)
class Case:
    id: str
    line: str  # the command after `caa`; {bad} is the made input, {model}, {vectors} the valid ones
    make: str | None
    problem: str  # a fragment of the one error line
    names: str | None = None  # what the line must name (default: the made input's file name)


CASES = [
    Case(
        "import-width", "import {bad} --layer 1", "npy_width_16", "width 16, but the model", "field 'array'"
    ),
    Case("import-gguf-width", "import {bad}", "gguf_width_16", "field 'direction.1': width 16"),
    Case("import-nan", "import {bad}", "gguf_nan", "field 'direction.1': has NaN or infinite values"),
    Case("import-inf", "import {bad} --layer 1", "npy_inf", "has NaN or infinite values"),
    Case("import-zeros", "import {bad} --layer 1", "npy_zeros", "is all zeros"),
    Case(
        "import-layer-out-of-range", "import {bad}", "npz_layer_7", "field 'layer_7': layer 7 is out of range"
    ),
    Case("import-gguf-layer-out-of-range", "import {bad}", "gguf_layer_9", "layer 9 is out of range"),
    Case("import-given-layer-out-of-range", "import {bad} --layer 4", "npy_ones", "layer 4 is out of range"),
    Case("import-gguf-not-control-vector", "import {bad}", "gguf_model", "not a llama.cpp control vector"),
    Case(
        "import-gguf-direction-0",
        "import {bad}",
        "gguf_direction_0",
        "field 'direction.0': llama.cpp rejects",
    ),
    Case(
        "import-gguf-f16",
        "import {bad}",
        "gguf_f16",
        "field 'direction.1': type F16, but llama.cpp reads only F32",
    ),
    Case(
        "import-gguf-tensor-name",
        "import {bad}",
        "gguf_other_tensor",
        "field 'steer.1': not a direction tensor",
    ),
    Case("import-gguf-2d", "import {bad}", "gguf_2d", "shape [32, 2]: a direction is one-dimensional"),
    Case("import-gguf-garbage", "import {bad}", "gguf_garbage", "not a readable GGUF file"),
    Case(
        "import-npy-2d",
        "import {bad} --layer 1",
        "npy_2d",
        "shape [2, 32]: a steering vector is one-dimensional",
    ),
    Case(
        "import-npy-pickled",
        "import {bad} --layer 1",
        "npy_pickled",
        "holds Python objects (a pickle), which caa never loads",
    ),
    Case("import-npy-no-layer", "import {bad}", "npy_zeros", "does not say its layer: give --layer L"),
    Case("import-npz-mixed-names", "import {bad}", "npz_mixed_names", "field 'bias': does not name a layer"),
    Case("import-unknown-file", "import {bad}", "text_file", "unknown vector file"),
    Case("import-pytorch-file", "import {bad}", "pt_steering", "holds a pickle, which caa never loads"),
    Case(
        "import-sae-feature-out-of-range",
        "import {bad} --feature 12",
        "sae_resid_post",
        "--feature 12: out of range",
    ),
    Case(
        "import-sae-hook-not-resid",
        "import {bad} --feature 1",
        "sae_mlp_out",
        "field 'hook_name': hook 'blocks.2.hook_mlp_out'",
    ),
    Case("import-sae-resid-pre-0", "import {bad} --feature 1", "sae_resid_pre_0", "is the input of block 0"),
    Case(
        "import-sae-layer-out-of-range", "import {bad} --feature 1", "sae_layer_9", "layer 9 is out of range"
    ),
    Case("import-sae-no-feature", "import {bad}", "sae_resid_post", "choose a feature with --feature K"),
    Case(
        "import-feature-not-sae",
        "import {bad} --feature 1 --layer 1",
        "npy_inf",
        "only a sparse-autoencoder",
        "--feature",
    ),
    # layer names, shapes and dtypes as llama.cpp and the formats take them
    Case("import-gguf-non-ascii-digit", "import {bad}", "gguf_arabic_digit", "not a direction tensor"),
    Case(
        "import-gguf-1-by-d", "import {bad}", "gguf_column", "shape [1, 32]: a direction is one-dimensional"
    ),
    Case(
        "import-safetensors-bool",
        "import {bad}",
        "safetensors_bool",
        "field 'layer.1': dtype BOOL: expected floating-point values",
    ),
    Case("import-safetensors-int64", "import {bad}", "safetensors_int64", "field 'layer.1': dtype I64"),
    Case("import-sae-w-dec-bool", "import {bad} --feature 1", "sae_w_dec_bool", "field 'W_dec': dtype BOOL"),
    Case(
        "import-sae-d-sae-lies",
        "import {bad} --feature 1",
        "sae_d_sae_lies",
        "field 'd_sae': 16, but",
        "cfg.json",
    ),
    # formats by their magic bytes; archives checked from their headers; regular files only
    Case("import-gguf-named-npy", "import {bad} --layer 1", "gguf_named_npy", "named .npy, but it is a GGUF"),
    Case(
        "import-npz-named-npy",
        "import {bad} --layer 1",
        "npz_named_npy",
        "named .npy, but it is a zip archive (.npz)",
    ),
    Case(
        "import-npz-member-no-suffix",
        "import {bad}",
        "npz_member_no_suffix",
        "field 'layer_1': not a .npy member",
    ),
    Case("import-npz-bomb", "import {bad}", "npz_bomb", "shape [2048, 1024]: 2097152 values"),
    Case(
        "import-sae-cfg-fifo",
        "import {bad} --feature 1",
        "sae_cfg_fifo",
        "cfg.json: is not a regular file",
    ),
    Case(
        "import-sae-weights-dev-zero",
        "import {bad} --feature 1",
        "sae_weights_dev_zero",
        "sae_weights.safetensors: is not a regular file",
    ),
    # the model a file records
    Case(
        "import-recorded-other-model",
        "import {bad}",
        "gguf_other_model",
        "field 'caa.model.weights_hash' is 'sha256:0'",
    ),
    Case(
        "import-recorded-other-width",
        "import {bad}",
        "gguf_other_width",
        "field 'caa.model.hidden_size' is 64",
    ),
    Case(
        "import-model-hint-other",
        "import {bad}",
        "gguf_other_hint",
        "field 'controlvector.model_hint' is 'qwen2'",
    ),
    # strengths the model's activations cannot hold
    Case(
        "import-entries-beyond-dtype",
        "import {bad} --layer 1",
        "npy_3e38",
        "field 'array': its largest entry is 3e+38, beyond what torch.float32 activations hold",
    ),
    Case(
        "export-gguf-layer-0",
        "export {vectors} --format gguf --behavior mood --layers 0-2",
        None,
        "rejects direction.0",
        "vectors.parquet",
    ),
    Case(
        "export-npy-two-layers",
        "export {vectors} --format npy --behavior mood",
        None,
        "--format npy holds one layer",
        "--format",
    ),
    Case(
        "export-format-unknown",
        "export {vectors} --format pt --behavior mood",
        None,
        "--format 'pt': use one of",
        "--format",
    ),
    Case(
        "export-lm-eval-suffix",
        "export {vectors} --format lm-eval --behavior mood",
        None,
        "lm-eval's steered model loads only a file ending in .pt or .pth",
        "out.npz",
    ),
    Case(
        "export-multiplier-0",
        "export {vectors} --format npz --behavior mood --multiplier 0",
        None,
        "must be a finite number other than 0",
        "--multiplier",
    ),
    Case(
        "export-multiplier-overflow",
        "export {vectors} --format npz --behavior mood --multiplier 1e300",
        None,
        "overflows float32",
        "--multiplier",
    ),
    Case(
        "export-multiplier-beyond-dtype",
        "export {vectors} --format npz --behavior mood --multiplier 1e25",
        None,
        "beyond what torch.float32 activations hold",
        "--multiplier",
    ),
    Case(
        "export-layer-absent",
        "export {vectors} --format npz --behavior mood --layers 3",
        None,
        "no vector for 'mood' at layer 3",
        "vectors.parquet",
    ),
    Case(
        "export-behavior-ambiguous",
        "export {vectors} --format npz",
        None,
        "holds several behaviors",
        "vectors.parquet",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, valid: Valid, tmp_path: Path) -> None:
    bad = MAKERS[case.make](tmp_path) if case.make else None
    out = tmp_path / ("out.parquet" if case.line.startswith("import") else "out.npz")
    args = case.line.format(bad=bad, vectors=valid.vectors).split()
    model = ["-m", str(valid.model)] if case.line.startswith("import") else []
    result = runner.invoke(app, [*args, *model, "-o", str(out)])
    named = case.names or Path(str(bad)).name
    wrong = []
    if result.exit_code != 2:
        wrong.append(f"exit code {result.exit_code}, expected 2")
    lines = result.output.strip().splitlines()
    if len(lines) != 1 or not lines[0].startswith("error: "):
        wrong.append(f"{len(lines)} lines of output, expected one error line")
    if case.problem not in result.output:
        wrong.append(f"the message lacks {case.problem!r}")
    if named not in result.output:
        wrong.append(f"the message does not name {named!r}")
    if "allow_pickle" in result.output:
        wrong.append("the message suggests unpickling")
    leftovers = sorted(p.name for p in tmp_path.iterdir() if "out." in p.name)
    if leftovers:
        wrong.append(f"left {', '.join(leftovers)}")
    assert not wrong, "; ".join(wrong) + "\n" + _describe(result)


def test_readme_lists_the_cases() -> None:
    readme = (BAD / "README.md").read_text()
    section = readme.split("## Vectors in and out", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| ([a-z0-9-]+) \| ", section, re.M)[1:]  # after the header
    assert listed == [c.id for c in CASES]


# --- real llama.cpp, where it is installed ----------------------------------------------------------


def _llama_binary() -> str | None:
    for name in (os.environ.get("CAA_LLAMA_COMPLETION"), "llama-completion", "llama-cli"):
        found = shutil.which(name) if name else None
        if found:
            return found
    return None


PROMPTS = [
    "Tell me about your favorite season.",
    "Describe a walk through a city park.",
    "What is a good way to spend a rainy Saturday?",
]
NEW_TOKENS = 8


def _llama_quantize(binary: str) -> str | None:
    beside = Path(binary).with_name("llama-quantize")
    return str(beside) if beside.is_file() else shutil.which("llama-quantize")


@pytest.mark.slow
@pytest.mark.skipif(_llama_binary() is None, reason="no llama.cpp binary (llama-completion) on the PATH")
def test_llama_cpp_agrees_with_steering_at_all_positions(tmp_path: Path) -> None:
    """A control vector exported from SmolLM2's sentiment vectors, applied by real llama.cpp to the
    embedded SmolLM2 weights, gives the greedy text of `caa generate --steer-positions all` at -4, +4.

    caa runs the de-quantised Q4_1 weights in float32; llama.cpp runs Q4_1 with its activations
    quantised to 8 bits, which moves the logits by up to a few tenths of a nat. Where llama-quantize is
    at hand, llama.cpp gets the same weights in F32 instead. The texts are compared up to the first
    token whose two likeliest choices under caa are closer than that (a near-tie either engine may
    break either way)."""
    import torch

    import caa
    from caa.core.prompts import prompt_format
    from caa.models.cache import embedded_gguf
    from caa.models.loading import load_model

    binary = _llama_binary()
    assert binary is not None
    weights, tie = str(embedded_gguf("smollm2-135m")), 0.5
    quantize = _llama_quantize(binary)
    if quantize:
        f32 = tmp_path / "smollm2-f32.gguf"
        subprocess.run(
            [quantize, "--allow-requantize", weights, str(f32), "F32"], capture_output=True, check=True
        )
        weights, tie = str(f32), 0.05
    lines = (DATA / "sentiment.jsonl").read_text().splitlines()[:12]
    (tmp_path / "sentiment.jsonl").write_text("\n".join(lines) + "\n")
    pairs, acts, vectors = tmp_path / "pairs.parquet", tmp_path / "acts.parquet", tmp_path / "vectors.parquet"
    cvec, gens = tmp_path / "happy.gguf", tmp_path / "gens.parquet"
    cli("ingest", tmp_path / "sentiment.jsonl", "-o", pairs)
    cli("extract", pairs, "--layers", "10", "--split", "train", "-o", acts)
    cli("compute-vectors", acts, "-o", vectors)
    cli("export", vectors, "--format", "gguf", "-o", cvec)
    grid = [
        "--layer",
        "10",
        "--multipliers",
        "-4,4",
        "--max-new-tokens",
        NEW_TOKENS,
        "--steer-positions",
        "all",
    ]
    cli("generate", "-v", vectors, *grid, *[a for p in PROMPTS for a in ("-p", p)], "-o", gens)
    texts = pq.read_table(gens).to_pandas().set_index(["prompt", "multiplier"]).text
    loaded, vecs = load_model("smollm2-135m"), VectorSet.read(vectors)
    tok, compared = loaded.tokenizer, 0
    for prompt in PROMPTS:
        ids = tok(prompt_format(tok).prefix(tok, prompt), add_special_tokens=False, return_tensors="pt")[
            "input_ids"
        ]
        for m in (-4.0, 4.0):
            with caa.steer(loaded, vecs, layer=10, multiplier=m, positions="all"), torch.inference_mode():
                out = loaded.model.generate(ids.to(loaded.device), max_new_tokens=NEW_TOKENS, do_sample=False)
                logp = torch.log_softmax(loaded.model(out).logits[0, ids.shape[1] - 1 : -1].float(), -1)
            new = out[0, ids.shape[1] :].tolist()
            assert tok.decode(new) == texts[(prompt, m)]  # caa generate's text
            top2 = torch.topk(logp, 2).values  # [new tokens, 2]
            clear = int(
                ((top2[:, 0] - top2[:, 1]) >= tie).long().cumprod(0).sum()
            )  # tokens before a near-tie
            args = ["-m", weights, "-p", tok.decode(ids[0]), "-n", str(NEW_TOKENS), "--temp", "0", "-s", "0"]
            args += [
                "--control-vector-scaled",
                f"{cvec}:{m:g}",
                "-no-cnv",
                "--no-display-prompt",
                "--simple-io",
            ]
            args += ["-t", "1", "--no-repack"]  # one thread: fast on a busy machine; no AMX repacking
            run = subprocess.run([binary, *args], capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, run.stderr[-2000:]
            theirs = run.stdout.replace("[end of text]", "").strip()
            assert theirs.startswith(tok.decode(new[:clear]).strip()), (
                prompt,
                m,
                theirs,
                texts[(prompt, m)],
                clear,
            )
            compared += clear
    assert compared >= 2 * len(PROMPTS)  # not a vacuous comparison
