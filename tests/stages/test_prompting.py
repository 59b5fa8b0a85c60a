"""`caa sweep --prompting`: the system-prompt arms against an unbatched reference that writes the
prompt with the system message itself and runs one forward pass per (item, layer, multiplier) with
a steering hook of its own; the prompts' sources; the comparison read from the per-item table."""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from caa import api, cli
from caa.cli import app
from caa.errors import CaaError, InputError, OptionError
from caa.evaluation.comparison import compare, read_comparison
from caa.evaluation.scoring import recommend
from caa.models.loading import load_model
from caa.stages.options import SweepOptions
from caa.stages.prompting import system_prompts
from caa.stages.sweep import SweepResult, run_sweep
from caa.stages.vectors import VectorSet
from caa.store.artifacts import read_artifact
from caa.store.schemas import META_KEY, SWEEP, SWEEP_ITEMS
from tests.helpers import (
    AB_ROWS,
    FREEFORM_ROWS,
    MULTIPLIERS,
    NEUTRAL,
    held_out,
    make_vectors,
    write_pairs_file,
)
from tests.stages.test_sweep import steered_logits
from tests.tiny_models import save_tiny_model

runner = CliRunner()
POSITIVE = "Be happy and agree with me."
NEGATIVE = "Be sad and gloomy."


def reference_prefix(tokenizer, system: str, prompt: str, chat: bool) -> str:  # type: ignore[no-untyped-def]
    """The prompt with the system message, written here: the chat template's system and user turns,
    or for a model without a template the system prompt as its own paragraph."""
    if chat:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return f"{system}\n\n{prompt}\n"


def tokens(tokenizer, prefix: str, completion: str, chat: bool) -> tuple[list[int], int, int]:  # type: ignore[no-untyped-def]
    """ids of prefix + completion, the first token overlapping the completion, and the token holding
    the completion's last character."""
    text = prefix + completion
    enc = tokenizer(text, add_special_tokens=not chat, return_offsets_mapping=True)
    spans = [(i, s, e) for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s]
    start = next(i for i, _, e in spans if e > len(prefix))
    last = next(i for i, s, e in spans if s <= len(text) - 1 < e)
    return enc["input_ids"], start, last


def reference_items(loaded, vectors, pairs: pd.DataFrame, behavior: str, system: str, layers, chat: bool):  # type: ignore[no-untyped-def]
    """{(layer, multiplier): [per-item score]} of one behavior under ``system``, one forward per cell,
    steering every position after the prompt (the paper's rule)."""
    tok = loaded.tokenizer
    out: dict[tuple[int, float], list[float]] = {}
    for layer in layers:
        v = torch.from_numpy(vectors.vector(behavior, layer).copy())
        for m in MULTIPLIERS:
            scores = []
            for r in pairs[pairs.behavior == behavior].itertuples():
                prefix = reference_prefix(tok, system, r.prompt, chat)
                if r.format == "ab":
                    pos, start, k = tokens(tok, prefix, r.positive.rstrip(")"), chat)
                    neg, _, k_neg = tokens(tok, prefix, r.negative.rstrip(")"), chat)
                    assert pos[:k] == neg[:k_neg]
                    logp = steered_logits(loaded, pos[:k], layer, m * v, start)[-1]
                    p_pos, p_neg = logp[pos[k]].exp(), logp[neg[k_neg]].exp()
                    scores.append(float(p_pos / (p_pos + p_neg)))
                    continue
                sides = []
                for completion in (r.positive, r.negative):
                    ids, start, _ = tokens(tok, prefix, completion, chat)
                    logp = steered_logits(loaded, ids, layer, m * v, start)
                    sides.append(
                        float(logp[start - 1 : -1].gather(1, torch.tensor(ids[start:])[:, None]).sum())
                    )
                scores.append(sides[0] - sides[1])
            out[(layer, m)] = scores
    return out


