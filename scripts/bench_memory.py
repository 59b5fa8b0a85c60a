"""Memory: the peak resident set of `caa extract` at 1k and 10k pairs, and of `caa sweep` at 100 and
1,000 held-out items, each a real CLI run in its own process, three at a time (nothing here is timed;
its max RSS, read with
getrusage(RUSAGE_CHILDREN) by a one-line wrapper process, as /usr/bin/time does), against the peak of
a process that only imports caa and loads the same model. Bounded memory means the larger run peaks
near the smaller one, not 10x higher.

Model: the test suite's tiny random Llama (tests/tiny_models.py: hidden 32, 4 layers, a small
byte-level BPE tokenizer), so the runs take seconds; pairs are short synthetic ones.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_common import ROOT, Bench, Section, synthetic_records

import caa
from caa.stages.ingest import PairSet

# run argv[1:] as a child and print its peak RSS in MiB (Linux reports ru_maxrss in KiB)
WRAPPER = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)"
)


def peak_rss(args: list[str]) -> float:
    """Peak RSS (MiB) of ``python args...`` in a fresh process."""
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, sys.executable, *args], cwd=ROOT, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def tiny_model(work: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.tiny_models import save_tiny_model

    return save_tiny_model("llama", work / "tiny-llama")


def extract_runs(model: Path, work: Path, sizes: tuple[int, int]) -> dict[int, list[str]]:
    runs = {}
    for n in sizes:
        pairs = caa.ingest(synthetic_records(n), caa.IngestOptions(behavior="days", test_fraction=0.0))
        path = pairs.save(work / f"pairs-{n}.parquet")
        out = work / f"acts-{n}.parquet"
        runs[n] = ["-m", "caa", "extract", str(path), "-m", str(model), "-o", str(out), "--batch-size", "64"]
    return runs


def sweep_runs(model: Path, work: Path, sizes: tuple[int, int]) -> dict[int, list[str]]:
    """One pairs file with enough held-out questions for the larger run; vectors from 32 training
    pairs, made in this process; the sweeps differ only in --max-pairs."""
    pairs = caa.ingest(
        synthetic_records(int(sizes[1] * 2.4), ab=True), caa.IngestOptions(behavior="days", test_fraction=0.5)
    )
    path = pairs.save(work / "sweep-pairs.parquet")
    train = PairSet(pairs.select("train").frame.head(32), pairs.meta, path)
    loaded = caa.load_model(str(model), device="cpu")
    vectors = caa.compute_vectors(caa.extract(loaded, train, caa.ExtractOptions(layers=(1, 2))))
    vectors.save(work / "sweep-vectors.parquet")
    return {
        n: [
            "-m",
            "caa",
            "sweep",
            str(work / "sweep-vectors.parquet"),
            str(path),
            "-m",
            str(model),
            "--max-pairs",
            str(n),
            "--multipliers",
            "-1,0,1",
            "--neutral-count",
            "4",
            "-o",
            str(work / f"sweep-{n}.parquet"),
        ]
        for n in sizes
    }


def run(bench: Bench) -> Section:
    work = bench.workdir / "memory"
    work.mkdir(parents=True, exist_ok=True)
    model = tiny_model(work)
    ex_sizes = bench.pick((100, 1000), (1000, 10000))
    sw_sizes = bench.pick((20, 200), (100, 1000))
    runs = {
        "base": ["-c", f"import caa; caa.load_model({str(model)!r}, device='cpu')"],
        **{("extract", n): args for n, args in extract_runs(model, work, ex_sizes).items()},
        **{("sweep", n): args for n, args in sweep_runs(model, work, sw_sizes).items()},
    }
    with ThreadPoolExecutor(max_workers=3) as pool:  # nothing here is timed: run side by side
        peaks = dict(zip(runs, pool.map(peak_rss, runs.values()), strict=True))
    base = peaks["base"]
    ex = {n: peaks["extract", n] for n in ex_sizes}
    sw = {n: peaks["sweep", n] for n in sw_sizes}
    bench.log(f"memory: import + model load {base:.0f} MiB")
    bench.log("memory: extract " + ", ".join(f"{n} pairs {p:.0f} MiB" for n, p in ex.items()))
    bench.log("memory: sweep " + ", ".join(f"{n} items {p:.0f} MiB" for n, p in sw.items()))
    section = Section(
        "memory",
        "peak RSS of whole CLI runs, each in its own process, on the tiny random Llama of the tests "
        "(hidden 32, 4 layers) with short synthetic pairs; extract: all layers, batch size 64; "
        "sweep: A/B, layers 1-2 x multipliers -1,0,1, 4 neutral prompts",
    )
    section.add("import caa + load the model", base, "MiB")
    (a, b), (c, d) = ex_sizes, sw_sizes
    section.add(f"caa extract, {a} pairs", ex[a], "MiB", "import + load", ex[a] / base)
    section.add(f"caa extract, {b} pairs", ex[b], "MiB", f"{a} pairs", ex[b] / ex[a], True)
    section.add(f"caa sweep, {c} items", sw[c], "MiB", "import + load", sw[c] / base)
    section.add(f"caa sweep, {d} items", sw[d], "MiB", f"{c} items", sw[d] / sw[c], True)
    section.notes.append(
        f"growth above import + load: extract {ex[a] - base:.0f} -> {ex[b] - base:.0f} MiB, "
        f"sweep {sw[c] - base:.0f} -> {sw[d] - base:.0f} MiB, for 10x the data"
    )
    return section
