from __future__ import annotations

from pathlib import Path

import pytest
import torch

import caa
from caa.hooks import steering, untuple
from caa.models import load_model


def block_outputs(loaded, ids: torch.Tensor, layer: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    captured = {}

    def hook(module, args, output):  # type: ignore[no-untyped-def]
        captured["h"] = untuple(output).clone()

    handle = loaded.blocks[layer].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            loaded.model(ids)
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
    from caa.hooks import capturing, replaying, run_until_stop

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
