#!/usr/bin/env bash
# The package as a user gets it: build the wheel, install it into a fresh virtual environment outside
# the checkout, and run caa from an empty directory. An install that works only inside the repository
# (a file read from data/ by a relative path, a module or data file left out of the wheel) fails here.
# Run by .ci/run after `make test` (which made .venv): `bash scripts/check_wheel.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
PIP=(-m pip install -q --disable-pip-version-check)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/caa-wheel.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
export HF_HUB_OFFLINE=1
unset PYTHONPATH

echo "== wheel: build from the checkout's files (a copy: no stale build/ leaks in)"
mkdir "$TMP/src" "$TMP/run"
git ls-files -z --cached --others --exclude-standard |
  tar --null --files-from=- --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$TMP/src"
.venv/bin/python -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
  -w "$TMP/dist" "$TMP/src"
WHEEL=$(ls "$TMP"/dist/caa-*.whl)
echo "built $(basename "$WHEEL")"

echo "== wheel: install into a fresh virtual environment (torch pinned first: its CPU wheel, no CUDA)"
"$PYTHON" -m venv "$TMP/venv"
"$TMP/venv/bin/python" "${PIP[@]}" torch==2.13.0
"$TMP/venv/bin/python" "${PIP[@]}" "$WHEEL"

echo "== wheel: run from an empty directory"
cd "$TMP/run"
CAA="$TMP/venv/bin/caa"
where=$("$TMP/venv/bin/python" -c "import caa, caa.store.datasets; print(caa.__file__, caa.store.datasets.data_dir())")
case "$where" in
  "$TMP/venv/"*" $TMP/venv/"*) echo "caa and its data from the wheel: $where" ;;
  *) echo "error: caa or its data is not the installed wheel's: $where" >&2; exit 1 ;;
esac
"$CAA" --help >/dev/null
"$CAA" datasets
"$CAA" ingest sentiment -o x.parquet
"$TMP/venv/bin/python" -c "
import pyarrow.parquet as pq
n = pq.read_metadata('x.parquet').num_rows
assert n == 194, n
print(f'x.parquet: {n} pairs')"

echo "== wheel: extract, compute-vectors and sweep (default neutral texts: the packaged ones) on a tiny model"
"$TMP/venv/bin/python" -c "
import sys; from pathlib import Path
sys.path.insert(0, '$ROOT')  # only to build the model: the test suite's tiny-model builder
from tests.tiny_models import save_tiny_model
save_tiny_model('llama', Path('tiny'))" 2>/dev/null
"$CAA" extract x.parquet -m ./tiny --layers 1,2 --split train --truncate -o acts.parquet >/dev/null
"$CAA" compute-vectors acts.parquet -o vectors.parquet >/dev/null
"$CAA" sweep vectors.parquet x.parquet -m ./tiny --multipliers -1,1 --max-pairs 2 --neutral-count 2 \
  --truncate -o sweep.parquet >/dev/null
"$TMP/venv/bin/python" -c "
import json, pyarrow.parquet as pq
meta = json.loads(pq.read_schema('sweep.parquet').metadata[b'caa'])
neutral = meta['options']['neutral']
assert neutral.startswith('$TMP/venv/') and neutral.endswith('neutral_prompts.txt'), neutral
print('sweep from the wheel, neutral texts:', neutral)"
echo "== wheel: ok"
