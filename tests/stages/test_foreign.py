"""caa.stages.foreign: steering vectors read from other tools' files (.npy, .npz, .safetensors, a
llama.cpp control vector, a SAELens feature), with errors naming the file and the tensor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

from caa.errors import CaaError, InputError
from caa.stages.foreign import read_foreign, sae_layer, sniff
from caa.store.files import file_sha256


def test_npy_needs_its_layer_and_keeps_its_values(tmp_path: Path) -> None:
    path = tmp_path / "v.npy"
    np.save(path, np.array([1.5, -2.0, 0.25], dtype=np.float64))
    with pytest.raises(CaaError, match="holds one vector and does not say its layer: give --layer L"):
        read_foreign(path)
    found = read_foreign(path, layer=4)
    assert list(found.vectors) == [4] and found.vectors[4].dtype == np.float32
    np.testing.assert_array_equal(found.vectors[4], [1.5, -2.0, 0.25])
    assert found.source == {"file": str(path), "sha256": file_sha256(path), "format": "npy", "feature": None}
    assert found.behavior is None and found.inputs == {"source": path}


def test_npz_and_safetensors_name_their_layers(tmp_path: Path) -> None:
    npz = tmp_path / "v.npz"
    np.savez(npz, layer_3=np.ones(4), layer_1=np.full(4, 2.0))
    found = read_foreign(npz)
    assert list(found.vectors) == [1, 3] and found.names == {1: "layer_1", 3: "layer_3"}
    assert list(read_foreign(npz, layer=3).vectors) == [3]
    with pytest.raises(CaaError, match=r"--layer 2: .* has no vector for layer 2; it has layers 1, 3"):
        read_foreign(npz, layer=2)
    st = tmp_path / "v.safetensors"
    save_file(
        {"layer.5": torch.arange(1, 4, dtype=torch.float16)}, str(st), metadata={"caa.behavior": "agree"}
    )
    got = read_foreign(st)
    assert got.behavior == "agree" and got.names == {5: "layer.5"}
    np.testing.assert_array_equal(got.vectors[5], [1.0, 2.0, 3.0])


@pytest.mark.parametrize(
    ("arrays", "field", "problem"),
    [
        ({"layer_1": np.ones(3), "bias": np.ones(3)}, "bias", "does not name a layer"),
        ({"layer_1": np.ones(3), "layer_2": np.ones(4)}, "layer_2", "width 4, but layer_1 has width 3"),
        ({"layer_1": np.zeros(3)}, "layer_1", "is all zeros"),
        ({"layer_1": np.array([1.0, np.nan])}, "layer_1", "has NaN or infinite values (in float32)"),
        ({"layer_1": np.array([1e39, 1.0])}, "layer_1", "has NaN or infinite values (in float32)"),
        ({"layer_1": np.ones((2, 3))}, "layer_1", "shape [2, 3]: a steering vector is one-dimensional"),
        ({"a": np.ones(3), "b": np.ones(3)}, "a", "none of its 2 arrays names a layer"),
    ],
)
def test_bad_arrays_name_the_file_and_the_array(
    tmp_path: Path, arrays: dict[str, np.ndarray], field: str, problem: str
) -> None:
    path = tmp_path / "v.npz"
    np.savez(path, **arrays)
    with pytest.raises(InputError) as e:
        read_foreign(path)
    assert e.value.path == str(path) and e.value.field == field
    assert e.value.problem.startswith(problem)


def test_gguf_control_vector_by_llama_cpps_rules(tmp_path: Path) -> None:
    import gguf

    def control(name: str, tensors: dict[str, np.ndarray], arch: str = "controlvector") -> Path:
        path = tmp_path / name
        writer = gguf.GGUFWriter(str(path), arch)
        writer.add_string("caa.behavior", "agree")
        for key, value in tensors.items():
            writer.add_tensor(key, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    good = control(
        "ok.gguf", {"direction.1": np.ones(4, np.float32), "direction.3": np.arange(4, dtype=np.float32)}
    )
    found = read_foreign(good)
    assert found.names == {1: "direction.1", 3: "direction.3"} and found.behavior == "agree"
    np.testing.assert_array_equal(found.vectors[3], [0, 1, 2, 3])
    with pytest.raises(InputError, match=r"llama.cpp rejects direction.0") as e:
        read_foreign(control("zero.gguf", {"direction.0": np.ones(4, np.float32)}))
    assert e.value.field == "direction.0"
    with pytest.raises(InputError, match=r"general.architecture is 'llama'"):
        read_foreign(control("model.gguf", {"direction.1": np.ones(4, np.float32)}, arch="llama"))
    with pytest.raises(InputError, match=r"but llama.cpp reads only F32 directions"):
        read_foreign(control("f16.gguf", {"direction.1": np.ones(4, np.float16)}))


def test_sae_feature_is_its_decoder_row_at_the_hooks_layer(tmp_path: Path) -> None:
    sae = tmp_path / "sae"
    sae.mkdir()
    (sae / "cfg.json").write_text(json.dumps({"hook_name": "blocks.6.hook_resid_pre", "d_in": 3}))
    w_dec = np.arange(12, dtype=np.float32).reshape(4, 3) + 1
    save_numpy({"W_dec": w_dec}, str(sae / "sae_weights.safetensors"))
    assert sniff(sae) == "sae"
    with pytest.raises(CaaError, match="choose a feature with --feature K"):
        read_foreign(sae)
    found = read_foreign(sae, feature=2)
    assert found.names == {5: "W_dec[2]"}
    np.testing.assert_array_equal(found.vectors[5], w_dec[2])
    assert found.source["feature"] == 2 and found.source["hook"] == "blocks.6.hook_resid_pre"
    with pytest.raises(CaaError, match=r"--feature 4: out of range; .* has 4 features \(0-3\)"):
        read_foreign(sae, feature=4)
    with pytest.raises(CaaError, match="is an SAE of layer 5"):
        read_foreign(sae, feature=0, layer=6)


def test_sae_layer_and_sniff(tmp_path: Path) -> None:
    assert sae_layer("blocks.12.hook_resid_post") == 12
    assert sae_layer("blocks.12.hook_resid_pre") == 11
    for hook in ("blocks.0.hook_resid_pre", "blocks.3.hook_mlp_out", "resid"):
        with pytest.raises(InputError) as e:
            sae_layer(hook, "cfg.json")
        assert e.value.field == "hook_name" and f"hook '{hook}'" in e.value.problem
    unnamed = tmp_path / "vector"
    np.save(tmp_path / "v.npy", np.ones(2))
    unnamed.write_bytes((tmp_path / "v.npy").read_bytes())
    assert sniff(unnamed) == "npy"  # by its first bytes
    unnamed.write_bytes(b"GGUF\x03\x00")
    assert sniff(unnamed) == "gguf"
    unnamed.write_bytes(b"plain text file")
    with pytest.raises(InputError, match="unknown vector file"):
        sniff(unnamed)
    with pytest.raises(CaaError, match="--feature 1: only a sparse-autoencoder directory has features"):
        read_foreign(tmp_path / "v.npy", feature=1)


def _control(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "controlvector")
    for key, value in tensors.items():
        writer.add_tensor(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_layer_names_take_ascii_digits_only(tmp_path: Path) -> None:
    """Python's \\d and int() read any script's digits; llama.cpp and caa's own names are ASCII."""
    for digit in ("\u0663", "\uff13", "\u09e9"):  # Arabic-Indic, fullwidth, Bengali three
        with pytest.raises(InputError, match="not a direction tensor") as e:
            read_foreign(_control(tmp_path / "v.gguf", {f"direction.{digit}": np.ones(4, np.float32)}))
        assert e.value.field == f"direction.{digit}"
        np.savez(tmp_path / "v.npz", layer_1=np.ones(4), **{f"layer_{digit}": np.ones(4)})
        with pytest.raises(InputError, match="does not name a layer") as e:
            read_foreign(tmp_path / "v.npz")
        assert e.value.field == f"layer_{digit}"


