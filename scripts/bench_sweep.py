"""Benchmark the sweep engines on the embedded SmolLM2 (CPU): behavior scores only, same grid, same run.

Engines: fast (prefix KV cache reused across the grid), batched reference (one forward per text batch
and layer, multipliers in the batch), and the paper's way (one unbatched forward per question, layer
and multiplier). Usage:
    python scripts/bench_sweep.py [--behavior sycophancy] [--questions 20] [--layers 10,14,18]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from caa.extract import encode_pairs, forward_layers  # noqa: E402
from caa.ingest import ingest, pairs_table  # noqa: E402
from caa.models import load_model  # noqa: E402
from caa.prompts import collate, prompt_format  # noqa: E402
from caa.sweep import ab_text, freeform_text, score_grid_cached, score_rows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--behavior", default="sycophancy")
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--layers", default="10,14,18")
    parser.add_argument("--multipliers", default="-2,-1,0,1,2")
    args = parser.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    multipliers = [float(x) for x in args.multipliers.split(",")]
    loaded = load_model("smollm2-135m", device="cpu")
    style = prompt_format(loaded.tokenizer)
    source = next(
        p for p in (ROOT / "data").iterdir() if p.stem == args.behavior and p.suffix in (".json", ".jsonl")
    )
    frame = pairs_table(ingest([source]).pairs).to_pandas()
    frame["split"] = frame["split"].astype(str)
    train, test = frame[frame.split == "train"], frame[frame.split == "test"].head(args.questions)
    # mean-difference vectors from the training pairs, through the extraction code
    items = encode_pairs(train.reset_index(drop=True), loaded, style, "last")
    acts = forward_layers(
        loaded, collate([it.encoded for it in items], loaded.tokenizer.pad_token_id), layers
    )
    sign = torch.tensor([1.0 if it.side == "positive" else -1.0 for it in items])[:, None, None]
    vectors = {layer: (acts * sign).sum(0)[i] / len(train) for i, layer in enumerate(layers)}
    if (test.format == "ab").all():
        texts = [ab_text(loaded, style, r.prompt, r.positive, r.negative) for r in test.itertuples()]
    else:
        texts = [
            freeform_text(loaded, style, r.prompt, c)
            for r in test.itertuples()
            for c in (r.positive, r.negative)
        ]
    cells = len(texts) * len(layers) * len(multipliers)
    print(
        f"SmolLM2-135M on CPU ({torch.get_num_threads()} threads): {args.behavior}, {len(test)} test pairs, "
        f"{len(texts)} texts x {len(layers)} layers x {len(multipliers)} multipliers = {cells} cells"
    )
    start = time.perf_counter()
    fast = score_grid_cached(loaded, texts, vectors, multipliers, batch_size=40)
    t_fast = time.perf_counter() - start
    start = time.perf_counter()
    batched = {
        layer: score_rows(loaded, texts, layer, v, multipliers, batch_size=40) for layer, v in vectors.items()
    }
    t_batched = time.perf_counter() - start
    start = time.perf_counter()
    naive = {
        layer: np.concatenate(
            [score_rows(loaded, texts, layer, v, [m], batch_size=1) for m in multipliers], 1
        )
        for layer, v in vectors.items()
    }
    t_naive = time.perf_counter() - start
    diff_b = max(np.abs(fast[layer] - batched[layer]).max() for layer in layers)
    diff_n = max(np.abs(fast[layer] - naive[layer]).max() for layer in layers)
    print(f"one forward per cell (paper's way): {t_naive:7.1f} s")
    print(
        f"batched reference engine          : {t_batched:7.1f} s  "
        f"({t_naive / t_batched:.1f}x the per-cell loop)"
    )
    print(
        f"fast engine (prefix cache reused) : {t_fast:7.1f} s  ({t_naive / t_fast:.1f}x the per-cell loop, "
        f"{t_batched / t_fast:.1f}x the batched reference)"
    )
    print(f"max |fast - per-cell| over all cells: {diff_n:.2e}; max |fast - batched|: {diff_b:.2e}")


if __name__ == "__main__":
    main()
