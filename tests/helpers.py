"""Shared test data and builders: rows of both pair formats, and the real commands run on them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from caa.models.loading import LoadedModel

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
runner = CliRunner()


def launch(args: list[str], processes: int, **popen: Any) -> subprocess.CompletedProcess[str]:
    """``python -m caa ARGS`` under torchrun with ``processes`` real CPU processes (gloo), as README's
    "Scaling out" launches them; ``--standalone`` picks a free port, so tests can run side by side.
    (``accelerate launch --cpu --num_processes 2`` starts one process: accelerate reports 1.)"""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    torchrun += ["--nproc_per_node", str(processes)]
    return subprocess.run(
        [*torchrun, "-m", "caa", *args], env=env, capture_output=True, text=True, timeout=600, **popen
    )


def ranks_reported(proc: subprocess.CompletedProcess[str], processes: int) -> None:
    """Assert that ``processes`` ranks ran: the main process prints the ranks that answered it."""
    ranks = ", ".join(map(str, range(processes)))
    assert f"{processes} processes share the work: ranks {ranks}" in proc.stderr, proc.stderr[-3000:]


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

    from caa.stages.ingest import ingest, pair_set

    files = []
    for name, rows in rows_by_behavior.items():
        src = path.parent / f"{name}.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files.append(src)
    result = ingest(files, test_fraction=test_fraction, seed=1)
    pair_set(result, files, {}).save(path)
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


def held_out(pairs: Path) -> pd.DataFrame:
    """The test split of a pairs file (what a sweep scores), indexed from 0."""
    from caa.stages.ingest import read_pairs

    frame = read_pairs(pairs)[0]
    return frame[frame.split == "test"].reset_index(drop=True)


def inject_oom(monkeypatch: pytest.MonkeyPatch, loaded: LoadedModel, max_rows: int) -> list[int]:
    """Make the model's base forward pass (what extract, the sweep engines and generation all run)
    raise CUDA's out-of-memory error on batches of more than ``max_rows`` rows; returns the list
    that records every batch size it is called with."""
    base = loaded.model.base_model  # under the LM head's forward too
    forward = base.forward
    sizes: list[int] = []

    def limited(*args: Any, **kwargs: Any) -> Any:
        rows = int(kwargs["input_ids"].shape[0])
        sizes.append(rows)
        if rows > max_rows:
            raise torch.cuda.OutOfMemoryError(f"injected: {rows} rows > {max_rows}")
        return forward(*args, **kwargs)

    monkeypatch.setattr(base, "forward", limited)
    return sizes


# Neutral texts for the fluency cost of the tiny models' sweeps.
NEUTRAL = [
    "the weather is warm today and the park is nice",
    "we walk to work in the morning",
    "music and books help",
    "a plan for dinner",
]

# Multipliers of the tiny models' sweeps: negative, zero and a non-integer positive.
MULTIPLIERS = [-2.0, 0.0, 1.5]


LM_EVAL = "lm-eval[hf]==0.4.13"  # the release whose steered model caa's lm-eval export was checked against


def require_lm_eval() -> Any:
    """The ``lm_eval`` package: a test that needs it is skipped where it is not installed, except in
    CI (``CI`` set, as CI services set it), where that is a failure: ``make install`` installs it
    (the dev extra), so a CI run without it would pass the comparison by skipping it."""
    try:
        import lm_eval
        import lm_eval.models.hf_steered  # the model the export is for
    except ImportError as e:
        message = f"lm-eval is not importable ({e}): pip install '{LM_EVAL}', or make install"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"{message}; CI must run the lm-eval tests, not skip them")
        pytest.skip(message)
    return lm_eval
