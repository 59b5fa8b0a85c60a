"""Scaling: how extraction and the sweep's fast engine grow with the number of pairs, the number of
layers and the sequence length, 3-4 points each on short synthetic pairs, with the exponent of a
least-squares fit of log(time) on log(size): 1.0 is linear, 2.0 quadratic.

- extract: `caa extract`'s code path; layers = the first k blocks (the forward pass stops after the
  deepest requested one); length = filler words added to each prompt (x = mean tokens per text).
- sweep: the fast engine on A/B questions, random vectors (speed does not depend on their values),
  scores only; layers = the first k layers swept; length = filler words in each question.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
import torch
from bench_common import Bench, Section, loglog_exponent, synthetic_records

from caa.core.prompts import prompt_format
from caa.evaluation.engines import run_grid
from caa.evaluation.scoring import ab_scores
from caa.stages.extract import encode_pairs, extract_activations
from caa.stages.ingest import ingest_records, pairs_table
from caa.stages.sweep import ab_text


def frame_of(records: list[dict[str, str]]) -> pd.DataFrame:
    frame = pairs_table(ingest_records(records, behavior="days", test_fraction=0.0).pairs).to_pandas()
    frame["split"] = frame["split"].astype(str)
    return frame


def mean_tokens(bench: Bench, frame: pd.DataFrame) -> float:
    items = encode_pairs(frame, bench.loaded, prompt_format(bench.loaded.tokenizer), "last")
    return sum(len(it.encoded.input_ids) for it in items) / len(items)


def best_time(bench: Bench, fn: Callable[[], object]) -> float:
    return bench.timed(fn)[0]


def extract_time(bench: Bench, frame: pd.DataFrame, depth: int) -> float:
    layers = list(range(depth))
    batch_size = 64 if bench.cuda else 16
    return best_time(
        bench, lambda: list(extract_activations(frame, bench.loaded, layers, batch_size=batch_size))
    )


def sweep_time(bench: Bench, frame: pd.DataFrame, layers: Sequence[int]) -> float:
    loaded = bench.loaded
    style = prompt_format(loaded.tokenizer)
    texts = [ab_text(loaded, style, r.prompt, r.positive, r.negative) for r in frame.itertuples()]
    generator = torch.Generator().manual_seed(0)
    vectors = {la: torch.randn(loaded.hidden_size, generator=generator) for la in layers}
    multipliers = bench.pick([-1.0, 0.0, 1.0], [-2.0, -1.0, 0.0, 1.0, 2.0])
    return best_time(
        bench, lambda: run_grid("fast", loaded, texts, vectors, multipliers, ab_scores, "answer")
    )


def depths(n_layers: int, quick: bool) -> list[int]:
    points = [n_layers // 8, n_layers // 4, n_layers // 2, n_layers]
    points = sorted({max(1, p) for p in points})
    return points[-3:] if quick else points


def fit(
    bench: Bench, section: Section, stage: str, axis: str, xs: list[float], run: Callable[[int], float]
) -> None:
    ys = [run(i) for i in range(len(xs))]
    exponent = loglog_exponent(xs, ys)
    section.add(f"{stage} time vs {axis}", exponent, "exponent", headline=axis == "pairs")
    section.series[f"{stage} vs {axis}"] = {"x": xs, "seconds": ys}
    points = ", ".join(f"{x:g}: {y:.2f} s" for x, y in zip(xs, ys, strict=True))
    section.notes.append(f"{stage} vs {axis}: {points}")
    bench.log(f"scaling: {stage} vs {axis}: exponent {exponent:.2f} ({points})")


def run(bench: Bench) -> Section:
    n = bench.loaded.num_layers
    counts = bench.pick([4, 8, 16], [8, 16, 32, 64], gpu=[32, 64, 128, 256])
    words = bench.pick([4, 32, 96], [4, 24, 64, 160])
    fixed = bench.pick(4, 16, gpu=64)
    section = Section(
        "scaling",
        f"fitted exponent of time in size (log-log least squares); fixed: {fixed} pairs, all "
        f"{n} layers for extract and 1 layer for the sweep, short texts",
    )
    extract_warm = frame_of(synthetic_records(4))
    extract_time(bench, extract_warm, n)  # warm-up
    ex_frames = [frame_of(synthetic_records(c)) for c in counts]
    fit(
        bench,
        section,
        "extract",
        "pairs",
        list(map(float, counts)),
        lambda i: extract_time(bench, ex_frames[i], n),
    )
    base = frame_of(synthetic_records(fixed))
    ds = depths(n, bench.quick)
    fit(bench, section, "extract", "layers", list(map(float, ds)), lambda i: extract_time(bench, base, ds[i]))
    long = [frame_of(synthetic_records(fixed, w)) for w in words]
    lengths = [mean_tokens(bench, f) for f in long]
    fit(bench, section, "extract", "tokens per text", lengths, lambda i: extract_time(bench, long[i], n))

    middle = [n // 2]
    sweep_time(bench, frame_of(synthetic_records(2, ab=True)), middle)  # warm-up
    sw_frames = [frame_of(synthetic_records(c, ab=True)) for c in counts]
    fit(
        bench,
        section,
        "sweep",
        "pairs",
        list(map(float, counts)),
        lambda i: sweep_time(bench, sw_frames[i], middle),
    )
    sw_base = frame_of(synthetic_records(fixed, ab=True))
    ks = sorted({max(1, min(k, n - 1)) for k in bench.pick([1, 2, 4], [1, 2, 4, 8])})
    fit(
        bench,
        section,
        "sweep",
        "layers",
        list(map(float, ks)),
        lambda i: sweep_time(bench, sw_base, list(range(1, ks[i] + 1))),
    )
    sw_long = [frame_of(synthetic_records(fixed, w, ab=True)) for w in words]
    sw_lengths = [mean_tokens(bench, f) for f in sw_long]
    fit(
        bench,
        section,
        "sweep",
        "tokens per text",
        sw_lengths,
        lambda i: sweep_time(bench, sw_long[i], middle),
    )
    return section
