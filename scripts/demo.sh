#!/usr/bin/env bash
# The whole pipeline on an embedded model and the sentiment data (run by `make demo`, or
# `make demo MODEL=gemma3-270m`, `make demo MODEL=qwen2.5-coder-1.5b`): bash scripts/demo.sh [OUT] [MODEL];
# MODEL may also come from the environment. Default: SmolLM2-135M-Instruct. Layers and multipliers are
# the ones a wider sweep showed to work on each model (see README); Qwen's are SmolLM2's relative
# depths (measured: both steer, see README), and it runs in bfloat16 (twice as fast as float32 on a
# CPU with AMX).
set -euo pipefail
OUT=${1:-demo-out}
MODEL=${2:-${MODEL:-smollm2-135m}}
CAA=".venv/bin/caa"
PY=".venv/bin/python"
DTYPE=auto
case "$MODEL" in
  # PROMPTING: the layer where steering meets the system prompts (the sweep's best layer; see README)
  smollm2-135m) EXTRACT="4-20"; LAYERS="12,18"; PROMPTING=18 ;;  # 30 blocks; keep in step with tests/test_smollm2.py
  gemma3-270m) EXTRACT="all"; LAYERS="6,12"; PROMPTING=12 ;;     # 18 blocks: the same depths (1/3, 2/3); see README
  qwen2.5-coder-1.5b) EXTRACT="4-17"; LAYERS="11,17"; PROMPTING=17; DTYPE=bfloat16 ;;  # 28 blocks: SmolLM2's depths
  *) echo "demo.sh: no demo layers for model '$MODEL' (smollm2-135m, gemma3-270m or qwen2.5-coder-1.5b)" >&2
     exit 2 ;;
esac
MULTIPLIERS="-4,-2,0,2,4"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/5 ingest: every behavior in data/ -> $OUT/pairs.parquet"
$CAA ingest data/sycophancy.json data/corrigibility.json data/myopic_reward.json \
  data/sentiment.jsonl data/formality.jsonl -o "$OUT/pairs.parquet"

step "2/5 extract: sentiment pairs, layers $EXTRACT of $MODEL -> $OUT/activations.parquet"
$CAA extract "$OUT/pairs.parquet" --model "$MODEL" --dtype "$DTYPE" --behavior sentiment --layers "$EXTRACT" \
  -o "$OUT/activations.parquet"

step "3/5 compute-vectors -> $OUT/vectors.parquet"
$CAA compute-vectors "$OUT/activations.parquet" -o "$OUT/vectors.parquet"

step "4/5 sweep: layers $LAYERS x multipliers $MULTIPLIERS on 16 held-out pairs, and against prompting at layer $PROMPTING -> $OUT/sweep.parquet, sweep.items.parquet, sweep.png"
# --prompting: the same pairs under the card's system prompts (warm / gloomy tone), crossed with the
# multipliers at layer $PROMPTING, and steering's gain against the prompt's, each with its 95% interval
$CAA sweep "$OUT/vectors.parquet" "$OUT/pairs.parquet" --model "$MODEL" --dtype "$DTYPE" --behavior sentiment --layers "$LAYERS" \
  --multipliers "$MULTIPLIERS" --max-pairs 16 --neutral-count 8 --max-kl 0.5 \
  --prompting --prompting-layer "$PROMPTING" -o "$OUT/sweep.parquet"

# The recommendation is in the sweep file's metadata: any Parquet reader gets it.
# (When no cell steers reliably, the demo still shows the best one, as the sweep said.)
read -r LAYER MULT < <($PY -c "
import json, pyarrow.parquet as pq
meta = json.loads(pq.read_schema('$OUT/sweep.parquet').metadata[b'caa'])
layer, mult = meta['recommended']['sentiment'] or meta['best_unreliable']['sentiment']
print(layer, f'{mult:g}')")

step "5/5 generate: layer $LAYER, multipliers -$MULT, 0, +$MULT on three neutral prompts -> $OUT/generations.parquet"
$CAA generate --vectors "$OUT/vectors.parquet" --model "$MODEL" --dtype "$DTYPE" --behavior sentiment --layer "$LAYER" \
  --multipliers="-$MULT,0,$MULT" --prompts data/neutral_prompts.txt --limit 3 --max-new-tokens 40 \
  -o "$OUT/generations.parquet"

step "report: every artifact in $OUT on one self-contained page -> $OUT/report.html"
$CAA report "$OUT" -o "$OUT/report.html"

step "done"
echo "artifacts:"
ls -l "$OUT"
echo "Read the plot: $OUT/sweep.png (score vs multiplier per layer, the KL cost beside it, and each"
echo "held-out pair's slope per layer: the ones below 0 steer backwards)."
echo "Left column: steered towards negative sentiment; right column: towards positive."
echo "The whole run on one page (works offline): $OUT/report.html"
echo
echo "Serve the steered model (OpenAI-compatible, steering chosen per request; the first time builds"
echo ".venv-serve with vLLM: about 2 minutes, 2.6 GB):"
echo "  make serve VECTORS=$OUT/vectors.parquet        # or: .venv-serve/bin/caa serve $OUT/vectors.parquet"
echo "then, from another shell, the curl line it prints (\"steering\": {\"behavior\": \"sentiment\", \"layer\": $LAYER, ...})."
