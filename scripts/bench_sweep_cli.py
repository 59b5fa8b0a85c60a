"""A whole `caa sweep` run, end to end (process start, model load, scores and fluency cost), with the
default engine against `--engine naive`, on the same grid; prints both times, their ratio and the
largest difference between the two tables.

Default grid (the one of the "default sweep" measurements): 24 held-out sycophancy questions x 5
layers (8, 11, 14, 17, 20) x multipliers -2..2 on the embedded SmolLM2, 16 neutral prompts. The
vectors are made first (extract + compute-vectors on the training pairs; not timed). Usage:
    python scripts/bench_sweep_cli.py [--behavior sycophancy] [--layers 8,11,14,17,20]
        [--questions 24] [--steer-positions answer] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
CAA = [sys.executable, "-m", "caa"]


def run(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([*CAA, *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--behavior", default="sycophancy")
    parser.add_argument("--layers", default="8,11,14,17,20")
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument("--multipliers", default="-2,-1,0,1,2")
    parser.add_argument("--steer-positions", default="answer")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="caa-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    pairs, acts, vectors = work / "pairs.parquet", work / "acts.parquet", work / "vectors.parquet"
    if not vectors.exists():
        run(["ingest", args.behavior, "-o", str(pairs), "--force"])
        run(["extract", str(pairs), "--split", "train", "--layers", args.layers, "-o", str(acts)])
        run(["compute-vectors", str(acts), "-o", str(vectors)])
    grid = [
        "sweep", str(vectors), str(pairs), "--max-pairs", str(args.questions), "--multipliers",
        args.multipliers, "--steer-positions", args.steer_positions,
    ]  # fmt: skip
    seconds = {}
    for engine in ("fast", "naive"):
        seconds[engine] = run([*grid, "--engine", engine, "-o", str(work / f"{engine}.parquet")])
        print(f"caa sweep --engine {engine}: {seconds[engine]:.1f} s", flush=True)
    tables = {e: pd.read_parquet(work / f"{e}.parquet") for e in seconds}
    columns = ["score_mean", "kl_mean", "perplexity"]
    diff = max(float(np.abs(tables["fast"][c] - tables["naive"][c]).max()) for c in columns)
    layers = len(args.layers.split(","))
    print(
        f"{args.behavior}, {args.questions} questions x {layers} layers x multipliers {args.multipliers}, "
        f"--steer-positions {args.steer_positions}, SmolLM2-135M on CPU: default (fast) is "
        f"{seconds['naive'] / seconds['fast']:.1f}x --engine naive end to end; "
        f"max table difference {diff:.1e}"
    )


if __name__ == "__main__":
    main()
