from __future__ import annotations

from pathlib import Path

import pytest
import torch

import caa
from caa.core.hooks import steering, untuple
from caa.models.loading import load_model


def block_outputs(loaded, ids: torch.Tensor | dict, layer: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Block ``layer``'s output for input ids, or for a dict of model inputs (ids, mask, positions)."""
    captured = {}

    def hook(module, args, output):  # type: ignore[no-untyped-def]
        captured["h"] = untuple(output).clone()

    handle = loaded.blocks[layer].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            loaded.model(**ids) if isinstance(ids, dict) else loaded.model(ids)
    finally:
        handle.remove()
    return captured["h"]


def test_steered_output_is_unsteered_plus_m_v_at_steered_positions_per_row(tiny_model_dir: Path) -> None:
    loaded = load_model(str(tiny_model_dir), device="cpu")
    torch.manual_seed(0)
    ids = torch.randint(10, 200, (3, 9))
    layer = 1
    v = torch.randn(loaded.hidden_size)
    multipliers = torch.tensor([-2.0, 0.0, 1.5])
    start = torch.tensor([0, 4, 6])
    base = block_outputs(loaded, ids, layer)
    with steering(loaded.blocks, {layer: multipliers[:, None] * v}, start):
        steered = block_outputs(loaded, ids, layer)
    for row in range(3):
        s = int(start[row])
        torch.testing.assert_close(steered[row, :s], base[row, :s], atol=0, rtol=0)
        torch.testing.assert_close(
            steered[row, s:], base[row, s:] + multipliers[row] * v, atol=1e-5, rtol=1e-5
        )
    # and the effect reaches the logits downstream, while earlier layers see nothing
    before, after = block_outputs(loaded, ids, 0), block_outputs(loaded, ids, layer + 1)
    with caa.steer(loaded, v, layer=layer, multiplier=3.0):
        torch.testing.assert_close(block_outputs(loaded, ids, 0), before, atol=0, rtol=0)
        assert (block_outputs(loaded, ids, layer + 1) - after).abs().max() > 1e-2


def test_hooks_are_removed_on_exit_and_after_an_exception(tiny_models: dict[str, Path]) -> None:
    loaded = load_model(str(tiny_models["llama"]), device="cpu")
    block = loaded.blocks[2]
    own = block.register_forward_hook(lambda *a: None)  # someone else's hook stays
    count = len(block._forward_hooks)
    with caa.steer(loaded, torch.ones(loaded.hidden_size), layer=2, multiplier=1.0):
        assert len(block._forward_hooks) == count + 1
    assert len(block._forward_hooks) == count
    with (
        pytest.raises(RuntimeError, match="boom"),
        caa.steer(loaded, torch.ones(loaded.hidden_size), layer=2),
    ):
        raise RuntimeError("boom")
    assert len(block._forward_hooks) == count
    assert own.id in block._forward_hooks
    own.remove()


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_greedy_generation_with_kv_cache_equals_recomputing_without_cache(
    tiny_models: dict[str, Path], arch: str
) -> None:
    loaded = load_model(str(tiny_models[arch]), device="cpu")
    torch.manual_seed(1)
    prompt = torch.randint(10, 200, (1, 7))
    v = torch.randn(loaded.hidden_size) * 2
    start = prompt.shape[1] - 1  # the last prompt token onward, as in the paper
    with torch.inference_mode(), caa.steer(loaded, v, layer=1, multiplier=1.0, start=start):
        out = loaded.model.generate(
            prompt,
            max_new_tokens=6,
            do_sample=False,
            use_cache=True,
            pad_token_id=loaded.tokenizer.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    cached = out.sequences
    # reference: recompute the whole sequence, no cache, steering positions >= start, at every step
    seq = prompt
    for step in range(6):
        with torch.inference_mode(), caa.steer(loaded, v, layer=1, multiplier=1.0, start=start):
            logits = loaded.model(seq, use_cache=False).logits[:, -1]
        torch.testing.assert_close(out.logits[step], logits, atol=1e-4, rtol=1e-4)
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seq)
    with torch.inference_mode():
        plain = loaded.model.generate(
            prompt, max_new_tokens=6, do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id
        )
    assert not torch.equal(plain, cached)  # the steering did change the text


def test_replaying_skips_blocks_exactly_and_restores_them(tiny_models: dict[str, Path]) -> None:
    from caa.core.hooks import capturing, replaying, run_until_stop

    loaded = load_model(str(tiny_models["llama"]), device="cpu")
    ids = torch.randint(10, 200, (2, 6))
    with torch.inference_mode():
        full = loaded.model(ids).logits
        with capturing(loaded.blocks, [1]) as rec:
            run_until_stop(loaded.model, ids)
        originals = list(loaded.blocks)
        with replaying(loaded.blocks, 2, rec[1]):
            assert loaded.blocks[0] is not originals[0]
            skipped = loaded.model(ids).logits
    torch.testing.assert_close(skipped, full, atol=1e-5, rtol=1e-5)
    assert list(loaded.blocks) == originals
    with pytest.raises(RuntimeError, match="boom"), replaying(loaded.blocks, 2, rec[1]):
        raise RuntimeError("boom")
    assert list(loaded.blocks) == originals


@pytest.mark.parametrize("positions", ["answer", "prompt-end", "all"])
def test_each_policy_steers_exactly_its_positions_under_left_padding(
    tiny_models: dict[str, Path], positions: str
) -> None:
    from caa.core.hooks import steer_start

    loaded = load_model(str(tiny_models["llama"]), device="cpu")
    torch.manual_seed(3)
    prompts = [torch.randint(10, 200, (n,)).tolist() for n in (4, 7)]
    answers = [torch.randint(10, 200, (n,)).tolist() for n in (3, 2)]
    rows = [p + a for p, a in zip(prompts, answers, strict=True)]
    width = max(map(len, rows))
    ids = torch.full((2, width), loaded.tokenizer.pad_token_id)
    mask = torch.zeros((2, width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row) :] = torch.tensor(row)
        mask[r, width - len(row) :] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    v = torch.randn(loaded.hidden_size)
    base = block_outputs(loaded, batch, 1)
    start = steer_start(positions, torch.tensor([len(p) for p in prompts]))
    with steering(loaded.blocks, {1: 2.0 * v}, start):
        steered = block_outputs(loaded, batch, 1)
    changed = (steered - base).abs().amax(-1) > 1e-6  # [batch, seq]
    for r, (prompt, row) in enumerate(zip(prompts, rows, strict=True)):
        pad = width - len(row)
        first = {"answer": len(prompt), "prompt-end": len(prompt) - 1, "all": -pad}[positions]
        expected = [pad + first <= i for i in range(width)]
        assert changed[r].tolist() == expected, (positions, r)
        torch.testing.assert_close(
            steered[r, pad + max(first, 0) :], base[r, pad + max(first, 0) :] + 2.0 * v
        )


def test_steering_is_stateless_across_passes_and_generate_calls(tiny_models: dict[str, Path]) -> None:
    """A second forward pass, or a second generate call, in one context is steered like the first."""
    loaded = load_model(str(tiny_models["llama"]), device="cpu")
    torch.manual_seed(4)
    prompt = torch.randint(10, 200, (1, 6))
    v = torch.randn(loaded.hidden_size) * 3
    pad = loaded.tokenizer.pad_token_id

    def gen() -> torch.Tensor:
        with torch.inference_mode():
            return loaded.model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=pad)

    with caa.steer(loaded, v, layer=1, multiplier=1.0, prompt_length=6):
        alone = gen()
    with caa.steer(loaded, v, layer=1, multiplier=1.0, prompt_length=6):
        first, second = gen(), gen()
        once = block_outputs(loaded, prompt, 1)
        again = block_outputs(loaded, prompt, 1)
    assert torch.equal(first, alone) and torch.equal(second, alone)
    torch.testing.assert_close(again, once, atol=0, rtol=0)
    with torch.inference_mode():
        plain = loaded.model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=pad)
    assert torch.equal(plain[0, :7], alone[0, :7])  # the first new token comes from the unsteered prompt
    assert not torch.equal(plain, alone)


