"""caa.evaluation.engines: log-probabilities of every text under every (layer, multiplier), checked
against unbatched forward passes steered by a hook written here."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from caa.core.budget import planner_for
from caa.evaluation.engines import ScoreText, cached_grid, prefix_lengths, reference_grid, run_grid
from caa.models.loading import LoadedModel, load_model


@pytest.fixture(scope="module")
def llama(tiny_models: dict[str, Path]) -> LoadedModel:
    return load_model(str(tiny_models["llama"]), device="cpu")


def _texts() -> list[ScoreText]:
    torch.manual_seed(2)
    # prompts of 4, 7 and 5 tokens, each with a 3-token answer read at its 3 positions before the end
    return [ScoreText(tuple(torch.randint(10, 100, (p + 3,)).tolist()), p, p - 1, 3) for p in (4, 7, 5)]


def _reads(texts: Sequence[ScoreText], logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Every read position's full log-distribution: [texts, multipliers, width * vocab]."""
    return (logp * valid[:, None, :, None]).flatten(2)


def _direct(loaded: LoadedModel, text: ScoreText, layer: int, delta: torch.Tensor) -> torch.Tensor:
    """One text alone, ``delta`` added to block ``layer``'s output at positions >= its prompt
    length: log-probabilities at its read positions [reads, vocab]."""

    def add(module: torch.nn.Module, args: object, output: object) -> object:
        hidden = output[0] if isinstance(output, tuple) else output
        steered = hidden.clone()
        steered[:, text.prompt_length :] += delta
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    handle = loaded.blocks[layer].register_forward_hook(add, prepend=True)
    try:
        with torch.inference_mode():
            logits = loaded.model(input_ids=torch.tensor([text.input_ids])).logits[0]
    finally:
        handle.remove()
    return torch.log_softmax(logits.float(), -1)[text.read_from : text.read_from + text.reads]


def test_score_text_next_ids_are_the_tokens_the_read_positions_predict() -> None:
    text = ScoreText((5, 6, 7, 8, 9), prompt_length=2, read_from=1, reads=3)
    assert text.next_ids() == [7, 8, 9]
    assert ScoreText((5, 6, 7), 3, 2, 1, targets=(30, 31)).next_ids() == []  # A/B: answer not in the text


def test_prefix_lengths_stop_at_the_first_steered_or_read_position() -> None:
    texts = [ScoreText(tuple(range(10)), 6, 5, 4), ScoreText(tuple(range(8)), 5, 2, 3)]
    assert prefix_lengths(texts, "answer") == [5, 2]  # min(prompt length, read_from)
    assert prefix_lengths(texts, "prompt-end") == [5, 2]
    assert prefix_lengths([ScoreText(tuple(range(10)), 6, 8, 1)], "prompt-end") == [5]
    assert prefix_lengths(texts, "all") == [0, 0]


def test_reference_grid_equals_unbatched_hooked_passes(llama: LoadedModel) -> None:
    texts = _texts()
    torch.manual_seed(4)
    vectors = {1: torch.randn(llama.hidden_size), 3: torch.randn(llama.hidden_size)}
    multipliers = [-1.5, 0.0, 2.0]
    got = reference_grid(llama, texts, vectors, multipliers, _reads, "answer", planner_for(llama, max_rows=4))
    vocab = llama.model.config.vocab_size
    for layer, vector in vectors.items():
        assert got[layer].shape == (len(texts), len(multipliers), 3 * vocab)
        for i, text in enumerate(texts):
            for j, m in enumerate(multipliers):
                want = _direct(llama, text, layer, m * vector).reshape(-1)
                np.testing.assert_allclose(got[layer][i, j], want.numpy(), atol=2e-5, rtol=1e-5)


def test_steering_changes_only_the_steered_cells(llama: LoadedModel) -> None:
    texts = _texts()
    vectors = {2: torch.ones(llama.hidden_size) * 3}
    got = reference_grid(llama, texts, vectors, [0.0, 1.0], _reads, "answer")[2]
    assert not np.allclose(got[:, 0], got[:, 1])
    zero = reference_grid(llama, texts, {2: torch.zeros(llama.hidden_size)}, [0.0, 1.0], _reads, "answer")[2]
    np.testing.assert_array_equal(zero[:, 0], zero[:, 1])  # a zero vector steers nothing


@pytest.mark.parametrize("positions", ["answer", "prompt-end"])
def test_cached_and_layer_skipping_engines_equal_the_reference(llama: LoadedModel, positions: str) -> None:
    texts = _texts()
    torch.manual_seed(6)
    vectors = {0: torch.randn(llama.hidden_size), 2: torch.randn(llama.hidden_size)}
    multipliers = [-1.0, 0.0, 1.0]
    ref = reference_grid(llama, texts, vectors, multipliers, _reads, positions)
    skip = reference_grid(llama, texts, vectors, multipliers, _reads, positions, skip_layers=True)
    cached = cached_grid(llama, texts, vectors, multipliers, _reads, positions)
    naive = run_grid("naive", llama, texts, vectors, multipliers, _reads, positions)
    for layer in vectors:
        np.testing.assert_allclose(skip[layer], ref[layer], atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(cached[layer], ref[layer], atol=2e-5, rtol=1e-5)
        np.testing.assert_array_equal(naive[layer], ref[layer])


def test_ticks_count_every_text_of_every_layer(llama: LoadedModel) -> None:
    texts = _texts()
    ticks: list[int] = []
    vectors = {1: torch.zeros(llama.hidden_size), 2: torch.zeros(llama.hidden_size)}
    reference_grid(
        llama, texts, vectors, [0.0], _reads, "answer", planner_for(llama, max_rows=1), tick=ticks.append
    )
    assert sum(ticks) == len(texts) * len(vectors) and len(ticks) == len(texts)