@pytest.fixture(scope="module")
def plain_pipeline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny Llama without a chat template, and its pairs and vectors."""
    root = tmp_path_factory.mktemp("plain")
    model = save_tiny_model("llama", root / "model", chat=False)
    pairs, vectors = make_vectors(model, root)
    return model, pairs, vectors


@pytest.mark.parametrize(("chat", "engine"), [(True, "fast"), (False, "fast")])
def test_prompting_arms_equal_an_unbatched_reference_with_the_system_prompt(
    pipelines: Callable[[str], tuple[Path, Path]],
    tiny_models: dict[str, Path],
    plain_pipeline: tuple[Path, Path, Path],
    chat: bool,
    engine: str,
) -> None:
    if chat:
        model, (pairs_path, vectors_path) = tiny_models["llama"], pipelines("llama")
    else:
        model, pairs_path, vectors_path = plain_pipeline
    loaded = load_model(str(model), device="cpu")
    assert bool(loaded.tokenizer.chat_template) == chat
    vectors, test = VectorSet.read(vectors_path), held_out(pairs_path)
    layers = (1, 3)
    common = {"layers": layers, "multipliers": MULTIPLIERS, "engine": engine}
    options = SweepOptions(**common, prompting=True, system_positive=POSITIVE, system_negative=NEGATIVE)
    behaviors = ["agree", "mood"] if chat else ["mood"]  # plain text: "\n(A" and "\n(B" tokenize apart
    result = run_sweep(loaded, vectors, test, NEUTRAL, options, behaviors=behaviors)
    items = result.items
    for behavior in behaviors:
        ids = list(test[test.behavior == behavior].pair_id)
        for arm, system in (("positive", POSITIVE), ("negative", NEGATIVE)):
            reference = reference_items(loaded, vectors, test, behavior, system, layers, chat)
            for (layer, m), expected in reference.items():
                got = (
                    items[
                        (items.behavior == behavior)
                        & (items.system == arm)
                        & (items.layer == layer)
                        & (items.multiplier == m)
                    ]
                    .set_index("pair_id")
                    .score.reindex(ids)
                )
                np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4, err_msg=f"{arm} {layer} {m}")
    # arm none is the sweep without --prompting, row for row; its fluency cost is the only one
    plain = run_sweep(loaded, vectors, test, NEUTRAL, SweepOptions(**common), behaviors=behaviors)
    none = result.table[result.table.system == "none"].reset_index(drop=True)
    pd.testing.assert_frame_equal(none, plain.table)
    assert set(plain.table.system) == {"none"} and "prompting" not in plain.meta
    arms = result.table[result.table.system != "none"]
    assert len(arms) == len(behaviors) * 2 * len(layers) * len(MULTIPLIERS) and arms.kl_mean.isna().all()
    # the comparison in the metadata is that of the per-item table at the steering cell
    for behavior, entry in result.meta["prompting"]["comparison"].items():
        layer, m = entry["cell"]
        assert entry["cell_kind"] in ("recommended", "best in the KL budget, not reliable") or m > 0
        mine = items[(items.behavior == behavior) & (items.layer == layer)]
        ids = list(test[test.behavior == behavior].pair_id)
        cells = [("none", 0.0), ("none", m), ("positive", 0.0), ("positive", m), ("negative", 0.0)]
        scores = [
            mine[(mine.system == arm) & (mine.multiplier == mult)].set_index("pair_id").score.reindex(ids)
            for arm, mult in cells
        ]
        assert read_comparison(entry) == compare(*(s.to_numpy() for s in scores))


def test_prompting_layer_runs_the_arms_there_and_compares_there(
    pipelines: Callable[[str], tuple[Path, Path]], tiny_models: dict[str, Path]
) -> None:
    pairs_path, vectors_path = pipelines("llama")
    loaded = load_model(str(tiny_models["llama"]), device="cpu")
    vectors, test = VectorSet.read(vectors_path), held_out(pairs_path)
    options = SweepOptions(
        layers=(1, 3), multipliers=(0.0, 1.5), prompting=True, prompting_layer=3, system_positive=POSITIVE
    )
    notices: list[str] = []
    result = run_sweep(loaded, vectors, test, NEUTRAL, options, behaviors=["mood"], notice=notices.append)
    arms = result.table[result.table.system != "none"]
    assert set(arms.system) == {"positive"} and set(arms.layer) == {3}  # no negative prompt: no arm
    assert notices == ["'mood' has no negative system prompt: its negative arm is not run"]
    entry = result.meta["prompting"]["comparison"]["mood"]
    assert entry["cell"] == [3, 1.5] and entry["negative_prompt"] is None
    assert result.meta["prompting"]["layer"] == 3
    assert result.meta["prompting"]["prompts"]["mood"] == {
        "positive": POSITIVE,
        "negative": None,
        "source": "options",
    }
    # without layers, the swept layers are the vectors' own: the prompting layer must be among them
    bad = SweepOptions(multipliers=(0.0, 1.0), prompting=True, prompting_layer=7, system_positive="x")
    with pytest.raises(OptionError, match=r"is not among the swept layers of 'mood' \(0, 1, 2, 3\)"):
        run_sweep(loaded, vectors, test, NEUTRAL, bad, behaviors=["mood"])


def frame(rows: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame([{"behavior": b, "source": s, "pair_id": f"{b}{i}"} for i, (b, s) in enumerate(rows)])


def test_system_prompts_come_from_the_card_of_the_file_or_the_options() -> None:
    pairs = frame([("sentiment", "sentiment.jsonl"), ("mood", "mood.jsonl"), ("formality", "mine.jsonl")])
    found, warnings = system_prompts(pairs, ["sentiment", "mood", "formality"], SweepOptions(prompting=True))
    assert list(found) == ["sentiment"]
    card = found["sentiment"]
    assert (card.positive, card.negative, card.source) == (
        "Reply in a warm, upbeat, positive tone.",
        "Reply in a gloomy, downbeat, negative tone.",
        "card",
    )
    # a behavior named like a built-in dataset, from another file, has no card's prompts
    assert [w.split(" has ")[0] for w in warnings] == ["'mood'", "'formality'"]
    assert all("skipped for the prompting arms" in w for w in warnings)
    mine = SweepOptions(prompting=True, system_positive="Be kind.")
    found, warnings = system_prompts(pairs, ["sentiment", "mood"], mine)
    assert (found["sentiment"].positive, found["sentiment"].negative) == ("Be kind.", card.negative)
    assert found["sentiment"].source == "card and options" and found["mood"].source == "options"
    assert found["mood"].arms() == [("positive", "Be kind.")]
    assert warnings == ["'mood' has no negative system prompt: its negative arm is not run"]
    with pytest.raises(CaaError, match="no behavior swept has system prompts"):
        system_prompts(pairs, ["mood"], SweepOptions(prompting=True))


# --- the command line ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompting", "--system-positive", ""], "--system-positive '': must not be empty"),
        (["--prompting", "--system-negative", "  "], "--system-negative '  ': must not be empty"),
        (
            ["--prompting", "--layers", "1,2", "--prompting-layer", "3"],
            "--prompting-layer 3: is not among the swept layers (1, 2)",
        ),
        (
            ["--prompting", "--prompting-layer", "9", "--system-positive", "x"],
            "--prompting-layer 9: layer 9 is out of range; valid layers are 0-3",
        ),
        (["--prompting-layer", "1"], "--prompting-layer 1: needs prompting on (--prompting)"),
        (["--system-negative", "x"], "--system-negative 'x': needs prompting on (--prompting)"),
        (["--prompting"], "--prompting: no behavior swept has system prompts"),
    ],
)
def test_bad_prompting_options_are_one_line_and_exit_2(
    pipelines: Callable[[str], tuple[Path, Path]],
    tiny_models: dict[str, Path],
    tmp_path: Path,
    args: list[str],
    message: str,
) -> None:
    pairs, vectors = pipelines("llama")
    out = tmp_path / "sweep.parquet"
    model = ["--model", str(tiny_models["llama"])]
    result = runner.invoke(app, ["sweep", str(vectors), str(pairs), "-o", str(out), *model, *args])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [f"error: {result.output.strip()[7:]}"]
    assert message in result.output
    assert not out.exists()


def test_sweep_prompting_cli_warns_compares_reports_and_old_files_still_read(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pairs file whose 'sentiment' comes from a file named like the built-in one (its card's
    prompts) and whose 'agree' has none: agree is named and skipped, sentiment is compared, in the
    terminal, the metadata, the per-item table and the report; a sweep file of schema version 1
    (before the arms) still reads, as arm none."""
    monkeypatch.setattr(cli.out, "width", 200)
    model = str(tiny_models["llama"])
    pairs = write_pairs_file(tmp_path / "pairs.parquet", {"sentiment": FREEFORM_ROWS, "agree": AB_ROWS}, 0.5)
    acts, vectors = tmp_path / "acts.parquet", tmp_path / "vectors.parquet"
    extract = ["extract", str(pairs), "-m", model, "-o", str(acts), "--split", "train", "--layers", "1,2"]
    assert runner.invoke(app, extract).exit_code == 0
    assert runner.invoke(app, ["compute-vectors", str(acts), "-o", str(vectors)]).exit_code == 0
    out = tmp_path / "sweep.parquet"
    args = ["sweep", str(vectors), str(pairs), "-m", model, "--multipliers", "-1,1", "--max-kl", "100"]
    result = runner.invoke(app, [*args, "--neutral-count", "2", "--prompting", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert (
        "'agree' has no system prompts" in result.output and "skipped for the prompting arms" in result.output
    )
    assert "not compared with prompting (no system prompts): agree" in result.output
    assert " ".join(result.output.split()).count("'agree' has no system prompts") == 1  # said once
    art = read_artifact(out, SWEEP)
    table, meta = art.table.to_pandas(), art.meta
    assert meta["schema_version"] == 2
    assert set(table[table.behavior == "sentiment"].system) == {"none", "positive", "negative"}
    assert set(table[table.behavior == "agree"].system) == {"none"}
    prompting = meta["prompting"]
    assert prompting["skipped"] == ["agree"] and prompting["layer"] is None
    assert prompting["prompts"]["sentiment"]["positive"] == "Reply in a warm, upbeat, positive tone."
    c = read_comparison(prompting["comparison"]["sentiment"])
    assert api.sentence("sentiment", c, "{:+.2f}") in result.output  # the plain line, as printed
    assert "mean score per system prompt and multiplier" in result.output
    items = read_artifact(tmp_path / "sweep.items.parquet", SWEEP_ITEMS).table.to_pandas()
    assert len(items[items.system == "positive"]) == c.n * 2 * 3  # items x layers x multipliers
    # the recommendation reads arm none only
    none = table[table.system == "none"]
    assert meta["recommended"] == {
        b: list(p[0]) if p[0] else None for b in ("sentiment", "agree") for p in [recommend(none, b, 100.0)]
    }
    report = tmp_path / "report.html"
    made = runner.invoke(app, ["report", str(out), "-o", str(report), "--no-check-inputs"])
    assert made.exit_code == 0, made.output
    page = report.read_text()
    assert (
        "Steering against prompting" in page and html.escape(api.sentence("sentiment", c, "{:+.2f}")) in page
    )
    assert "Reply in a warm, upbeat, positive tone." in page and "<script src" not in page
    # schema version 1: no column system, no prompting metadata; it reads as arm none
    old = tmp_path / "old"
    old.mkdir()
    for name, kind in (("sweep.parquet", SWEEP), ("sweep.items.parquet", SWEEP_ITEMS)):
        t = pq.read_table(tmp_path / name)
        m = json.loads(t.schema.metadata[META_KEY])
        m.update(schema_version=1)
        m.pop("prompting")
        t = t.filter(pc.equal(t["system"], "none")).drop_columns(["system"])
        pq.write_table(t.replace_schema_metadata({META_KEY: json.dumps(m)}), old / name)
        assert read_artifact(old / name, kind).table.column("system").to_pylist() == ["none"] * len(t)
    back = SweepResult.read(old / "sweep.parquet")
    assert set(back.table.system) == set(back.items.system) == {"none"} and len(back.table) == len(none)
    assert runner.invoke(app, ["inspect", str(old / "sweep.parquet"), "--no-check-inputs"]).exit_code == 0
    made = runner.invoke(app, ["report", str(old / "sweep.parquet"), "-o", str(old / "r.html")])
    assert made.exit_code == 0, made.output
    assert "Steering against prompting" not in (old / "r.html").read_text()
    t = pq.read_table(tmp_path / "sweep.parquet")
    m = {**json.loads(t.schema.metadata[META_KEY]), "schema_version": 3}
    pq.write_table(t.replace_schema_metadata({META_KEY: json.dumps(m)}), old / "v3.parquet")
    with pytest.raises(InputError, match="schema version 3, this caa reads versions 1, 2"):
        read_artifact(old / "v3.parquet", SWEEP)
