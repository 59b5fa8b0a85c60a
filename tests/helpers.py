"""Shared test data and builders: rows of both pair formats, and the real commands run on them."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
runner = CliRunner()

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


def make_vectors(model: Path, tmp: Path) -> tuple[Path, Path]:
    """pairs.parquet (agree: A/B, mood: free-form; half held out) and the vectors of its training
    pairs at every layer, made by the real ingest, extract and compute-vectors."""
    from caa.cli import app

    pairs = write_pairs_file(
        tmp / "pairs.parquet", {"agree": AB_ROWS, "mood": FREEFORM_ROWS}, test_fraction=0.5
    )
    acts, vectors = tmp / "acts.parquet", tmp / "vectors.parquet"
    assert (
        runner.invoke(
            app, ["extract", str(pairs), "-m", str(model), "-o", str(acts), "--split", "train"]
        ).exit_code
        == 0
    )
    assert runner.invoke(app, ["compute-vectors", str(acts), "-o", str(vectors)]).exit_code == 0
    return pairs, vectors


# Neutral texts for the fluency cost of the tiny models' sweeps.
NEUTRAL = [
    "the weather is warm today and the park is nice",
    "we walk to work in the morning",
    "music and books help",
    "a plan for dinner",
]

# Multipliers of the tiny models' sweeps: negative, zero and a non-integer positive.
MULTIPLIERS = [-2.0, 0.0, 1.5]
