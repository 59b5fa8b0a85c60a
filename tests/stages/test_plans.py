"""caa.stages.plans: what an extract, sweep or generate run refuses and reads before its model loads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from caa.errors import CaaError, OptionError
from caa.stages.options import ExtractOptions, GenerateOptions, SweepOptions
from caa.stages.plans import check_model_layers, plan_extract, plan_generate, plan_sweep
from caa.store.checkpoint import partial_dir
from tests.helpers import NEUTRAL


def test_check_model_layers_checks_layers_against_the_config(tiny_models: dict[str, Path]) -> None:
    model = str(tiny_models["llama"])  # 4 blocks
    check_model_layers(model, [1, 2])
    check_model_layers(model, None)
    with pytest.raises(
        OptionError, match=r"layers=\[2, 3, 4\]: layer 4 is out of range; valid layers are 0-3"
    ):
        check_model_layers(model, [2, 3, 4])
    check_model_layers("org/not-cached", [40])  # the layer count is unknown until the model loads


def test_plan_extract_reads_the_chosen_split_and_refuses_an_interrupted_run(
    pairs_file: Path, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    model = str(tiny_models["llama"])
    out = tmp_path / "acts.parquet"
    frame = plan_extract(pairs_file, out, model, ExtractOptions(split="train", behaviors=("mood",)))
    assert len(frame) and set(frame.split) == {"train"} and set(frame.behavior) == {"mood"}
    assert len(plan_extract(pairs_file, out, model, ExtractOptions(layers=(0,)))) == 20  # all 20 pairs
    with pytest.raises(OptionError, match="layer 9 is out of range"):
        plan_extract(pairs_file, out, model, ExtractOptions(layers=(9,)))
    partial_dir(out).mkdir()  # no finished piece in it: no run to resume, and no obstacle
    assert len(plan_extract(pairs_file, out, model, ExtractOptions())) == 20
    (partial_dir(out) / "rank0").mkdir()
    (partial_dir(out) / "rank0" / "items-000000000-000000004.parquet").write_bytes(b"a finished piece")
    with pytest.raises(CaaError, match="holds an interrupted run: add --resume"):
        plan_extract(pairs_file, out, model, ExtractOptions())
    plan_extract(pairs_file, out, model, ExtractOptions(), resume=True)


def test_plan_sweep_reads_held_out_pairs_and_neutral_texts(
    pipelines: Callable[[str], tuple[Path, Path]], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    pairs, vectors = pipelines("llama")
    neutral = tmp_path / "neutral.txt"
    neutral.write_text("\n".join(NEUTRAL))
    model = str(tiny_models["llama"])
    options = SweepOptions(neutral_count=3, max_pairs=2, layers=(1, 2), steer_positions="all")
    plan = plan_sweep(vectors, pairs, model, options, neutral)
    assert plan.behaviors == ["agree", "mood"]
    assert plan.neutral == NEUTRAL[:3] and plan.neutral_path == neutral
    assert set(plan.test.split) == {"test"} and plan.test.groupby("behavior").size().tolist() == [2, 2]
    # agree is A/B (one text a pair), mood free-form (two); the neutral texts at each of 4 layers
    assert plan.work(None) == (2 * 1 + 3) * 4 + (2 * 2 + 3) * 4
    assert plan.work([1]) == (2 * 1 + 3) + (2 * 2 + 3)
    with pytest.raises(OptionError, match="layer 7 is out of range"):
        plan_sweep(vectors, pairs, model, SweepOptions(layers=(7,)), neutral)
    with pytest.raises(CaaError, match="no behavior"):
        plan_sweep(vectors, pairs, model, SweepOptions(behaviors=("nope",)), neutral)


def test_plan_generate_reads_the_prompts_and_picks_the_behavior(
    pipelines: Callable[[str], tuple[Path, Path]], tiny_models: dict[str, Path]
) -> None:
    _, vectors = pipelines("llama")
    model = str(tiny_models["llama"])
    plan = plan_generate(vectors, model, GenerateOptions(layer=1, behavior="mood"), ["Hi.", "Yo."])
    assert (plan.behavior, plan.prompts) == ("mood", ["Hi.", "Yo."])
    assert len(plan.labels) == 2
    with pytest.raises(CaaError, match="no behavior 'nope'; it has agree, mood"):
        plan_generate(vectors, model, GenerateOptions(layer=1, behavior="nope"), ["Hi."])
    with pytest.raises(CaaError, match=r"holds several behaviors .* pick one"):
        plan_generate(vectors, model, GenerateOptions(layer=1), ["Hi."])
    with pytest.raises(CaaError, match="no vector for 'mood' at layer 9"):
        plan_generate(vectors, model, GenerateOptions(layer=9, behavior="mood"), ["Hi."])
