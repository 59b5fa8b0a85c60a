#!/usr/bin/env bash
# The paper's A/B behaviors on Qwen2.5-Coder-1.5B-Instruct, beside its Llama-2-7B-Chat figures (run by
# `make paper`): bash scripts/paper.sh [OUT]. Small enough for 2 CPU cores: 100 pairs per behavior
# (about 60 train, 40 held out), layers 8-16 extracted (the forward pass stops at 16), the layer of
# each behavior chosen from compute-vectors' diagnostics, then multipliers -2..2 on the held-out pairs,
# each under no system prompt, the card's positive one and its negative one (--prompting): steering
# against prompting, per behavior. About 7 minutes on 2 quiet CPU cores once the model is converted.
# CAA and PY may name another caa command and Python (e.g. "python -m caa" from a checkout).
set -euo pipefail
OUT=${1:-paper-out}
MODEL=${MODEL:-qwen2.5-coder-1.5b}
CAA=${CAA:-.venv/bin/caa}
PY=${PY:-.venv/bin/python}
BEHAVIORS="sycophancy corrigibility myopic_reward"
PAIRS=100
EXTRACT="8,10,12,14,16"
MULTIPLIERS="-2,-1,0,1,2"
# bfloat16: the forward pass is twice as fast as float32 on a CPU with AMX/AVX-512 bf16 (README).
DTYPE=${DTYPE:-bfloat16}
# Qwen's tokenizer merges "(" with the letter ("(A" is one token), so the token that predicts the answer
# is the prompt's last one: prompt-end steers it, as the paper's "(" was steered on Llama 2 (README).
POSITIONS=prompt-end
mkdir -p "$OUT/data"
export HF_HUB_OFFLINE=1
START=$(date +%s)

step() { printf '\n\033[1m== %s (%ds)\033[0m\n' "$*" "$(($(date +%s) - START))"; }

step "1/4 ingest: the first $PAIRS pairs of $BEHAVIORS, 40% held out -> $OUT/pairs.parquet"
for b in $BEHAVIORS; do
  $PY -c "
import json, sys
from caa.store.datasets import builtin
rows = json.loads(builtin('$b').path.read_text())[:$PAIRS]
json.dump(rows, open('$OUT/data/$b.json', 'w'), indent=1)"
done
$CAA ingest $(for b in $BEHAVIORS; do echo "$OUT/data/$b.json"; done) --test-fraction 0.4 \
  -o "$OUT/pairs.parquet" --force

step "2/4 extract: layers $EXTRACT of $MODEL ($DTYPE) -> $OUT/activations.parquet"
$CAA extract "$OUT/pairs.parquet" --model "$MODEL" --layers "$EXTRACT" --dtype "$DTYPE" \
  -o "$OUT/activations.parquet" --force

step "3/4 compute-vectors (the diagnostics choose each behavior's layer) -> $OUT/vectors.parquet"
$CAA compute-vectors "$OUT/activations.parquet" -o "$OUT/vectors.parquet" --force

# The layer of each behavior: the best held-out AUC of the projection on its vector (ties: the more
# consistent pair differences).
LAYERS=$($PY -c "
import pandas as pd
v = pd.read_parquet('$OUT/vectors.parquet')
for b, g in v.groupby('behavior'):
    best = g.sort_values(['test_auc', 'pair_consistency'], ascending=False).iloc[0]
    print(f'{b}={int(best.layer)}', end=' ')")
echo "layers chosen: $LAYERS"

step "4/4 sweep: each behavior at its layer, multipliers $MULTIPLIERS x system prompts, --steer-positions $POSITIONS"
for pick in $LAYERS; do
  b=${pick%=*}
  $CAA sweep "$OUT/vectors.parquet" "$OUT/pairs.parquet" --model "$MODEL" --behavior "$b" \
    --layers "${pick#*=}" --multipliers="$MULTIPLIERS" --steer-positions "$POSITIONS" --dtype "$DTYPE" \
    --neutral-count 4 --prompting -o "$OUT/sweep_$b.parquet" --force
done

step "the table"
$PY - "$OUT" "$BEHAVIORS" <<'EOF'
import sys
import pandas as pd

from caa.api import SweepResult, read_comparison, sentence

out, behaviors = sys.argv[1], sys.argv[2].split()
# Panickssery et al. 2024 (arXiv 2312.06681), Llama-2-7B-Chat, layer 13, A/B held-out questions,
# p(answer matching behavior) at multipliers -1 / 0 / +1 (the figures quoted in the README).
paper = {"corrigibility": (0.20, 0.64, 0.91), "sycophancy": (0.54, 0.69, 0.62)}
print("mean p(matching) on held-out A/B questions; multiplier = the raw factor on the mean-difference")
print("vector (not normalised), added at the layer's output from the prompt's last token on")
print()
head = f"{'behavior':<15}{'layer':>6}{'n':>4}  {'x-2':>6}{'x-1':>6}{'x0':>6}{'x+1':>6}{'x+2':>6}   paper L13 x-1/0/+1"
print(head)
print("-" * len(head))
def unprompted(b):
    t = pd.read_parquet(f"{out}/sweep_{b}.parquet")
    return t[t.system == "none"].set_index("multiplier")


for b in behaviors:
    t = unprompted(b)
    cells = "".join(f"{t.score_mean[m]:6.2f}" for m in (-2.0, -1.0, 0.0, 1.0, 2.0))
    ref = "/".join(f"{x:.2f}" for x in paper[b]) if b in paper else "not quoted"
    print(f"{b:<15}{int(t.layer.iloc[0]):>6}{int(t.n.iloc[0]):>4}  {cells}   {ref}")
print()
for b in behaviors:
    t = unprompted(b)
    gain = ", ".join(
        f"x{m:+g}: {t.delta[m]:+.3f} [{t.delta_low[m]:+.3f}, {t.delta_high[m]:+.3f}] KL {t.kl_mean[m]:.3f}"
        for m in (-1.0, 1.0)
    )
    print(f"{b}: gain over x0 with its paired 95% interval, fluency cost: {gain}")
print()
print("steering against prompting (the card's system prompts; gains over x0 without one, paired 95% intervals):")
head = f"{'behavior':<15}{'cell':>8}  {'steering':>8}{'prompt +':>10}{'prompt -':>10}{'both':>8}   verdict"
print(head)
print("-" * len(head))
lines = []
for b in behaviors:
    entry = SweepResult.read(f"{out}/sweep_{b}.parquet").meta["prompting"]["comparison"][b]
    if entry.get("cell") is None:
        print(f"{b:<15}  not compared: {entry['cell_kind']}")
        continue
    c = read_comparison(entry)
    minus = c.negative_prompt.mean if c.negative_prompt else float("nan")
    cell = f"x{entry['cell'][1]:+g}"
    verdict = f"{c.verdict} prompting; together: {c.adds_up}"
    print(f"{b:<15}{cell:>8}  {c.steering.mean:+8.3f}{c.prompt.mean:+10.3f}{minus:+10.3f}{c.both.mean:+8.3f}   {verdict}")
    lines.append(sentence(b, c))
print()
print("\n".join(lines))
EOF
step "done"
