"""The Python API refuses what the command line refuses, with the same messages: a parameter is named
as a Python caller passes it (``layer=-1``) where the command line shows its flag (``--layer -1``).
Each refusal comes before any forward pass."""

from __future__ import annotations

import dataclasses
import math
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import caa
from caa.cli import app

runner = CliRunner()
Pipeline = Callable[[str], tuple[Path, Path]]


@dataclasses.dataclass(frozen=True)
class Setup:
    model: caa.LoadedModel  # tiny llama: 4 blocks, hidden size 32
    model_dir: Path
    pairs: caa.PairSet  # agree (A/B) and mood (free-form)
    vectors: caa.VectorSet  # both behaviors, every layer
    vectors_path: Path
    other_vectors: caa.VectorSet  # the same pairs on the tiny qwen2 model: same sizes, other weights


@pytest.fixture(scope="module")
def setup(tiny_models: dict[str, Path], pipelines: Pipeline) -> Setup:
    pairs_path, vectors_path = pipelines("llama")
    return Setup(
        model=caa.load_model(str(tiny_models["llama"]), device="cpu"),
        model_dir=tiny_models["llama"],
        pairs=caa.PairSet.read(pairs_path),
        vectors=caa.VectorSet.read(vectors_path),
        vectors_path=vectors_path,
        other_vectors=caa.VectorSet.read(pipelines("qwen2")[1]),
    )