@pytest.mark.parametrize("shape", [(1, 4), (4, 1), (1, 1, 4)])
def test_gguf_directions_have_exactly_one_dimension(tmp_path: Path, shape: tuple[int, ...]) -> None:
    path = _control(tmp_path / "v.gguf", {"direction.1": np.ones(shape, np.float32)})
    with pytest.raises(InputError, match=r"shape \[.*\]: a direction is one-dimensional"):
        read_foreign(path)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.int8, torch.uint8])
def test_safetensors_and_sae_need_floating_point(tmp_path: Path, dtype: torch.dtype) -> None:
    save_file({"layer.1": torch.ones(4, dtype=dtype)}, str(tmp_path / "v.safetensors"))
    with pytest.raises(InputError, match="expected floating-point values") as e:
        read_foreign(tmp_path / "v.safetensors")
    assert e.value.field == "layer.1"
    sae = tmp_path / "sae"
    sae.mkdir()
    (sae / "cfg.json").write_text(json.dumps({"hook_name": "blocks.2.hook_resid_post", "d_in": 4}))
    save_file({"W_dec": torch.ones(3, 4, dtype=dtype)}, str(sae / "sae_weights.safetensors"))
    with pytest.raises(InputError, match="expected floating-point values") as e:
        read_foreign(sae, feature=1)
    assert e.value.field == "W_dec"
    for array in (np.ones(4, bool), np.arange(1, 5)):
        np.save(tmp_path / "v.npy", array)
        with pytest.raises(InputError, match="expected floating-point values"):
            read_foreign(tmp_path / "v.npy", layer=1)


