#!/usr/bin/env bash
# The GPU checks in one command, for a CUDA machine that has the stack (torch, transformers,
# accelerate, pandas, pyarrow, typer, rich, pytest) but no network and no embedded model:
#   1. `pytest -m gpu` (tests/test_gpu.py; CAA_GPU_TESTS_ON=cuda makes a missing GPU a failure);
#   2. the benchmarks on the random-weight Llama 3.2 1B and Llama 3.1 8B shapes in bf16: sections
#      extract, generate, sweep and scaling (sweep-cli and memory load the embedded model by name).
# Each step has its own time limit, and the next runs whatever the last one did; the bench writes
# its table after every section, so a step cut short keeps what it finished.
#
#   scripts/gpu_check.sh OUT_DIR TOKENIZER_DIR
#
# TOKENIZER_DIR holds SmolLM2's tokenizer files (tokenizer.json, tokenizer_config.json): copy them
# from the converted embedded model in caa's cache (~/.cache/caa/models/<hash>/) on a machine that
# has it. Results: OUT_DIR/log, OUT_DIR/<shape>/results.{md,json}.
set -u
out=${1:?usage: scripts/gpu_check.sh OUT_DIR TOKENIZER_DIR}
tokenizer=${2:?usage: scripts/gpu_check.sh OUT_DIR TOKENIZER_DIR}
PYTEST_SECONDS=${PYTEST_SECONDS:-120}
BENCH_SECONDS=${BENCH_SECONDS:-180}
SHAPES=${SHAPES:-llama-1b llama-8b}
SECTIONS=${SECTIONS:-extract,generate,sweep,scaling}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu SHAPES=tiny: a rehearsal of this script where no GPU is
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
{
  # caa itself, without its dependencies (nothing to download): an editable install maps caa._data
  # to data/; where pip cannot build it, the checkout on the path with caa/_data linked to data/
  if ! "$PY" -c 'import caa.store.datasets as d; d.data_dir()' >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . ||
      { ln -sfn ../data caa/_data && export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; }
  fi
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" -c 'import sys, torch, transformers, accelerate
print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__,
      "accelerate", accelerate.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'
  echo "== pytest -m gpu (limit ${PYTEST_SECONDS} s)"
  start=$SECONDS
  CAA_GPU_TESTS_ON=$DEVICE timeout "$PYTEST_SECONDS" "$PY" -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_gpu.py
  echo "== pytest exit $? after $((SECONDS - start)) s"
  for shape in $SHAPES; do
    echo "== bench $shape (limit ${BENCH_SECONDS} s)"
    start=$SECONDS
    timeout "$BENCH_SECONDS" "$PY" scripts/bench.py --device "$DEVICE" --shape "$shape" \
      --tokenizer "$tokenizer" --only "$SECTIONS" --out "$out/$shape"
    echo "== bench $shape exit $? after $((SECONDS - start)) s"
  done
} 2>&1 | tee "$out/log"