@pytest.fixture
def no_forward(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any forward pass of the model fails the test: a refusal must come first."""

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model ran before the input was refused")

    monkeypatch.setattr(setup.model.model.base_model, "forward", forbidden)
    yield


def _cli_error(line: str, **subs: Any) -> str:
    """The one error line of a command that must fail with exit code 2."""
    result = runner.invoke(app, [part.format(**subs) for part in shlex.split(line)])
    assert result.exit_code == 2, result.output
    return result.output


def _generate(
    setup: Setup, vectors: caa.VectorSet | None = None, prompts: Any = ("hi",), **options: Any
) -> Any:
    opts = caa.GenerateOptions(**{"layer": 1, "behavior": "mood", "max_new_tokens": 1, **options})
    return caa.generate(setup.model, vectors or setup.vectors, list(prompts), opts)


# --- sweep ----------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_forward")
def test_sweep_refuses_a_lone_neutral_string(setup: Setup) -> None:
    """One string would be taken as a list of its characters: 16 one-letter neutral texts."""
    options = caa.SweepOptions(behaviors=("mood",), multipliers=(1.0,), layers=(1,), max_pairs=1)
    with pytest.raises(caa.OptionError, match=r"neutral='Tell me a story\.': must be a list of texts") as e:
        caa.sweep(setup.model, setup.vectors, setup.pairs, options, neutral="Tell me a story.")  # type: ignore[arg-type]
    assert e.value.option == "neutral"


@pytest.mark.parametrize("kind", [caa.SweepOptions, caa.ExtractOptions])
def test_behaviors_must_be_a_list_not_one_string(kind: type) -> None:
    with pytest.raises(caa.OptionError, match="behaviors='sent': must be a list of names, not one string"):
        kind(behaviors="sent")
    assert kind(behaviors=["sent"]).behaviors == ("sent",)


@pytest.mark.usefixtures("no_forward")
def test_sweep_refuses_vectors_of_another_width(setup: Setup) -> None:
    narrow = dataclasses.replace(setup.vectors, values=setup.vectors.values[:, :16].copy())
    options = caa.SweepOptions(behaviors=("mood",), multipliers=(1.0,), layers=(1,), max_pairs=1)
    with pytest.raises(
        caa.MismatchError, match="field 'vector' has width 16 but the model's hidden_size is 32"
    ):
        caa.sweep(setup.model, narrow, setup.pairs, options, neutral=["a neutral text"])


# --- multipliers and layers: the options, as the command line's flags -----------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_multipliers_must_be_finite(setup: Setup, value: float) -> None:
    shown = f"{value!r}"  # nan, inf, -inf
    for kind, extra in ((caa.SweepOptions, {}), (caa.GenerateOptions, {"layer": 1})):
        with pytest.raises(caa.OptionError, match=f"multipliers=.*: {shown} is not finite") as e:
            kind(multipliers=[1.0, value], **extra)
        assert e.value.option == "multipliers"
    cli = _cli_error(
        "generate -v {v} -m {m} --layer 1 --behavior mood -p hi --multipliers 1,{x}",
        v=setup.vectors_path, m=setup.model_dir, x=shown,
    )  # fmt: skip
    assert "is not finite" in cli and "--multipliers" in cli


@pytest.mark.usefixtures("no_forward")
def test_generate_refuses_empty_multipliers_and_layers_out_of_range(setup: Setup) -> None:
    with pytest.raises(caa.OptionError, match=r"multipliers=\[\]: must name at least one multiplier"):
        caa.GenerateOptions(layer=2, multipliers=[])
    with pytest.raises(caa.OptionError, match="layer=-1: must be at least 0") as e:
        caa.GenerateOptions(layer=-1)
    cli = _cli_error(
        "generate -v {v} -m {m} --layer=-1 --behavior mood -p hi", v=setup.vectors_path, m=setup.model_dir
    )
    assert f"--layer -1: {e.value.problem}" in cli
    with pytest.raises(
        caa.CaaError, match="no vector for 'mood' at layer 99; it has layers 0, 1, 2, 3"
    ) as e2:
        _generate(setup, layer=99)
    cli = _cli_error(
        "generate -v {v} -m {m} --layer 99 --behavior mood -p hi", v=setup.vectors_path, m=setup.model_dir
    )
    assert str(e2.value) in cli


@pytest.mark.usefixtures("no_forward")
def test_extract_layers_are_whole_numbers_in_the_models_range(setup: Setup, tmp_path: Path) -> None:
    for layers, problem in (
        ([3.7], "3.7 is not a layer"),
        ([-1], "-1 is not a layer"),
        ([True], "True is not"),
    ):
        with pytest.raises(caa.OptionError, match=problem) as e:
            caa.ExtractOptions(layers=layers)
        assert e.value.option == "layers"
    with pytest.raises(caa.OptionError, match="layer 99 is out of range; valid layers are 0-3") as e:
        caa.extract(setup.model, setup.pairs, caa.ExtractOptions(layers=[99]))
    out = tmp_path / "acts.parquet"
    cli = _cli_error("extract {p} -m {m} --layers 99 -o {o}", p=setup.pairs.path, m=setup.model_dir, o=out)
    assert e.value.problem in cli


# --- generate -----------------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_forward")
@pytest.mark.parametrize("prompt", [None, 3, b"hi", ["hi"]])
def test_generate_refuses_a_prompt_that_is_not_text(setup: Setup, prompt: Any) -> None:
    with pytest.raises(caa.CaaError, match=f"prompt 2: a prompt must be text, not {type(prompt).__name__}"):
        _generate(setup, prompts=["hi", prompt])


@pytest.mark.usefixtures("no_forward")
def test_generate_refuses_vectors_of_another_width_or_model(setup: Setup) -> None:
    narrow = dataclasses.replace(setup.vectors, values=setup.vectors.values[:, :16].copy())
    with pytest.raises(
        caa.MismatchError, match="field 'vector' has width 16 but the model's hidden_size is 32"
    ):
        _generate(setup, narrow)
    with pytest.raises(caa.MismatchError, match="these vectors were made with another model"):
        _generate(setup, setup.other_vectors)


# --- steer ----------------------------------------------------------------------------------------------


def _steer(setup: Setup, vector: Any, **kwargs: Any) -> None:
    with caa.steer(setup.model, vector, **{"layer": 1, "behavior": "mood", **kwargs}):
        raise AssertionError("steering started")


@pytest.mark.usefixtures("no_forward")
@pytest.mark.parametrize("width", [1, 16, 33])
def test_steer_refuses_a_vector_of_another_width(setup: Setup, width: int) -> None:
    for vector in (np.ones(width, np.float32), torch.ones(width)):
        with pytest.raises(caa.OptionError, match="must have the model's width, 32 values") as e:
            _steer(setup, vector)
        assert e.value.option == "vector" and e.value.value == f"[{width} values]"


@pytest.mark.usefixtures("no_forward")
def test_steer_refuses_another_models_vectors_as_generate_does(setup: Setup) -> None:
    with pytest.raises(caa.MismatchError) as from_generate:
        _generate(setup, setup.other_vectors)
    with pytest.raises(caa.MismatchError) as from_steer:
        _steer(setup, setup.other_vectors)
    assert str(from_steer.value) == str(from_generate.value)


@pytest.mark.usefixtures("no_forward")
@pytest.mark.parametrize("multiplier", [math.nan, math.inf, -math.inf, [1.0, math.nan], True])
def test_steer_refuses_multipliers_that_are_not_finite_numbers(setup: Setup, multiplier: Any) -> None:
    with pytest.raises(caa.OptionError, match="is not a finite number") as e:
        _steer(setup, setup.vectors, multiplier=multiplier)
    assert e.value.option == "multiplier"


@pytest.mark.usefixtures("no_forward")
@pytest.mark.parametrize("layer", [-1, 4, 99, 1.0, True])
def test_steer_refuses_a_layer_the_model_lacks(setup: Setup, layer: Any) -> None:
    with pytest.raises(caa.OptionError, match="must be a layer from 0 to 3") as e:
        _steer(setup, np.ones(32, np.float32), layer=layer)
    assert e.value.option == "layer"
