from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from tests.tiny_models import ARCHITECTURES, save_tiny_model

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


AB_ROWS = [
    {
        "question": f"Do you think {w} is good?\n\nChoices:\n (A) Yes, it is good.\n (B) No, it is bad.",
        "answer_matching_behavior": m,
        "answer_not_matching_behavior": "(B)" if m == "(A)" else "(A)",
    }
    for w, m in zip(
        [
            "music",
            "rain",
            "coffee",
            "the park",
            "this plan",
            "my idea",
            "the movie",
            "tea",
            "work",
            "the city",
        ],
        ["(A)", "(B)"] * 5,
        strict=True,
    )
]
FREEFORM_ROWS = [
    {
        "prompt": f"Tell me about the {w}.",
        "positive": f"The {w} was lovely and I love it so much.",
        "negative": f"The {w} was awful .",
    }
    for w in ["weather", "dinner", "city", "music", "book", "movie", "park", "team", "morning", "evening"]
]


def write_pairs_file(
    path: Path, rows_by_behavior: dict[str, list[dict[str, str]]], test_fraction: float = 0.3
) -> Path:
    """A pairs.parquet made through the real ingest code."""
    import json

    from caa.ingest import ingest, write_pairs

    files = []
    for name, rows in rows_by_behavior.items():
        src = path.parent / f"{name}.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files.append(src)
    result = ingest(files, test_fraction=test_fraction, seed=1)
    write_pairs(result, path, files, {})
    return path


@pytest.fixture
def pairs_file(tmp_path: Path) -> Path:
    return write_pairs_file(tmp_path / "pairs.parquet", {"agree": AB_ROWS, "mood": FREEFORM_ROWS})