def test_a_failed_registration_leaks_no_handle(tiny_models: dict[str, Path]) -> None:
    loaded = load_model(str(tiny_models["llama"]), device="cpu")
    counts = [len(b._forward_hooks) for b in loaded.blocks]
    v = torch.ones(loaded.hidden_size)
    with pytest.raises(IndexError), steering(loaded.blocks, {1: v, 99: v}):
        pass
    assert [len(b._forward_hooks) for b in loaded.blocks] == counts


def test_steer_positions_need_the_prompt_length_or_a_start(tiny_models: dict[str, Path]) -> None:
    from caa.core.hooks import steer_start
    from caa.errors import CaaError

    assert steer_start("all", 5) is None
    assert steer_start("answer", 5).tolist() == [5]
    assert steer_start("prompt-end", torch.tensor([5, 3])).tolist() == [4, 2]
    with pytest.raises(CaaError, match="--steer-positions 'last': use one of answer, prompt-end, all"):
        steer_start("last", 5)
    loaded = load_model(str(tiny_models["llama"]), device="cpu")
    with (
        pytest.raises(CaaError, match="not both"),
        caa.steer(loaded, torch.ones(32), 1, prompt_length=3, start=2),
    ):
        pass


def test_the_adder_moves_its_vector_once_per_device_and_dtype() -> None:
    """The steering delta is placed on the block's device and dtype once, not copied in every call
    (a blocking copy per decoding step would stall a GPU), and each dtype gets its own copy."""
    from caa.core.hooks import _Adder

    delta = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # [batch, d_model]
    adder = _Adder(delta, torch.tensor([1, 0]))
    positions = {"position_ids": torch.tensor([[0, 1], [0, 1]])}
    for dtype in (torch.float32, torch.float32, torch.bfloat16, torch.float32):
        hidden = torch.zeros(2, 2, 2, dtype=dtype)
        out = adder(torch.nn.Identity(), (), positions, (hidden,))[0]
        assert out.dtype == dtype
        expected = torch.tensor([[[0.0, 0.0], [1.0, 2.0]], [[3.0, 4.0], [3.0, 4.0]]], dtype=dtype)
        assert torch.equal(out, expected)
    assert sorted(str(dtype) for _, dtype in adder._placed) == ["torch.bfloat16", "torch.float32"]


def test_deltas_are_each_rows_multiplier_times_the_vector_made_in_one_place() -> None:
    """``multiplier * vector`` per row is built by caa.core.hooks.deltas alone (engines, generate)."""
    from caa.core.hooks import deltas

    vector = torch.tensor([1.0, -2.0, 0.5])
    made = deltas(vector, [2.0, 0.0, -1.5])  # [rows, d_model]
    assert made.dtype == torch.float32 and made.shape == (3, 3)
    assert torch.equal(made, torch.stack([2.0 * vector, 0.0 * vector, -1.5 * vector]))
    assert torch.equal(deltas(vector, torch.tensor([1.0, 3.0])), torch.stack([vector, 3.0 * vector]))
    package = Path(caa.__file__).parent
    for name in ("evaluation/engines.py", "stages/generate.py"):
        source = (package / name).read_text()
        assert "deltas(vector, " in source and "[:, None] * vector" not in source, name
