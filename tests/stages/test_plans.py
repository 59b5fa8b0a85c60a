"""caa.stages.plans: what an extract, sweep or generate run refuses and reads before its model loads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from caa.errors import CaaError
from caa.stages.plans import check_model_options, plan_extract, plan_generate, plan_sweep, require
from caa.store.checkpoint import partial_dir
from tests.helpers import NEUTRAL


def test_require_raises_the_message_only_when_not_ok() -> None:
    require(True, "never")
    with pytest.raises(CaaError, match=r"^--thing 3: bad$"):
        require(False, "--thing 3: bad")


def test_check_model_options_checks_layers_against_the_config(tiny_models: dict[str, Path]) -> None:
    model = str(tiny_models["llama"])  # 4 blocks
    assert check_model_options(model, "auto", "1-2") == [1, 2]
    assert check_model_options(model, "on", "all") == [0, 1, 2, 3]
    assert check_model_options(model, "off", None) is None
    with pytest.raises(CaaError, match=r"--layers '2-4': layer 4 is out of range; valid layers are 0-3"):
        check_model_options(model, "auto", "2-4")
    assert check_model_options("org/not-cached", "auto", "40") is None  # layer count unknown: syntax only
    with pytest.raises(CaaError, match="'x' is not a layer"):
        check_model_options("org/not-cached", "auto", "x")
    with pytest.raises(CaaError, match="--chat-template 'maybe': use one of"):
        check_model_options(model, "maybe", None)
    with pytest.raises(CaaError, match="--position 'first': use one of"):
        check_model_options(model, "auto", None, position="first")


def test_plan_extract_reads_the_chosen_split_and_refuses_an_interrupted_run(
    pairs_file: Path, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    model = str(tiny_models["llama"])
    out = tmp_path / "acts.parquet"
    frame = plan_extract(pairs_file, out, model=model, layers="all", split="train", behaviors=["mood"])
    assert len(frame) and set(frame.split) == {"train"} and set(frame.behavior) == {"mood"}
    assert len(plan_extract(pairs_file, out, model=model, layers="0")) == 20  # all 20 pairs
    with pytest.raises(CaaError, match="--batch-size 0: must be at least 1"):
        plan_extract(pairs_file, out, model=model, layers="all", batch_size=0)
    with pytest.raises(CaaError, match="--layers '9'"):
        plan_extract(pairs_file, out, model=model, layers="9")
    partial_dir(out).mkdir()
    with pytest.raises(CaaError, match="holds an interrupted run: add --resume"):
        plan_extract(pairs_file, out, model=model, layers="all")
    plan_extract(pairs_file, out, model=model, layers="all", resume=True)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_kl": -1.0}, "--max-kl -1.0: must be 0 or above"),
        ({"max_anti": 1.5}, "--max-anti 1.5: must be between 0 and 1"),
        ({"seed": -1}, "--seed -1: must be between 0 and 2**32 - 1"),
        ({"neutral_count": 0}, "--neutral-count 0: must be at least 1"),
        ({"max_pairs": 0}, "--max-pairs 0: must be at least 1"),
        ({"max_memory": "lots"}, "--max-memory 'lots': use a size such as 4GiB"),
        ({"steer_positions": "middle"}, "--steer-positions 'middle': use one of"),
        ({"multipliers": "1,x"}, "--multipliers '1,x': 'x' is not a number"),
    ],
)
def test_plan_sweep_refuses_bad_options_before_reading_any_file(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    missing = tmp_path / "missing.parquet"  # never opened: the options are refused first
    with pytest.raises(CaaError) as e:
        plan_sweep(missing, missing, model="m", **options)
    assert str(e.value).startswith(message)


def test_plan_sweep_reads_held_out_pairs_and_neutral_texts(
    pipelines: Callable[[str], tuple[Path, Path]], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    pairs, vectors = pipelines("llama")
    neutral = tmp_path / "neutral.txt"
    neutral.write_text("\n".join(NEUTRAL))
    plan = plan_sweep(
        vectors, pairs, model=str(tiny_models["llama"]), multipliers="2,-1", neutral=neutral, neutral_count=3,
        max_pairs=2, layers="1,2", steer_positions="all",
    )  # fmt: skip
    assert plan.behaviors == ["agree", "mood"]
    assert plan.multipliers == [-1.0, 0.0, 2.0]
    assert plan.neutral == NEUTRAL[:3] and plan.neutral_path == neutral
    assert set(plan.test.split) == {"test"} and plan.test.groupby("behavior").size().tolist() == [2, 2]
    # agree is A/B (one text a pair), mood free-form (two); the neutral texts at each of 4 layers
    assert plan.work(None) == (2 * 1 + 3) * 4 + (2 * 2 + 3) * 4
    assert plan.work([1]) == (2 * 1 + 3) + (2 * 2 + 3)
    args = plan.arguments()
    assert args["multipliers"] == plan.multipliers and args["neutral_source"] == str(neutral)
    with pytest.raises(CaaError, match="--layers '7'"):
        plan_sweep(vectors, pairs, model=str(tiny_models["llama"]), layers="7", neutral=neutral)


def test_plan_generate_checks_sampling_and_picks_the_behavior(
    pipelines: Callable[[str], tuple[Path, Path]], tiny_models: dict[str, Path]
) -> None:
    _, vectors = pipelines("llama")
    model = str(tiny_models["llama"])
    plan = plan_generate(
        vectors, model=model, layer=1, behavior="mood", multipliers="1,-1", prompts=["Hi.", "Yo."]
    )
    assert (plan.behavior, plan.prompts, plan.multipliers) == ("mood", ["Hi.", "Yo."], [-1.0, 1.0])
    assert len(plan.labels) == 2
    with pytest.raises(CaaError, match=r"--top-p 0.0: must be above 0"):
        plan_generate(vectors, model=model, layer=1, top_p=0.0, prompts=["Hi."])
    with pytest.raises(CaaError, match="--max-new-tokens 0"):
        plan_generate(vectors, model=model, layer=1, max_new_tokens=0, prompts=["Hi."])
    with pytest.raises(CaaError, match="no behavior 'nope'; it has agree, mood"):
        plan_generate(vectors, model=model, layer=1, behavior="nope", prompts=["Hi."])
    with pytest.raises(CaaError, match=r"holds several behaviors .* pick one"):
        plan_generate(vectors, model=model, layer=1, prompts=["Hi."])
    with pytest.raises(CaaError, match="no vector for 'mood' at layer 9"):
        plan_generate(vectors, model=model, layer=9, behavior="mood", prompts=["Hi."])
