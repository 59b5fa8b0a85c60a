"""End to end: a whole `caa sweep` run (process start, model load, scores and fluency cost) with the
default engine against `--engine naive`, on the same grid, each in its own process; both times (the
full grid: the best of three default and two naive runs, interleaved), their ratio and the largest
difference between the two tables.

Grid (full): 24 held-out sycophancy questions x 5 layers (8, 11, 14, 17, 20) x multipliers -2..2,
16 neutral prompts, on the embedded SmolLM2 (the CLI loads a model by name: the Llama shapes use
SmolLM2 here; the tiny shape is saved to a directory and loaded from there). The vectors are made
first, in this process, from 48 training pairs (not timed).
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pandas as pd
from bench_common import EMBEDDED, ROOT, Bench, Section, spread_layers

import caa
from caa.stages.ingest import PairSet

CAA = [sys.executable, "-m", "caa"]


def run_cli(args: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run([*CAA, *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"caa {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def cli_model(bench: Bench) -> tuple[str, caa.LoadedModel, str]:
    """(the -m argument, the same model in this process, what it is)."""
    if bench.shape == "tiny":
        directory = bench.workdir / "tiny-model"
        bench.loaded.model.save_pretrained(directory, safe_serialization=True)
        bench.loaded.tokenizer.save_pretrained(directory)
        return str(directory), caa.load_model(str(directory), device="cpu"), "the tiny random shape, saved"
    if bench.shape == "smollm2":
        return EMBEDDED, bench.loaded, "SmolLM2-135M-Instruct"
    return EMBEDDED, caa.load_model(EMBEDDED), "SmolLM2-135M-Instruct (the CLI loads models by name)"


def run(bench: Bench) -> Section:
    work = bench.workdir / "sweep-cli"
    work.mkdir(parents=True, exist_ok=True)
    spec, loaded, what = cli_model(bench)
    layers = [8, 11, 14, 17, 20] if loaded.num_layers >= 24 else spread_layers(loaded.num_layers, 5)
    layers = bench.pick(layers[::2], layers)
    questions = bench.pick(6, 24)
    multipliers = bench.pick("-1,0,1", "-2,-1,0,1,2")
    neutral = bench.pick(4, 16)
    pairs = caa.ingest(ROOT / "data" / "sycophancy.json")
    path = pairs.save(work / "pairs.parquet")
    train = PairSet(pairs.select("train").frame.head(48), pairs.meta, path)  # vectors: not timed
    acts = caa.extract(loaded, train, caa.ExtractOptions(layers=tuple(layers)))
    caa.compute_vectors(acts).save(work / "vectors.parquet")
    bench.log(f"sweep-cli: vectors made ({what})")
    grid = [
        "sweep", str(work / "vectors.parquet"), str(work / "pairs.parquet"), "-m", spec,
        "--max-pairs", str(questions), "--multipliers", multipliers, "--neutral-count", str(neutral),
        "--layers", ",".join(map(str, layers)),
    ]  # fmt: skip
    # interleaved, the best of each: a shared machine's load comes and goes over minutes
    runs: dict[str, list[float]] = {"fast": [], "naive": []}
    for engine in bench.pick(["fast", "naive"], ["fast", "naive", "fast", "naive", "fast"]):
        out = work / f"{engine}.parquet"
        runs[engine].append(run_cli([*grid, "--engine", engine, "-o", str(out), "--force"]))
        bench.log(f"sweep-cli: caa sweep --engine {engine} {runs[engine][-1]:.1f} s")
    seconds = {engine: min(times) for engine, times in runs.items()}
    tables = {e: pd.read_parquet(work / f"{e}.parquet") for e in seconds}
    columns = ["score_mean", "kl_mean", "perplexity"]
    # relative: a random model's perplexity is in the tens of thousands
    diff = max(
        float(
            (
                np.abs(tables["fast"][c] - tables["naive"][c]) / np.maximum(1.0, np.abs(tables["naive"][c]))
            ).max()
        )
        for c in columns
    )
    section = Section(
        "sweep-cli",
        f"`caa sweep` end to end on {what}: {questions} held-out sycophancy questions x layers {layers} "
        f"x multipliers {multipliers}, {neutral} neutral prompts, default device; each the best of "
        + ", ".join(
            f"{engine} " + " / ".join(f"{t:.1f}" for t in times) + " s" for engine, times in runs.items()
        ),
    )
    section.add("caa sweep --engine naive", seconds["naive"], "s")
    section.add(
        "caa sweep (default, fast)",
        seconds["fast"],
        "s",
        "--engine naive",
        seconds["naive"] / seconds["fast"],
        True,
    )
    section.add("max table difference (score, KL, perplexity)", diff, "relative")
    return section
