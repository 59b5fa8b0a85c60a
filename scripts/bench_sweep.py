"""Benchmark the sweep engines on the embedded SmolLM2 (CPU): behavior scores, same grid, same run.

Default grid: the demo's (vectors at layers 4-20, multipliers -4,-2,0,2,4) on 100 held-out A/B
questions. Engines: fast (the default of `caa sweep`: prefix KV cache reused across the grid, blocks
below the steered layer skipped, batches from the memory budget) against the paper's way (one
unbatched forward pass per question, layer and multiplier), and optionally the batched reference
engine (`--engine naive`). The questions are timed in interleaved chunks, so a change in machine
load hits every engine alike. Usage:
    python scripts/bench_sweep.py [--behavior sycophancy] [--questions 100] [--layers 4-20]
        [--multipliers -4,-2,0,2,4] [--chunk 25] [--with-batched] [--positions answer]
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

from caa.budget import planner_for  # noqa: E402
from caa.engine import reference_grid, run_grid  # noqa: E402
from caa.extract import encode_pairs, forward_layers, parse_layers  # noqa: E402
from caa.ingest import ingest, pairs_table  # noqa: E402
from caa.models import load_model  # noqa: E402
from caa.prompts import collate, prompt_format  # noqa: E402
from caa.scoring import ab_scores, completion_logprobs  # noqa: E402
from caa.sweep import ab_text, freeform_text  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--behavior", default="sycophancy")
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--layers", default="4-20")
    parser.add_argument("--multipliers", default="-4,-2,0,2,4")
    parser.add_argument("--chunk", type=int, default=25, help="questions per interleaved timing chunk")
    parser.add_argument("--with-batched", action="store_true", help="also time the batched reference")
    parser.add_argument("--positions", default="answer", choices=["answer", "prompt-end"])
    args = parser.parse_args()
    multipliers = [float(x) for x in args.multipliers.split(",")]
    loaded = load_model("smollm2-135m", device="cpu")
    layers = parse_layers(args.layers, loaded.num_layers)
    style = prompt_format(loaded.tokenizer)
    source = next(
        p for p in (ROOT / "data").iterdir() if p.stem == args.behavior and p.suffix in (".json", ".jsonl")
    )
    # a larger test split than the default, to have enough held-out questions
    frame = pairs_table(ingest([source], test_fraction=0.6).pairs).to_pandas()
    frame["split"] = frame["split"].astype(str)
    train, test = frame[frame.split == "train"], frame[frame.split == "test"].head(args.questions)
    if len(test) < args.questions:
        sys.exit(f"{source.name} has only {len(test)} held-out pairs")
    # mean-difference vectors from the training pairs, through the extraction code
    items = encode_pairs(train.reset_index(drop=True), loaded, style, "last")
    acts = forward_layers(
        loaded, collate([it.encoded for it in items], loaded.tokenizer.pad_token_id), layers
    )
    sign = torch.tensor([1.0 if it.side == "positive" else -1.0 for it in items])[:, None, None]
    vectors = {layer: (acts * sign).sum(0)[i] / len(train) for i, layer in enumerate(layers)}
    reduce = ab_scores if (test.format == "ab").all() else completion_logprobs
    if (test.format == "ab").all():
        texts = [ab_text(loaded, style, r.prompt, r.positive, r.negative) for r in test.itertuples()]
        per_pair = 1
    else:
        texts = [
            freeform_text(loaded, style, r.prompt, c)
            for r in test.itertuples()
            for c in (r.positive, r.negative)
        ]
        per_pair = 2
    cells = len(texts) * len(layers) * len(multipliers)
    print(
        f"SmolLM2-135M on CPU ({torch.get_num_threads()} threads): {args.behavior}, {len(test)} test pairs, "
        f"{len(texts)} texts x {len(layers)} layers ({args.layers}) x {len(multipliers)} multipliers "
        f"= {cells} cells",
        flush=True,
    )
    single = planner_for(loaded, max_rows=1)
    where = args.positions

    def per_cell(chunk: list) -> dict[int, np.ndarray]:  # type: ignore[type-arg]
        return {
            layer: np.concatenate(
                [
                    reference_grid(loaded, chunk, {layer: v}, [m], reduce, where, single)[layer]
                    for m in multipliers
                ],
                1,
            )[..., 0]
            for layer, v in vectors.items()
        }

    engines = {
        "fast": lambda chunk: {
            la: s[..., 0]
            for la, s in run_grid("fast", loaded, chunk, vectors, multipliers, reduce, where).items()
        },
        "per-cell": per_cell,
    }
    if args.with_batched:
        engines["batched"] = lambda chunk: {
            la: s[..., 0]
            for la, s in run_grid("naive", loaded, chunk, vectors, multipliers, reduce, where).items()
        }
    seconds = dict.fromkeys(engines, 0.0)
    scores: dict[str, list[dict[int, np.ndarray]]] = {name: [] for name in engines}
    step = args.chunk * per_pair
    for lo in range(0, len(texts), step):
        chunk = texts[lo : lo + step]
        for name, run in engines.items():
            start = time.perf_counter()
            scores[name].append(run(chunk))
            seconds[name] += time.perf_counter() - start
        done = min(lo + step, len(texts))
        print(
            f"  {done}/{len(texts)} texts: " + ", ".join(f"{n} {s:.1f} s" for n, s in seconds.items()),
            flush=True,
        )
    table = {
        name: {layer: np.concatenate([part[layer] for part in parts]) for layer in layers}
        for name, parts in scores.items()
    }
    if per_pair == 2:  # free-form: the table holds log p(pos) - log p(neg) per pair
        table = {n: {la: s[0::2] - s[1::2] for la, s in t.items()} for n, t in table.items()}
    base = seconds["per-cell"]
    for name, s in seconds.items():
        print(f"{name:>9}: {s:8.1f} s  {base / s:6.1f}x the per-cell loop  ({1000 * s / cells:.1f} ms/cell)")
    for name in engines:
        if name == "fast":
            continue
        cell = max(np.abs(table["fast"][la] - table[name][la]).max() for la in layers)
        mean = max(np.abs(table["fast"][la].mean(0) - table[name][la].mean(0)).max() for la in layers)
        print(f"max |fast - {name}|: per question {cell:.2e}, table (mean per cell) {mean:.2e}")


if __name__ == "__main__":
    main()
