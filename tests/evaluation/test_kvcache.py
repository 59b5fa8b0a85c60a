"""caa.evaluation.kvcache: the KV-cache plumbing of the cached engine, checked against plain passes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from caa.evaluation.kvcache import (
    ReusedLogits,
    cache_argument,
    prefix_cache,
    repeated,
    repeated_in_place,
    rewinder,
    shared_length,
    supports_prefix_cache,
)
from caa.models.loading import LoadedModel, load_model


@pytest.fixture(scope="module")
def llama(tiny_models: dict[str, Path]) -> LoadedModel:
    return load_model(str(tiny_models["llama"]), device="cpu")


def _cache_of(loaded: LoadedModel, ids: list[list[int]]) -> object:
    with torch.inference_mode():
        out = loaded.model(input_ids=torch.tensor(ids), use_cache=True)
    return out.get("cache") or out.get("past_key_values")


def _next_logits(loaded: LoadedModel, ids: list[list[int]], cache: object, past: int) -> torch.Tensor:
    """Logits of ``ids`` run after ``past`` cached positions."""
    n = len(ids[0])
    with torch.inference_mode():
        return loaded.model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.ones(len(ids), past + n, dtype=torch.long),
            position_ids=torch.arange(past, past + n)[None].expand(len(ids), -1),
            use_cache=True,
            **{cache_argument(loaded): cache},
        ).logits


def test_shared_length() -> None:
    assert shared_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_length([[1, 2], [1, 2, 3]]) == 2  # the shortest, when it is all shared
    assert shared_length([[7, 1], [8, 1]]) == 0
    assert shared_length([[], [1]]) == 0
    assert shared_length([[4, 5, 6]]) == 3


def test_rewinder_undoes_a_pass_on_a_dynamic_cache(llama: LoadedModel) -> None:
    prefix = [[11, 12, 13, 14]]
    cache = _cache_of(llama, prefix)
    assert type(cache).__name__ == "DynamicCache"
    rewind = rewinder(cache)
    before = _next_logits(llama, [[20, 21]], cache, 4)
    assert cache.get_seq_length() == 6
    assert rewind() is cache and cache.get_seq_length() == 4
    again = _next_logits(llama, [[20, 21]], rewind(), 4)
    torch.testing.assert_close(again, before, rtol=0, atol=0)
    other = _next_logits(llama, [[22, 23]], rewind(), 4)
    with torch.inference_mode():
        whole = llama.model(input_ids=torch.tensor([[11, 12, 13, 14, 22, 23]])).logits[:, 4:]
    torch.testing.assert_close(other, whole, rtol=1e-5, atol=1e-5)


def test_rewinder_copies_any_other_cache() -> None:
    state = {"keys": [1, 2]}
    rewind = rewinder(state)
    state["keys"].append(3)
    assert rewind() == {"keys": [1, 2]}
    first = rewind()
    first["keys"].append(9)
    assert rewind() == {"keys": [1, 2]}  # each call a fresh copy


def test_repeated_and_in_place_repeat_every_row_alike(llama: LoadedModel) -> None:
    prefixes = [[11, 12, 13], [31, 32, 33]]
    tail = [[40, 41], [40, 41], [50, 51], [50, 51], [60, 61], [60, 61]]  # rows: text-major, 3 reps
    reps = 3
    concatenating = repeated(_cache_of(llama, prefixes), reps)
    in_place = repeated_in_place(_cache_of(llama, prefixes), reps, tail=2)
    assert in_place is not None
    a = _next_logits(llama, tail, concatenating(), 3)
    b = _next_logits(llama, tail, in_place(), 3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for r in range(6):
        with torch.inference_mode():
            alone = llama.model(input_ids=torch.tensor([prefixes[r // reps] + tail[r]])).logits[0, 3:]
        torch.testing.assert_close(a[r], alone, rtol=1e-5, atol=1e-5)
    again = _next_logits(llama, tail, in_place(), 3)  # rewound: the same pass again
    torch.testing.assert_close(again, b, rtol=0, atol=0)
    assert repeated_in_place({"not": "a cache"}, 2, 1) is None


def test_prefix_cache_runs_a_shared_start_once_and_pads_the_rest_left(llama: LoadedModel) -> None:
    heads = [[5, 6, 7, 20, 21], [5, 6, 7, 30], [5, 6, 7, 40, 41, 42]]
    cache, ids, mask = prefix_cache(llama, heads, cache_argument(llama))
    assert ids.tolist() == [[5, 6, 7, 1, 20, 21], [5, 6, 7, 1, 1, 30], [5, 6, 7, 40, 41, 42]]
    assert mask.tolist() == [[1, 1, 1, 0, 1, 1], [1, 1, 1, 0, 0, 1], [1, 1, 1, 1, 1, 1]]
    assert cache.get_seq_length() == 6
    positions = mask.sum(-1, keepdim=True)  # the next token's position in each row
    with torch.inference_mode():
        out = llama.model(
            input_ids=torch.tensor([[50]] * 3),
            attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1),
            position_ids=positions,
            **{cache_argument(llama): cache},
        ).logits[:, -1]
    for r, head in enumerate(heads):
        with torch.inference_mode():
            alone = llama.model(input_ids=torch.tensor([[*head, 50]])).logits[0, -1]
        torch.testing.assert_close(out[r], alone, rtol=1e-4, atol=1e-4)


def test_supports_prefix_cache_only_for_windows_wider_than_the_batch(tiny_models: dict[str, Path]) -> None:
    llama = load_model(str(tiny_models["llama"]), device="cpu")
    assert supports_prefix_cache(llama) and supports_prefix_cache(llama, 10_000)
    gemma = load_model(str(tiny_models["gemma3"]), device="cpu")
    gemma.model.config.get_text_config().sliding_window = 16
    assert not supports_prefix_cache(gemma)
    assert supports_prefix_cache(gemma, 15) and not supports_prefix_cache(gemma, 16)


def test_reused_logits_are_the_heads_numbers_in_one_buffer(llama: LoadedModel) -> None:
    ids = torch.tensor([[11, 12, 13, 14]])
    with torch.inference_mode():
        plain = llama.model(input_ids=ids).logits.clone()
        plain_short = llama.model(input_ids=ids[:, :3]).logits.clone()
        reused = ReusedLogits(llama)
        assert reused.active
        with reused:
            first = llama.model(input_ids=ids).logits
            second = llama.model(input_ids=ids[:, :3]).logits
            torch.testing.assert_close(second, plain_short, rtol=1e-6, atol=1e-6)
            assert first.data_ptr() == second.data_ptr()  # written into the same tensor
            third = llama.model(input_ids=ids).logits
            torch.testing.assert_close(third, plain, rtol=1e-6, atol=1e-6)
        assert llama.model.get_output_embeddings() is reused.head  # put back on exit
