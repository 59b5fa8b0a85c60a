"""Benchmark steered against unsteered generation: tokens/s at the same batch size, same process.

Usage: python scripts/bench_generate.py [--batch-size 8] [--new-tokens 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from caa.hooks import steer_start, steering  # noqa: E402
from caa.models import load_model  # noqa: E402
from caa.prompts import Encoded, collate, prompt_format  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layer", type=int, default=12)
    args = parser.parse_args()
    loaded = load_model("smollm2-135m", device="cpu")
    tok = loaded.tokenizer
    style = prompt_format(tok)
    prompts = (ROOT / "data" / "neutral_prompts.txt").read_text().splitlines()[: args.batch_size]
    encoded = []
    for p in prompts:
        ids = tok(style.prefix(tok, p), add_special_tokens=False)["input_ids"]
        encoded.append(Encoded(ids, len(ids), [len(ids) - 1]))
    batch = collate(encoded, tok.pad_token_id)
    lengths = torch.tensor([len(e.input_ids) for e in encoded])  # the paper's positions: after the prompt
    vector = torch.randn(loaded.hidden_size)
    coef = torch.linspace(-1, 1, len(prompts))[:, None]

    def run(steered: bool) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            steer = (
                steering(loaded.blocks, {args.layer: coef * vector}, steer_start("answer", lengths))
                if steered
                else nullcontext()
            )
            with steer:
                out = loaded.model.generate(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )
        assert out.shape[1] - batch.input_ids.shape[1] == args.new_tokens
        return len(prompts) * args.new_tokens / (time.perf_counter() - start)

    run(False)  # warm-up
    plain, steered = [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine speed hits both alike
        plain.append(run(False))
        steered.append(run(True))
    p, s = max(plain), max(steered)
    print(
        f"SmolLM2-135M on CPU ({torch.get_num_threads()} threads), batch {len(prompts)}, "
        f"{args.new_tokens} new tokens, best of {args.repeats}"
    )
    print(f"unsteered: {p:7.1f} tokens/s")
    print(f"steered  : {s:7.1f} tokens/s  ({s / p:.3f}x unsteered; layer {args.layer}, per-row multipliers)")


if __name__ == "__main__":
    main()
