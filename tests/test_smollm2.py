"""The embedded SmolLM2 model, end to end through the real loader (slow: still run by make test)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from caa.cli import app
from caa.core.prompts import encode, prompt_format
from caa.models.loading import load_model
from caa.stages.ingest import read_pairs
from caa.stages.vectors import VectorSet
from tests.helpers import DATA

pytestmark = pytest.mark.slow
runner = CliRunner()
LAYERS = [10, 15, 20]
DEMO_LAYERS = "12,18"  # keep in step with scripts/demo.sh
DEMO_MULTIPLIERS = "-4,-2,0,2,4"


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "caa-cache"


def test_vectors_match_a_naive_unbatched_reference(
    tmp_path: Path, shared_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAA_CACHE", str(shared_cache))
    import json

    subset = tmp_path / "sycophancy.json"  # 60 questions keep the naive reference loop short
    subset.write_text(json.dumps(json.loads((DATA / "sycophancy.json").read_text())[:60]))
    pairs = tmp_path / "pairs.parquet"
    assert runner.invoke(app, ["ingest", str(subset), "-o", str(pairs)]).exit_code == 0
    acts, vectors = tmp_path / "acts.parquet", tmp_path / "vectors.parquet"
    result = runner.invoke(
        app,
        [
            "extract",
            str(pairs),
            "--split",
            "train",
            "--layers",
            "10,15,20",
            "--batch-size",
            "16",
            "-o",
            str(acts),
        ],
    )
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["compute-vectors", str(acts), "-o", str(vectors)]).exit_code == 0
    ours = VectorSet.read(vectors)

    # The paper's way: one pair at a time, output_hidden_states, read at the answer letter.
    loaded = load_model("smollm2-135m", device="cpu")
    frame, _ = read_pairs(pairs)
    frame = frame[frame.split == "train"]
    style = prompt_format(loaded.tokenizer)
    sums = {layer: np.zeros(loaded.hidden_size) for layer in LAYERS}
    for row in frame.itertuples():
        for side, sign in (("positive", 1.0), ("negative", -1.0)):
            enc = encode(loaded.tokenizer, style, row.prompt, getattr(row, side), "ab", "answer")
            assert loaded.tokenizer.decode([enc.input_ids[enc.read[0]]]) in ("A", "B")
            with torch.inference_mode():
                hidden = loaded.model(torch.tensor([enc.input_ids]), output_hidden_states=True).hidden_states
            for layer in LAYERS:
                sums[layer] += sign * hidden[layer + 1][0, enc.read[0]].double().numpy()
    for layer in LAYERS:
        naive = sums[layer] / len(frame)
        v = ours.vector("sycophancy", layer).astype(np.float64)
        cosine = v @ naive / np.linalg.norm(v) / np.linalg.norm(naive)
        assert cosine >= 0.999, (layer, cosine)


def test_steering_moves_the_demo_behavior_in_order(
    tmp_path: Path, shared_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the layer the sweep recommends, score(-m) < score(0) < score(+m) for the demo's multiplier."""
    import json

    from caa.store.artifacts import read_artifact
    from caa.store.schemas import SWEEP

    monkeypatch.setenv("CAA_CACHE", str(shared_cache))
    lines = (DATA / "sentiment.jsonl").read_text().splitlines()[:100]
    subset = tmp_path / "sentiment.jsonl"
    subset.write_text("\n".join(lines) + "\n")
    pairs, acts, vectors = tmp_path / "pairs.parquet", tmp_path / "acts.parquet", tmp_path / "vectors.parquet"
    assert (
        runner.invoke(app, ["ingest", str(subset), "-o", str(pairs), "--test-fraction", "0.25"]).exit_code
        == 0
    )
    result = runner.invoke(
        app, ["extract", str(pairs), "--split", "train", "--layers", DEMO_LAYERS, "-o", str(acts)]
    )
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["compute-vectors", str(acts), "-o", str(vectors)]).exit_code == 0
    out = tmp_path / "sweep.parquet"
    result = runner.invoke(
        app,
        [
            "sweep",
            str(vectors),
            str(pairs),
            "--multipliers",
            DEMO_MULTIPLIERS,
            "--neutral",
            str(DATA / "neutral_text.jsonl"),
            "--neutral-count",
            "8",
            "--max-pairs",
            "20",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    art = read_artifact(out, SWEEP)
    layer, m = art.meta["recommended"]["sentiment"]
    table = art.table.to_pandas()
    at = table[table.layer == layer].set_index("multiplier").score_mean
    assert at[-m] < at[0.0] < at[m], at.to_dict()
    assert json.dumps(art.meta["recommended"])


@pytest.mark.parametrize("positions", ["answer", "prompt-end"])
def test_sweep_scores_equal_the_papers_masking_rule(
    shared_cache: Path, monkeypatch: pytest.MonkeyPatch, positions: str
) -> None:
    """Both engines against a reference written from the paper's rule: one unbatched forward per
    question, the vector added where position > instruction_end (the prompt's last token)."""
    import json

    from caa.evaluation.engines import run_grid
    from caa.evaluation.scoring import ab_scores
    from caa.stages.sweep import ab_text

    monkeypatch.setenv("CAA_CACHE", str(shared_cache))
    loaded = load_model("smollm2-135m", device="cpu")
    style = prompt_format(loaded.tokenizer)
    questions = json.loads((DATA / "sycophancy.json").read_text())[:6]
    torch.manual_seed(0)
    vectors = {layer: torch.randn(loaded.hidden_size) for layer in (12, 18)}
    multipliers = [-4.0, 0.0, 4.0]
    texts, reference = [], {layer: np.zeros((len(questions), 3)) for layer in vectors}
    for i, q in enumerate(questions):
        match, other = q["answer_matching_behavior"], q["answer_not_matching_behavior"]
        texts.append(ab_text(loaded, style, q["question"], match, other))
        pos = encode(loaded.tokenizer, style, q["question"], match, "ab", "answer")
        neg = encode(loaded.tokenizer, style, q["question"], other, "ab", "answer")
        instruction_end = pos.completion_start - 1
        ids = torch.tensor([pos.input_ids[: pos.read[0]]])
        for layer, v in vectors.items():
            for j, m in enumerate(multipliers):

                def add(module, args, output, v=v, m=m, end=instruction_end):  # type: ignore[no-untyped-def]
                    hidden = output[0] if isinstance(output, tuple) else output
                    where = torch.arange(hidden.shape[1])
                    steered = where > end if positions == "answer" else where >= end
                    hidden = hidden + steered[None, :, None] * (m * v)
                    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

                handle = loaded.blocks[layer].register_forward_hook(add)
                try:
                    with torch.inference_mode():
                        p = torch.softmax(loaded.model(ids).logits[0, -1].float(), -1)
                finally:
                    handle.remove()
                a, b = p[pos.input_ids[pos.read[0]]], p[neg.input_ids[neg.read[0]]]
                reference[layer][i, j] = float(a / (a + b))
    for engine in ("fast", "naive"):
        got = run_grid(engine, loaded, texts, vectors, multipliers, ab_scores, positions)
        for layer in vectors:
            scores = got[layer][..., 0]
            np.testing.assert_allclose(scores, reference[layer], atol=5e-5, err_msg=f"{engine} {layer}")
            np.testing.assert_allclose(scores.mean(0), reference[layer].mean(0), atol=1e-5)
    assert np.abs(reference[18][:, 2] - reference[18][:, 1]).max() > 1e-3  # the steering did act


def test_the_sentiment_probe_score_rises_with_the_multiplier(
    shared_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """caa generate --score probe at the demo's layer 18: the unsteered model reads the texts steered
    towards negative sentiment lower along the vector than those steered towards positive, for every
    prompt, and the mean rises -4 < 0 < +4 (measured: about -11.6, -4.5, -2.9)."""
    import json

    import caa

    monkeypatch.setenv("CAA_CACHE", str(shared_cache))
    model = caa.load_model("smollm2-135m", device="cpu")
    rows = [json.loads(line) for line in (DATA / "sentiment.jsonl").read_text().splitlines()[:16]]
    pairs = caa.ingest(rows, caa.IngestOptions(behavior="sentiment", test_fraction=0.0))
    vectors = caa.compute_vectors(caa.extract(model, pairs, caa.ExtractOptions(layers=(18,))))
    prompts = (DATA / "neutral_prompts.txt").read_text().splitlines()[:3]
    options = caa.GenerateOptions(layer=18, multipliers=(-4.0, 0.0, 4.0), max_new_tokens=12, score="probe")
    gens = caa.generate(model, vectors, prompts, options)
    per_prompt = gens.frame.pivot(index="prompt_index", columns="multiplier", values="probe_score")
    assert (per_prompt[-4.0] < per_prompt[4.0]).all(), per_prompt
    means = gens.scores().set_index("multiplier").probe_mean
    assert means[-4.0] < means[0.0] < means[4.0], means.to_dict()
