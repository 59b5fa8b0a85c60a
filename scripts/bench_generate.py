"""Generation: steered against unsteered tokens/s at the same batch size (1 and 32), greedy, a fixed
number of new tokens, interleaved repeats (best of each), the paper's positions (every generated token)
with one multiplier per row at one middle layer. The limit is unsteered generation itself.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from bench_common import DATA, Bench, Section

from caa.core.hooks import steer_start, steering
from caa.core.prompts import Encoded, collate, prompt_format


def tokens_per_second(bench: Bench, batch_size: int, new_tokens: int, repeats: int) -> tuple[float, float]:
    """(best unsteered, best steered) tokens/s at ``batch_size``."""
    loaded = bench.loaded
    tok = loaded.tokenizer
    style = prompt_format(tok)
    lines = (DATA / "neutral_prompts.txt").read_text().splitlines()
    prompts = [lines[i % len(lines)] for i in range(batch_size)]
    encoded = []
    for p in prompts:
        ids = tok(style.prefix(tok, p), add_special_tokens=not style.chat)["input_ids"]
        encoded.append(Encoded(ids, len(ids), [len(ids) - 1]))
    batch = collate(encoded, tok.pad_token_id).to(loaded.device)
    lengths = torch.tensor([len(e.input_ids) for e in encoded])  # steer after the prompt (the paper's)
    generator = torch.Generator().manual_seed(0)
    vector = torch.randn(loaded.hidden_size, generator=generator)
    vector = vector / vector.norm() * 4.0
    coef = torch.linspace(-1, 1, batch_size)[:, None] if batch_size > 1 else torch.ones(1, 1)
    layer = loaded.num_layers // 2

    def once(steered: bool) -> float:
        steer = (
            steering(loaded.blocks, {layer: coef * vector}, steer_start("answer", lengths))
            if steered
            else nullcontext()
        )

        def generate() -> torch.Tensor:
            with torch.inference_mode(), steer:
                return loaded.model.generate(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )

        seconds, out = bench.timed(generate, repeat=1)  # the caller interleaves repeats
        assert out.shape[1] - batch.input_ids.shape[1] == new_tokens
        return batch_size * new_tokens / seconds

    once(False)  # warm-up
    plain, steered = [], []
    for _ in range(repeats):  # interleaved: drift in machine speed hits both alike
        plain.append(once(False))
        steered.append(once(True))
    return max(plain), max(steered)


def run(bench: Bench) -> Section:
    new_tokens = bench.pick(8, 32)
    repeats = bench.pick(1, 3)
    section = Section(
        "generate",
        f"greedy, {new_tokens} new tokens, best of {repeats} interleaved repeats, steering at layer "
        f"{bench.loaded.num_layers // 2} from the first generated token on, one multiplier per row",
    )
    for size in (1, 32):
        plain, steered = tokens_per_second(bench, size, new_tokens, repeats)
        bench.log(f"generate: batch {size}: unsteered {plain:.1f}, steered {steered:.1f} tokens/s")
        section.add(f"batch {size}: unsteered (the limit)", plain, "tokens/s")
        section.add(f"batch {size}: steered", steered, "tokens/s", "unsteered", steered / plain, True)
    return section
