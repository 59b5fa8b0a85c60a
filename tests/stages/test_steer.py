"""``caa.steer`` (caa.stages.steer): what it adds, where, and the scale it reads from a VectorSet."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from caa.errors import OptionError
from caa.models.loading import load_model
from caa.stages.steer import steer
from caa.stages.vectors import VectorSet


def test_it_adds_multiplier_times_the_residual_scaled_vector_from_the_start_position_only(
    tiny_models: dict[str, Path], pipelines: Callable[[str], tuple[Path, Path]]
) -> None:
    loaded = load_model(tiny_models["llama"], dtype="float32", device="cpu")
    vectors = VectorSet.read(pipelines("llama")[1])
    ids = torch.tensor([[2, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        plain = loaded.model(ids, output_hidden_states=True).hidden_states[2]  # after block 1
        with steer(loaded, vectors, layer=1, multiplier=0.5, behavior="mood", start=3, scale="residual"):
            moved = loaded.model(ids, output_hidden_states=True).hidden_states[2]
    want = torch.from_numpy(0.5 * vectors.vector("mood", 1, "residual"))
    assert torch.equal(moved[0, :3], plain[0, :3])
    assert torch.allclose(moved[0, 3:], plain[0, 3:] + want, atol=1e-5)
    row = vectors.frame[(vectors.frame.behavior == "mood") & (vectors.frame.layer == 1)].iloc[0]
    assert float(want.norm()) == pytest.approx(0.5 * float(row.mean_residual_norm), rel=1e-5)


def test_it_refuses_a_layer_out_of_range_and_a_vector_that_is_not_finite(
    tiny_models: dict[str, Path],
) -> None:
    loaded = load_model(tiny_models["llama"], dtype="float32", device="cpu")
    with pytest.raises(OptionError, match="must be a layer from 0 to"), steer(loaded, np.ones(32), layer=99):
        pass
    with pytest.raises(OptionError, match="not finite"), steer(loaded, np.full(32, np.nan), layer=0):
        pass