def test_sae_d_sae_must_be_w_decs_rows(tmp_path: Path) -> None:
    sae = tmp_path / "sae"
    sae.mkdir()
    save_numpy({"W_dec": np.ones((3, 4), np.float32)}, str(sae / "sae_weights.safetensors"))
    for d_sae, problem in (
        (5, "5, but"),
        (True, "expected a positive integer"),
        ("3", "expected a positive"),
    ):
        cfg = {"hook_name": "blocks.2.hook_resid_post", "d_in": 4, "d_sae": d_sae}
        (sae / "cfg.json").write_text(json.dumps(cfg))
        with pytest.raises(InputError, match=problem) as e:
            read_foreign(sae, feature=1)
        assert e.value.field == "d_sae" and e.value.path == str(sae / "cfg.json")
    (sae / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 3}))
    assert list(read_foreign(sae, feature=1).vectors) == [2]


def test_formats_are_told_by_their_magic_bytes(tmp_path: Path) -> None:
    """Whatever the suffix says; a suffix that names another format than the content is refused,
    naming both, and no message suggests unpickling."""
    control = _control(tmp_path / "c.gguf", {"direction.1": np.ones(4, np.float32)})
    np.save(tmp_path / "a.npy", np.ones(4))
    np.savez(tmp_path / "z.npz", layer_1=np.ones(4))
    save_numpy({"layer.1": np.ones(4, np.float32)}, str(tmp_path / "s.safetensors"))
    made = {"gguf": control, "npy": tmp_path / "a.npy", "npz": tmp_path / "z.npz"}
    made["safetensors"] = tmp_path / "s.safetensors"
    for fmt, path in made.items():
        assert sniff(path) == fmt
        bare = tmp_path / f"bare-{fmt}"
        bare.write_bytes(path.read_bytes())
        assert sniff(bare) == fmt  # no suffix: the content alone
        for other in {"gguf", "npy", "npz", "safetensors"} - {fmt}:
            renamed = tmp_path / f"renamed-{fmt}.{other}"
            renamed.write_bytes(path.read_bytes())
            with pytest.raises(InputError, match=rf"named \.{other}, but it is ") as e:
                read_foreign(renamed, layer=1)
            assert "allow_pickle" not in str(e.value)
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(InputError, match=r"named \.npy, but it is not a NumPy .npy array"):
        sniff(tmp_path / "empty.npy")


def test_non_regular_files_are_named_as_such(tmp_path: Path) -> None:
    import os

    os.mkfifo(tmp_path / "fifo.npy")
    (tmp_path / "zero.gguf").symlink_to("/dev/zero")
    for path in (tmp_path / "fifo.npy", tmp_path / "zero.gguf"):
        with pytest.raises(InputError, match="is not a regular file"):
            read_foreign(path, layer=1)
    with pytest.raises(InputError, match="file not found"):
        read_foreign(tmp_path / "absent.npy", layer=1)
