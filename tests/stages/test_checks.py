"""caa.stages.checks: the rules that refuse artifacts that do not belong together, each error
naming the file and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from caa.core.prompts import PromptFormat
from caa.errors import CaaError, MismatchError
from caa.models.loading import LoadedModel, load_model
from caa.stages.checks import check_fits, check_held_out, check_model, check_strength, check_template
from caa.stages.vectors import VectorSet


@pytest.fixture(scope="module")
def llama(tiny_models: dict[str, Path]) -> LoadedModel:
    return load_model(str(tiny_models["llama"]), device="cpu")


def _vectors(layers: list[int], width: int, meta: dict[str, Any]) -> VectorSet:
    frame = pd.DataFrame({"behavior": ["agree"] * len(layers), "layer": layers})
    return VectorSet(frame, np.zeros((len(layers), width), np.float32), meta, Path("v.parquet"))


def test_check_model_accepts_vectors_of_this_model(llama: LoadedModel) -> None:
    mine = {"model": llama.fingerprint.to_dict()}
    check_model(_vectors([0, llama.num_layers - 1], llama.hidden_size, mine), llama)


def test_check_model_refuses_another_models_fingerprint_naming_the_field(llama: LoadedModel) -> None:
    other = {**llama.fingerprint.to_dict(), "weights_hash": "sha256:other"}
    with pytest.raises(MismatchError) as e:
        check_model(_vectors([1], llama.hidden_size, {"model": other}), llama)
    message = str(e.value)
    assert message.startswith("v.parquet: field 'model.weights_hash' is 'sha256:other' but the loaded model")
    assert "these vectors were made with another model" in message
    wider = {**llama.fingerprint.to_dict(), "hidden_size": 64}
    with pytest.raises(MismatchError, match=r"field 'model.hidden_size' is 64"):
        check_model(_vectors([1], llama.hidden_size, {"model": wider}), llama)
    with pytest.raises(MismatchError, match=r"field 'model.hidden_size' is None"):
        check_model(_vectors([1], llama.hidden_size, {}), llama)  # no model recorded


def test_check_model_refuses_a_wrong_width_and_a_layer_out_of_range(llama: LoadedModel) -> None:
    mine = {"model": llama.fingerprint.to_dict()}
    with pytest.raises(
        MismatchError, match=f"field 'vector' has width 7 but the model's hidden_size is {llama.hidden_size}"
    ):
        check_model(_vectors([1], 7, mine), llama)
    n = llama.num_layers
    with pytest.raises(
        MismatchError, match=rf"field 'layer': layer {n} is out of range; .* \(layers 0-{n - 1}\)"
    ):
        check_model(_vectors([1, n], llama.hidden_size, mine), llama)
    with pytest.raises(MismatchError, match="layer -1 is out of range"):
        check_model(_vectors([-1], llama.hidden_size, mine), llama)


def test_check_fits_compares_only_what_is_known_and_not_strict_passes_what_was_not_recorded() -> None:
    """The one check behind check_model, caa serve's pre-check and the vLLM plugin's."""
    here = {"weights_hash": "dir:abc"}
    recorded = {"weights_hash": "dir:abc", "hidden_size": 99}  # hidden_size is not known here: not compared
    check_fits("v.parquet", recorded, 8, [0, 2], "m", here, num_layers=3)
    check_fits("v.parquet", None, 8, [0], "m", here, strict=False)  # nothing recorded: not refused
    check_fits("v.parquet", {"weights_hash": "dir:zzz"}, 8, [7], "m", {}, strict=False)  # nothing known
    with pytest.raises(MismatchError, match=r"field 'model.weights_hash' is None but the served model m has"):
        check_fits("v.parquet", None, 8, [0], "the served model m", here)
    with pytest.raises(MismatchError) as e:
        check_fits("v.parquet", {"weights_hash": "dir:zzz"}, 8, [0], "the served model m", here, strict=False)
    assert str(e.value) == (
        "v.parquet: field 'model.weights_hash' is 'dir:zzz' but the served model m has 'dir:abc': "
        "these vectors were made with another model"
    )
    with pytest.raises(MismatchError, match=r"width 8 but the model's hidden_size is 6"):
        check_fits("v.parquet", None, 8, [0], "m", {}, hidden=6)
    with pytest.raises(MismatchError, match=r"layer 3 is out of range; the model has 3 blocks \(layers 0-2"):
        check_fits("v.parquet", None, 8, [1, 3, 4], "m", {}, num_layers=3)


def test_check_template_refuses_the_other_prompt_format() -> None:
    chat = _vectors([1], 4, {"prompt": {"chat_template": True}})
    check_template(chat, PromptFormat(chat=True))
    with pytest.raises(MismatchError) as e:
        check_template(chat, PromptFormat(chat=False), option="chat_template")
    assert str(e.value) == (
        "v.parquet: field 'prompt.chat_template': its activations were read with the chat template, "
        "but this run uses plain text (no chat template); set chat_template to match"
    )
    check_template(_vectors([1], 4, {}), PromptFormat(chat=False))  # not recorded: nothing to check


def test_check_held_out_refuses_training_pairs_and_notices_when_none_are_listed() -> None:
    vectors = _vectors([1], 4, {"train_pair_ids": ["p1", "p2"]})
    check_held_out(vectors, pd.DataFrame({"pair_id": ["p3", "p4"]}), Path("pairs.parquet"))
    with pytest.raises(MismatchError) as e:
        check_held_out(vectors, pd.DataFrame({"pair_id": ["p3", "p2", "p1"]}), Path("pairs.parquet"))
    assert str(e.value).startswith(
        "pairs.parquet: 2 of its test pairs (e.g. 'p2') trained the vectors in v.parquet"
    )
    notices: list[str] = []
    check_held_out(_vectors([1], 4, {}), pd.DataFrame({"pair_id": ["p1"]}), Path("p"), notices.append)
    assert len(notices) == 1 and "field 'train_pair_ids'" in notices[0]


def test_check_strength_refuses_an_overflowing_product(llama: LoadedModel) -> None:
    # float32 holds activations up to about sqrt(3.4e38) = 1.8e19: 5e9 passes, 1e20 does not
    vector = torch.zeros(llama.hidden_size)
    vector[3] = -1e9
    check_strength({2: vector}, [-5.0, 0.0, 5.0], llama)
    with pytest.raises(CaaError, match=r"x1e\+11 times the layer-2 vector \(largest entry 1e\+09\)"):
        check_strength({2: vector}, [0.0, -1e11], llama)
    with pytest.raises(CaaError, match=r"beyond what torch.float32 activations hold"):
        check_strength({1: torch.tensor([float("inf")])}, [1.0], llama)
