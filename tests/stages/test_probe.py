"""caa.stages.probe: the probe score against a hand computation (unbatched, output_hidden_states),
batched == unbatched, and generate's probe_score == the projection of what it generated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import caa
from caa.core.prompts import prompt_format
from caa.errors import CaaError
from caa.models.loading import LoadedModel, load_model
from caa.stages.generate import generate_steered
from caa.stages.options import GenerateOptions
from caa.stages.probe import probe_scores, unit


@pytest.fixture(scope="module")
def loaded(tiny_models: dict[str, Path]) -> LoadedModel:
    return load_model(str(tiny_models["llama"]), device="cpu")


def _reference(
    loaded: LoadedModel, prompt: list[int], new: list[int], vector: torch.Tensor, layer: int
) -> float:
    """One text, the transformers way: hidden_states[layer + 1] at the generated positions, each
    dotted with v / |v|, averaged."""
    with torch.inference_mode():
        out = loaded.model(torch.tensor([prompt + new]), output_hidden_states=True)
    hidden = out.hidden_states[layer + 1][0, len(prompt) :].double()  # [new tokens, d_model]
    direction = vector.double() / vector.double().norm()
    return float((hidden @ direction).mean())


def _random_rows(loaded: LoadedModel, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    rng = np.random.default_rng(seed)
    low, high = 7, len(loaded.tokenizer)  # past the special tokens
    prompts = [rng.integers(low, high, size=n).tolist() for n in (5, 9, 3, 7)]
    new = [rng.integers(low, high, size=n).tolist() for n in (4, 1, 6, 0)]
    return prompts, new


@pytest.mark.parametrize("layer", [0, 2])
def test_probe_score_is_the_mean_projection_of_the_generated_positions(
    loaded: LoadedModel, layer: int
) -> None:
    prompts, new = _random_rows(loaded, seed=layer)
    vector = torch.randn(loaded.hidden_size, generator=torch.Generator().manual_seed(1)) * 3
    scores = probe_scores(loaded, prompts, new, vector, layer)
    for prompt, ids, score in zip(prompts[:3], new[:3], scores[:3], strict=True):
        assert score == pytest.approx(_reference(loaded, prompt, ids, vector, layer), abs=1e-4)
    assert np.isnan(scores[3])  # nothing generated: no score
    # scaling the vector does not change a projection on its direction
    assert probe_scores(loaded, prompts, new, vector * 7, layer)[:3] == pytest.approx(scores[:3], abs=1e-4)


def test_batched_equals_unbatched(loaded: LoadedModel) -> None:
    prompts, new = _random_rows(loaded, seed=5)
    vector = torch.randn(loaded.hidden_size, generator=torch.Generator().manual_seed(2))
    batched = probe_scores(loaded, prompts, new, vector, 1)
    one_by_one = [probe_scores(loaded, [p], [n], vector, 1)[0] for p, n in zip(prompts, new, strict=True)]
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


def test_a_vector_without_direction_is_refused() -> None:
    with pytest.raises(CaaError, match="the vector at layer 3 has norm 0: no direction to project on"):
        unit(torch.zeros(8), 3)


def test_generate_scores_what_it_generated(loaded: LoadedModel) -> None:
    """Each row's probe_score is the reference projection of the tokens that row's steered greedy
    generation produced (regenerated here one prompt at a time under caa.steer)."""
    layer, prompts = 2, ["tell me about the city", "hello"]
    vector = torch.randn(loaded.hidden_size, generator=torch.Generator().manual_seed(3)) * 2
    options = GenerateOptions(layer=layer, multipliers=(-4.0, 0.0, 4.0), max_new_tokens=6, score="probe")
    frame = generate_steered(loaded, prompts, vector, options, behavior="mood").frame
    tok, style = loaded.tokenizer, prompt_format(loaded.tokenizer)
    assert frame.probe_score.notna().all() and frame.judge_rating.isna().all()
    for r in frame.itertuples():
        prompt = tok(style.prefix(tok, r.prompt), add_special_tokens=False)["input_ids"]
        with (
            caa.steer(loaded, vector, layer, multiplier=r.multiplier, prompt_length=len(prompt)),
            torch.inference_mode(),
        ):
            out = loaded.model.generate(
                torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id
            )
        new = out[0, len(prompt) :].tolist()
        new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        assert tok.decode(new, skip_special_tokens=True).strip() == r.text
        assert r.probe_score == pytest.approx(_reference(loaded, prompt, new, vector, layer), abs=1e-4)
    steered, plain = (frame[frame.multiplier == m].probe_score.tolist() for m in (4.0, 0.0))
    assert steered != pytest.approx(plain)  # the steered rows read other tokens than the unsteered
