"""Sweep engines: the fast engine (`caa sweep`'s default: prefix KV cache reused across the grid,
blocks below the steered layer skipped) against the paper's way (one unbatched forward pass per
text, layer and multiplier) and the batched reference engine (`--engine naive`), on the same grid of
held-out pairs, for A/B questions (sycophancy) and free-form pairs (sentiment), with the largest
difference between their scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from bench_common import Bench, Section, real_pairs, spread_layers

from caa.core.budget import planner_for
from caa.core.prompts import collate, prompt_format
from caa.evaluation.engines import ScoreText, reference_grid, run_grid
from caa.evaluation.scoring import ab_scores, completion_logprobs
from caa.stages.extract import encode_pairs, forward_layers
from caa.stages.sweep import ab_text, freeform_text

MULTIPLIERS = (-2.0, -1.0, 0.0, 1.0, 2.0)
Engine = Callable[[Sequence[ScoreText]], dict[int, np.ndarray]]


def mean_difference(bench: Bench, train, layers: list[int]) -> dict[int, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Mean-difference vectors of ``train`` pairs at ``layers``, through the extraction code."""
    loaded = bench.loaded
    items = encode_pairs(train.reset_index(drop=True), loaded, prompt_format(loaded.tokenizer), "last")
    acts = forward_layers(
        loaded, collate([it.encoded for it in items], loaded.tokenizer.pad_token_id), layers
    )
    sign = torch.tensor([1.0 if it.side == "positive" else -1.0 for it in items], device=acts.device)
    diff = (acts * sign[:, None, None]).sum(0) / len(train)  # [layers, d_model]
    return {layer: diff[i].cpu() for i, layer in enumerate(layers)}


def score_texts(bench: Bench, test) -> tuple[list[ScoreText], int]:  # type: ignore[no-untyped-def]
    """The sweep's texts for ``test`` pairs, and texts per pair (1 for A/B, 2 for free-form)."""
    loaded = bench.loaded
    style = prompt_format(loaded.tokenizer)
    if (test.format == "ab").all():
        return [ab_text(loaded, style, r.prompt, r.positive, r.negative) for r in test.itertuples()], 1
    texts = [
        freeform_text(loaded, style, r.prompt, c) for r in test.itertuples() for c in (r.positive, r.negative)
    ]
    return texts, 2


def engines(bench: Bench, vectors, multipliers, reduce) -> dict[str, Engine]:  # type: ignore[no-untyped-def]
    loaded = bench.loaded
    single = planner_for(loaded, max_rows=1)

    def grid(engine: str) -> Engine:
        return lambda texts: {
            la: s[..., 0]
            for la, s in run_grid(engine, loaded, texts, vectors, multipliers, reduce, "answer").items()
        }

    def per_cell(texts: Sequence[ScoreText]) -> dict[int, np.ndarray]:
        out = {}
        for layer, v in vectors.items():
            cells = [
                reference_grid(loaded, texts, {layer: v}, [m], reduce, "answer", single)[layer]
                for m in multipliers
            ]
            out[layer] = np.concatenate(cells, 1)[..., 0]  # [texts, multipliers]
        return out

    return {"fast": grid("fast"), "naive": grid("naive"), "per-cell": per_cell}


def run_kind(bench: Bench, section: Section, behavior: str, n_test: int, n_layers: int, multipliers) -> None:  # type: ignore[no-untyped-def]
    frame = real_pairs(behavior, test_fraction=0.6)
    train = frame[frame.split == "train"].head(bench.pick(8, 24))
    test = frame[frame.split == "test"].head(n_test)
    layers = spread_layers(bench.loaded.num_layers, n_layers)
    vectors = mean_difference(bench, train, layers)
    texts, per_pair = score_texts(bench, test)
    reduce = ab_scores if per_pair == 1 else completion_logprobs
    kind = "A/B" if per_pair == 1 else "free-form"
    cells = len(texts) * len(layers) * len(multipliers)
    run = engines(bench, vectors, multipliers, reduce)
    run["fast"](texts[:1])  # warm-up
    seconds, tables = {}, {}
    for name, engine in run.items():
        repeat = 1 if name == "per-cell" else None  # seconds long on its own: once is enough
        seconds[name], tables[name] = bench.timed(lambda engine=engine: engine(texts), repeat)
        bench.log(f"sweep {kind}: {name} {seconds[name]:.1f} s ({cells} cells)")
    if per_pair == 2:  # free-form: a pair's score is log p(positive) - log p(negative)
        tables = {n: {la: s[0::2] - s[1::2] for la, s in t.items()} for n, t in tables.items()}
    base = seconds["per-cell"]
    label = f"{kind} ({behavior})"
    section.add(f"{label}: one forward per cell", 1000 * base / cells, "ms/cell")
    section.add(
        f"{label}: batched reference (--engine naive)",
        1000 * seconds["naive"] / cells,
        "ms/cell",
        "one forward per cell",
        base / seconds["naive"],
    )
    section.add(
        f"{label}: fast engine (default)",
        1000 * seconds["fast"] / cells,
        "ms/cell",
        "one forward per cell",
        base / seconds["fast"],
        True,
    )
    section.add(
        f"{label}: fast engine vs batched reference",
        seconds["naive"] / seconds["fast"],
        "x",
        "--engine naive",
        seconds["naive"] / seconds["fast"],
    )
    diff = max(float(np.abs(tables["fast"][la] - tables["per-cell"][la]).max()) for la in layers)
    section.add(f"{label}: max |fast - per-cell| score", diff, "abs")
    size = max(float(np.abs(tables["per-cell"][la]).max()) for la in layers)
    section.add(f"{label}: the same, over max |per-cell score|", diff / size, "relative")
    section.notes.append(
        f"{label}: {len(test)} held-out pairs = {len(texts)} texts x layers {layers} x multipliers "
        f"{list(multipliers)} = {cells} cells; vectors from {len(train)} training pairs"
    )


def run(bench: Bench) -> Section:
    multipliers = bench.pick((-1.0, 0.0, 1.0), MULTIPLIERS)
    n_layers = bench.pick(2, 3)
    section = Section(
        "sweep",
        "engine level, scores only (caa.evaluation.engines.run_grid); "
        "'one forward per cell' is the paper's loop: "
        "one unbatched pass per text, layer and multiplier",
    )
    run_kind(bench, section, "sycophancy", bench.pick(3, 8, gpu=32), n_layers, multipliers)
    run_kind(bench, section, "sentiment", bench.pick(2, 3, gpu=8), n_layers, multipliers)
    return section
