"""caa.files: the one SHA-256 of files and the all-or-nothing writers every module uses."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from caa.store.files import SpecialFileError, atomic_directory, file_sha256, write_atomic


def test_file_sha256_of_one_file_and_of_several_concatenated(tmp_path: Path) -> None:
    parts = [b"GGUF" + bytes(range(256)) * 50_000, b"", b"tail"]  # the first is several blocks long
    paths = []
    for i, data in enumerate(parts):
        paths.append(tmp_path / f"part{i}")
        paths[-1].write_bytes(data)
    assert file_sha256(paths[0]) == hashlib.sha256(parts[0]).hexdigest()
    copy = io.BytesIO()
    assert file_sha256(*paths, copy_to=copy) == hashlib.sha256(b"".join(parts)).hexdigest()
    assert copy.getvalue() == b"".join(parts)


def test_file_sha256_reads_no_special_file(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # opening it to read would block without O_NONBLOCK; reading it never ends
    with pytest.raises(SpecialFileError):
        file_sha256(fifo)
    with pytest.raises(SpecialFileError):
        file_sha256(tmp_path)
    with pytest.raises(FileNotFoundError):
        file_sha256(tmp_path / "missing")


def test_write_atomic_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "memo.txt"
    write_atomic(path, b"first")
    write_atomic(path, b"second")
    assert path.read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["memo.txt"]


def test_atomic_directory_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("killed while writing")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.") and tmp.name.endswith(".tmp")
        (tmp / "config.json").write_text('{"a": 1}')
    assert (target / "config.json").read_text() == '{"a": 1}'
    with atomic_directory(target) as tmp:  # another writer finished first: its directory is kept
        (tmp / "config.json").write_text('{"a": 2}')
    assert (target / "config.json").read_text() == '{"a": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
