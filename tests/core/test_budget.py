"""Batch sizes from a memory budget (caa.budget): they set the batches, never the results."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from caa.core.budget import planner_for
from caa.models.loading import load_model
from caa.stages.options import SweepOptions
from caa.stages.sweep import run_sweep
from caa.stages.vectors import VectorSet
from tests.helpers import MULTIPLIERS, NEUTRAL, held_out


def test_memory_budget_sets_batches_not_results(
    pipelines: Callable[[str], tuple[Path, Path]], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    pairs_path, vectors_path = pipelines("llama")
    loaded = load_model(str(tiny_models["llama"]), device="cpu")
    test = held_out(pairs_path)
    planners = {"roomy": planner_for(loaded, budget=2**30), "tight": planner_for(loaded, budget=1)}
    lengths = [len(t) for t in NEUTRAL]
    assert len(planners["roomy"].batches(lengths, 3, keep_all=True)) == 1
    assert len(planners["tight"].batches(lengths, 3, keep_all=True)) == len(NEUTRAL)  # one text each
    tables = {
        name: run_sweep(
            loaded,
            VectorSet.read(vectors_path),
            test,
            NEUTRAL,
            SweepOptions(layers=(1, 2), multipliers=MULTIPLIERS),
            behaviors=["agree", "mood"],
            planner=planner,
        ).table
        for name, planner in planners.items()
    }
    cols = ["score_mean", "score_sem", "kl_mean", "perplexity"]
    np.testing.assert_allclose(tables["tight"][cols], tables["roomy"][cols], atol=1e-5, rtol=1e-5)
