from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from tests.tiny_models import ARCHITECTURES, save_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved tiny model directory per architecture of the fixture."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: save_tiny_model(arch, root / arch) for arch in ARCHITECTURES}


@pytest.fixture(params=ARCHITECTURES)
def tiny_model_dir(request: pytest.FixtureRequest, tiny_models: dict[str, Path]) -> Path:
    return tiny_models[request.param]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never write to the user's cache unless they ask for the shared one."""
    if "CAA_CACHE" not in os.environ:
        monkeypatch.setenv("CAA_CACHE", str(tmp_path_factory.getbasetemp() / "caa-cache"))
