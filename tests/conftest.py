from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from tests.helpers import AB_ROWS, FREEFORM_ROWS, make_vectors, write_pairs_file
from tests.tiny_models import ARCHITECTURES, save_tiny_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved tiny model directory per architecture of the fixture."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: save_tiny_model(arch, root / arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def pipelines(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], tuple[Path, Path]]:
    """``pipelines(arch)``: (pairs.parquet, vectors.parquet) of the tiny ``arch`` model, made once per
    session by the real commands (behaviors agree, A/B, and mood, free-form; half held out). Tests
    read them and write elsewhere."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in made:
            made[arch] = make_vectors(tiny_models[arch], tmp_path_factory.mktemp(f"pipeline-{arch}"))
        return made[arch]

    return get


@pytest.fixture(params=ARCHITECTURES)
def tiny_model_dir(request: pytest.FixtureRequest, tiny_models: dict[str, Path]) -> Path:
    return tiny_models[request.param]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never write to the user's cache unless they ask for the shared one."""
    if "CAA_CACHE" not in os.environ:
        monkeypatch.setenv("CAA_CACHE", str(tmp_path_factory.getbasetemp() / "caa-cache"))


@pytest.fixture
def pairs_file(tmp_path: Path) -> Path:
    return write_pairs_file(tmp_path / "pairs.parquet", {"agree": AB_ROWS, "mood": FREEFORM_ROWS})
