"""caa.store.arrays: .npy and .npz files written with a note that numpy does not see, and read from
their headers first (names, dtypes, shapes, sizes), so that a small archive cannot unpack into
gigabytes and a pickle is never loaded."""

from __future__ import annotations

import io
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from caa.errors import InputError
from caa.store.arrays import MAX_VALUES, npy_note, npz_note, read_npy, read_npz, write_npy, write_npz

NOTE = {"caa.export": "caa steering vectors", "caa.model": '{"hidden_size": 32}'}


def test_notes_ride_along_and_numpy_reads_the_arrays_unchanged(tmp_path: Path) -> None:
    vector = np.linspace(-1, 1, 32, dtype=np.float32)
    write_npy(tmp_path / "v.npy", vector, NOTE)
    data = (tmp_path / "v.npy").read_bytes()
    assert (data.index(vector.tobytes()) % 64) == 0  # the data stays aligned, as numpy writes it
    assert np.array_equal(np.load(tmp_path / "v.npy", allow_pickle=False), vector)
    array, note = read_npy(tmp_path / "v.npy")
    assert np.array_equal(array, vector) and array.dtype == np.float32 and note == NOTE
    assert npy_note(data[:4096]) == NOTE
    write_npz(tmp_path / "v.npz", {"layer_1": vector, "layer_3": 2 * vector}, NOTE)
    with np.load(tmp_path / "v.npz", allow_pickle=False) as archive:
        assert archive.files == ["layer_1", "layer_3"] and np.array_equal(archive["layer_3"], 2 * vector)
    arrays, note = read_npz(tmp_path / "v.npz")
    assert list(arrays) == ["layer_1", "layer_3"] and np.array_equal(arrays["layer_1"], vector)
    assert note == NOTE and npz_note(tmp_path / "v.npz") == NOTE


def test_files_numpy_wrote_read_back_without_a_note(tmp_path: Path) -> None:
    np.save(tmp_path / "f.npy", np.arange(6.0).reshape(2, 3).T)  # Fortran order
    array, note = read_npy(tmp_path / "f.npy")
    assert np.array_equal(array, np.arange(6.0).reshape(2, 3).T) and note is None
    np.savez_compressed(tmp_path / "c.npz", a=np.ones(3), b=np.zeros(2, np.float16))
    arrays, note = read_npz(tmp_path / "c.npz")
    assert sorted(arrays) == ["a", "b"] and arrays["b"].dtype == np.float16 and note is None
    assert npz_note(tmp_path / "f.npy") is None and npy_note(b"not numpy") is None


def _bomb(path: Path, shape: tuple[int, ...]) -> Path:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": shape})
    deflated = zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED)
    with deflated as archive, archive.open("layer_1.npy", "w", force_zip64=True) as member:
        member.write(header.getvalue())
        for _ in range(int(np.prod(shape)) * 8 // (1 << 20)):
            member.write(bytes(1 << 20))
    return path


def test_an_npz_bomb_is_refused_from_its_header(tmp_path: Path) -> None:
    bomb = _bomb(tmp_path / "bomb.npz", (4096, 4096))  # 128 MB of zeros in about 130 KB
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=r"shape \[4096, 4096\]: 16777216 values") as e:
            read_npz(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.field == "layer_1" and peak < 4 << 20, peak


@pytest.mark.parametrize(
    ("members", "field", "problem"),
    [
        ({"layer_1": b"\x93NUMPY"}, "layer_1", "not a .npy member"),
        ({"d/": b""}, "d/", "not a .npy member"),
        ({"a.npy": b"\x93NUMPY\x01\x00garbage"}, "a", "not a readable .npy member"),
        ({"a.npy": b"PK"}, "a", "not a readable .npy member"),
    ],
)
def test_bad_members_are_named(tmp_path: Path, members: dict[str, bytes], field: str, problem: str) -> None:
    with zipfile.ZipFile(tmp_path / "bad.npz", "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(InputError) as e:
        read_npz(tmp_path / "bad.npz")
    assert e.value.field == field and e.value.problem.startswith(problem)


def test_sizes_must_agree_with_the_header(tmp_path: Path) -> None:
    data = io.BytesIO()
    np.save(data, np.ones(8, np.float32))
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as archive:
        archive.writestr("layer_1.npy", data.getvalue()[:-4])
    with pytest.raises(
        InputError, match=r"declares shape \[8\] of float32 \(32 bytes\), but the member holds 28"
    ):
        read_npz(tmp_path / "short.npz")
    (tmp_path / "short.npy").write_bytes(data.getvalue()[:-4])
    with pytest.raises(InputError, match=r"truncated: shape \[8\] of float32 is 32 bytes"):
        read_npy(tmp_path / "short.npy")
    np.save(tmp_path / "long.npy", np.ones(MAX_VALUES + 1, np.uint8))
    with pytest.raises(InputError, match=f"{MAX_VALUES + 1} values; caa reads arrays of at most"):
        read_npy(tmp_path / "long.npy")


def test_pickles_are_refused_and_never_suggested(tmp_path: Path) -> None:
    np.save(tmp_path / "p.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "p.npz", layer_1=np.array([{"a": 1}], dtype=object))
    for read, path in ((read_npy, tmp_path / "p.npy"), (read_npz, tmp_path / "p.npz")):
        with pytest.raises(
            InputError, match=r"holds Python objects \(a pickle\), which caa never loads"
        ) as e:
            read(path)
        assert "allow_pickle" not in str(e.value)
