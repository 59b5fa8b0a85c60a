#!/usr/bin/env bash
# The whole pipeline on the embedded SmolLM2-135M-Instruct and the sentiment data (run by `make demo`).
# Layers and multipliers are the ones a wider sweep showed to work on this model (see README).
set -euo pipefail
OUT=${1:-demo-out}
CAA=".venv/bin/caa"
PY=".venv/bin/python"
LAYERS="12,18"               # keep in step with tests/test_smollm2.py
MULTIPLIERS="-4,-2,0,2,4"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/5 ingest: every behavior in data/ -> $OUT/pairs.parquet"
$CAA ingest data/sycophancy.json data/corrigibility.json data/myopic_reward.json \
  data/sentiment.jsonl data/formality.jsonl -o "$OUT/pairs.parquet"

step "2/5 extract: sentiment pairs, layers 4-20 of SmolLM2 -> $OUT/activations.parquet"
$CAA extract "$OUT/pairs.parquet" --model smollm2-135m --behavior sentiment --layers 4-20 \
  -o "$OUT/activations.parquet"

step "3/5 compute-vectors -> $OUT/vectors.parquet"
$CAA compute-vectors "$OUT/activations.parquet" -o "$OUT/vectors.parquet"

step "4/5 sweep: layers $LAYERS x multipliers $MULTIPLIERS on 16 held-out pairs -> $OUT/sweep.parquet, sweep.items.parquet, sweep.png"
$CAA sweep "$OUT/vectors.parquet" "$OUT/pairs.parquet" --behavior sentiment --layers "$LAYERS" \
  --multipliers "$MULTIPLIERS" --max-pairs 16 --neutral-count 8 --max-kl 0.5 -o "$OUT/sweep.parquet"

# The recommendation is in the sweep file's metadata: any Parquet reader gets it.
# (When no cell steers reliably, the demo still shows the best one, as the sweep said.)
read -r LAYER MULT < <($PY -c "
import json, pyarrow.parquet as pq
meta = json.loads(pq.read_schema('$OUT/sweep.parquet').metadata[b'caa'])
layer, mult = meta['recommended']['sentiment'] or meta['best_unreliable']['sentiment']
print(layer, f'{mult:g}')")

step "5/5 generate: layer $LAYER, multipliers -$MULT, 0, +$MULT on three neutral prompts -> $OUT/generations.parquet"
$CAA generate --vectors "$OUT/vectors.parquet" --behavior sentiment --layer "$LAYER" \
  --multipliers="-$MULT,0,$MULT" --prompts data/neutral_prompts.txt --limit 3 --max-new-tokens 40 \
  -o "$OUT/generations.parquet"

step "done"
echo "artifacts:"
ls -l "$OUT"
echo "Read the plot: $OUT/sweep.png (score vs multiplier per layer, the KL cost beside it, and each"
echo "held-out pair's slope per layer: the ones below 0 steer backwards)."
echo "Left column: steered towards negative sentiment; right column: towards positive."
