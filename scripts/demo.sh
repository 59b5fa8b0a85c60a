#!/usr/bin/env bash
# The pipeline on the embedded SmolLM2-135M-Instruct and the datasets in data/ (run by `make demo`).
set -euo pipefail
OUT=${1:-demo-out}
CAA=".venv/bin/caa"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/3 ingest: every behavior in data/ -> $OUT/pairs.parquet"
$CAA ingest data/sycophancy.json data/corrigibility.json data/myopic_reward.json \
  data/sentiment.jsonl data/formality.jsonl -o "$OUT/pairs.parquet"

step "2/3 extract: sentiment pairs, layers 4-20 of SmolLM2 -> $OUT/activations.parquet"
$CAA extract "$OUT/pairs.parquet" --model smollm2-135m --behavior sentiment --layers 4-20 \
  -o "$OUT/activations.parquet"

step "3/3 compute-vectors -> $OUT/vectors.parquet"
$CAA compute-vectors "$OUT/activations.parquet" -o "$OUT/vectors.parquet"

step "done"
echo "artifacts:"
ls -l "$OUT"/*.parquet
echo "Candidate layers for steering: test AUC near 1 and a large v/h (the vector's share of the residual norm)."
echo "(caa sweep and caa generate, which evaluate and apply the vectors, are the next stages: not in this release yet.)"
