"""lm-evaluation-harness, the real one, loading `caa export --format lm-eval` on the embedded SmolLM2:
its steered model scores held-out A/B questions as `caa sweep --steer-positions all` scores them
(slow: still run by make test; needs lm-eval, which make install installs, and fails in CI without it).

The questions go to lm-eval as a local multiple-choice task (a YAML file and a JSONL file written here):
each context is the prompt caa scores, the chat template's text up to the answer letter, and the two
choices are the letters, so lm-eval's log-likelihood of each letter is caa's log-probability of it at
the answer position, and its normalised p(matching) is the sweep's score.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from caa.cli import app
from caa.core.prompts import completion_text, prompt_format
from caa.models.cache import transformers_path
from caa.stages.vectors import VectorSet
from tests.helpers import DATA, held_out, require_lm_eval
from tests.test_bad_inputs import _one_torch_thread

pytestmark = pytest.mark.slow
runner = CliRunner()
LAYER, MULTIPLIER = 12, 4.0
# Both sides run the same float32 weights on the CPU; they differ only in how the float32 sums are
# ordered (lm-eval: context and letter in one right-padded batch; caa: the prompt's KV cache reused,
# left padding): measured here, the scores differ by at most 2.3e-6. caa's own engines are held to
# 5e-5 against an unbatched reference (tests/test_smollm2.py). Steering at x4 moves every item by
# 7e-3 or more (measured), so the crossed comparisons below fail by over ten times this tolerance.
# (The accuracies alone could not tell: 6 of 9 both steered and not.)
TOLERANCE = 1e-4
TASK = """\
task: caa_ab
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
"""


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """A 135M model on short prompts: a second thread halves little and spins a lot on a busy machine
    (measured here: 29 s of CPU time for the whole test on one thread, 65 s on two)."""
    with _one_torch_thread():
        yield


def cli(*args: object) -> None:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def _write_task(pairs: pd.DataFrame, model_dir: str, tmp_path: Path) -> Path:
    """A directory holding the task caa_ab: per held-out pair, the context (the chat template's text
    and the answer's opening, "(") and its two letters, the matching one first."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    style = prompt_format(tokenizer)  # the sweep's: SmolLM2's chat template
    rows = []
    for pair in pairs.itertuples():
        match, other = completion_text("ab", pair.positive), completion_text("ab", pair.negative)  # "(A"
        assert match[:-1] == other[:-1]
        context = style.prefix(tokenizer, pair.prompt) + match[:-1]
        rows.append(
            {"pair_id": pair.pair_id, "context": context, "choices": [match[-1], other[-1]], "gold": 0}
        )
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "caa_ab.yaml").write_text(TASK.format(items=json.dumps(str(items))))
    return tasks


def _harness(lm_eval: Any, tasks: Path, model: str, model_args: str) -> tuple[pd.Series, float]:
    """lm-eval's p(matching) per pair (its two log-likelihoods, normalised) and its accuracy."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks), include_defaults=False)  # no indexing of its own tasks
    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["caa_ab"],
        task_manager=manager,
        log_samples=True,
        batch_size=4,
        device="cpu",
    )
    scores = {}
    for sample in out["samples"]["caa_ab"]:
        (match, _), (other, _) = sample["filtered_resps"]  # (log-likelihood, is greedy) per choice
        scores[sample["doc"]["pair_id"]] = 1.0 / (1.0 + math.exp(other - match))
    return pd.Series(scores).sort_index(), float(out["results"]["caa_ab"]["acc,none"])


def test_lm_eval_steered_model_scores_what_the_sweep_scores_at_every_position(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sycophancy on SmolLM2: a vector from 18 training questions at layer 12, exported at x4; lm-eval's
    steered model gives the held-out questions the sweep's scores at x4 under
    --steer-positions all, item by item, and unsteered lm-eval gives its scores at 0. Crossed, they
    disagree: the comparison can fail."""
    lm_eval = require_lm_eval()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))  # not the user's cache
    questions = tmp_path / "sycophancy.json"
    questions.write_text(json.dumps(json.loads((DATA / "sycophancy.json").read_text())[:24]))
    pairs, acts, vectors = tmp_path / "pairs.parquet", tmp_path / "acts.parquet", tmp_path / "vectors.parquet"
    steer, sweep = tmp_path / "sycophancy.pt", tmp_path / "sweep.parquet"
    cli("ingest", questions, "--test-fraction", "0.25", "-o", pairs)
    cli("extract", pairs, "--split", "train", "--layers", LAYER, "-o", acts)
    cli("compute-vectors", acts, "-o", vectors)
    cli("export", vectors, "--multiplier", MULTIPLIER, "-o", steer)
    grid = ["--layers", LAYER, "--multipliers", MULTIPLIER, "--steer-positions", "all", "--neutral-count", 1]
    cli("sweep", vectors, pairs, *grid, "-o", sweep)
    items = pd.read_parquet(tmp_path / "sweep.items.parquet").pivot(
        index="pair_id", columns="multiplier", values="score"
    )
    test = held_out(pairs)
    assert sorted(items.index) == sorted(test.pair_id) and len(items) >= 5

    model_dir = transformers_path(VectorSet.read(vectors).meta["model"])  # SmolLM2 converted to safetensors
    assert model_dir is not None
    tasks = _write_task(test, model_dir, tmp_path)
    # caa tokenizes a chat-templated prompt without adding special tokens (the template has its own)
    plain_args = f"pretrained={model_dir},add_bos_token=False,dtype=float32"
    steered, steered_acc = _harness(lm_eval, tasks, "steered", f"{plain_args},steer_path={steer}")
    plain, plain_acc = _harness(lm_eval, tasks, "hf", plain_args)

    caa_steered, caa_plain = items[MULTIPLIER].sort_index(), items[0.0].sort_index()
    np.testing.assert_allclose(steered.to_numpy(), caa_steered.to_numpy(), atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(plain.to_numpy(), caa_plain.to_numpy(), atol=TOLERANCE, rtol=0)
    assert steered_acc == float((caa_steered > 0.5).mean())
    assert plain_acc == float((caa_plain > 0.5).mean())
    # the control: unsteered scores are not the steered ones, on every item, by far more than the tolerance
    assert np.abs(plain.to_numpy() - caa_steered.to_numpy()).min() > 10 * TOLERANCE
    assert np.abs(steered.to_numpy() - caa_plain.to_numpy()).min() > 10 * TOLERANCE
