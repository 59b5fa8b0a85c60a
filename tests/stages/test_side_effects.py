"""`caa sweep --side-effects`: the off-target change of a behavior's cell and its paired interval, against
a hand computation and against one unbatched forward per item under caa's steering hook; the probes
(built-in names, files) and their refusals; the flag end to end on a tiny model."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import caa.api
from caa.cli import app
from caa.core.budget import planner_for
from caa.core.prompts import encode, prompt_format
from caa.errors import CaaError, OptionError
from caa.evaluation.reliability import t_quantile
from caa.models.loading import load_model
from caa.stages.options import SweepOptions
from caa.stages.side_effects import (
    Probe,
    chosen_cells,
    off_target_change,
    probe_work,
    read_probes,
    run_side_effects,
)
from caa.stages.sweep import SweepResult
from caa.stages.vectors import VectorSet
from caa.store.artifacts import read_artifact
from caa.store.schemas import SIDE_EFFECTS
from tests.helpers import AB_ROWS, DATA, FREEFORM_ROWS, NEUTRAL, held_out, write_pairs_file

runner = CliRunner()


def test_off_target_change_is_the_paired_t_interval_by_hand() -> None:
    # columns: x0, x1.5; the gains are 0.1, 0.05, -0.05, 0.2, 0.05: mean 0.07, sum of squares 0.033
    scores = np.array([[0.5, 0.6], [0.4, 0.45], [0.7, 0.65], [0.2, 0.4], [0.3, 0.35]])
    change = off_target_change(scores, zero=0, steered=1)
    half = 2.7764451052 * math.sqrt(0.033 / 4) / math.sqrt(5)  # t(0.975, 4) x sd / sqrt(n)
    assert change["unsteered"] == pytest.approx(0.42) and change["steered"] == pytest.approx(0.49)
    assert change["delta"] == pytest.approx(0.07)
    assert change["delta_low"] == pytest.approx(0.07 - half, abs=1e-9)
    assert change["delta_high"] == pytest.approx(0.07 + half, abs=1e-9)
    # the zero column may come second (a negative multiplier), and one item has no interval
    flipped = off_target_change(scores[:, ::-1], zero=1, steered=0)
    assert flipped["delta"] == pytest.approx(0.07) and flipped["delta_low"] == pytest.approx(0.07 - half)
    single = off_target_change(scores[:1], zero=0, steered=1)
    assert single["delta"] == pytest.approx(0.1) and math.isnan(single["delta_low"])


def test_cells_are_the_recommended_else_the_best_said_so() -> None:
    notes: list[str] = []
    cells = chosen_cells(
        {"a": (3, 2.0), "b": None, "c": None}, {"a": (3, 4.0), "b": (5, 1.0), "c": None}, notes.append
    )
    assert cells == {"a": (3, 2.0, "recommended"), "b": (5, 1.0, "best")}
    assert notes == [
        "'b': no cell is recommended; side effects are measured at its best gain, layer 5 x1, "
        "whose interval is not above 0",
        "'c': no positive gain within the fluency budget: no side effects measured",
    ]


def _reference_scores(
    loaded, probe: Probe, vector: torch.Tensor, layer: int, m: float, positions: str
) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Each item's score at x0 and xm: one forward per text and multiplier, steered by caa.api.steer."""
    style = prompt_format(loaded.tokenizer)

    def logp(ids: list[int], prompt_length: int, mult: float) -> torch.Tensor:
        steered = caa.api.steer(loaded, vector, layer, mult, positions=positions, prompt_length=prompt_length)
        with steered, torch.inference_mode():
            return torch.log_softmax(loaded.model(torch.tensor([ids])).logits[0].float(), -1)

    rows = []
    for r in probe.pairs.itertuples():
        row = []
        for mult in (0.0, m):
            if r.format == "ab":
                pos = encode(loaded.tokenizer, style, r.prompt, r.positive, "ab", "answer")
                neg = encode(loaded.tokenizer, style, r.prompt, r.negative, "ab", "answer")
                k = pos.read[0]
                last = logp(pos.input_ids[:k], pos.completion_start, mult)[-1]
                p_pos, p_neg = last[pos.input_ids[k]].exp(), last[neg.input_ids[neg.read[0]]].exp()
                row.append(float(p_pos / (p_pos + p_neg)))
            else:
                sides = []
                for text in (r.positive, r.negative):
                    e = encode(loaded.tokenizer, style, r.prompt, text, "freeform", "mean")
                    s = e.completion_start
                    lp = logp(e.input_ids, s, mult)[s - 1 : -1]
                    sides.append(float(lp.gather(1, torch.tensor(e.input_ids[s:])[:, None]).sum()))
                row.append(sides[0] - sides[1])
        rows.append(row)
    return np.array(rows)  # [items, (x0, xm)]


@pytest.mark.parametrize("positions", ["answer", "all"])
@pytest.mark.parametrize("engine", ["fast", "naive"])
def test_side_effects_equal_an_unbatched_reference(
    pipelines: Callable[[str], tuple[Path, Path]], tiny_models: dict[str, Path], engine: str, positions: str
) -> None:
    pairs_path, vectors_path = pipelines("llama")
    loaded = load_model(str(tiny_models["llama"]), device="cpu")
    vectors = VectorSet.read(vectors_path)
    test = held_out(pairs_path)
    probes = [Probe(b, str(pairs_path), part.reset_index(drop=True)) for b, part in test.groupby("behavior")]
    probes += read_probes(["capability"], max_items=6)
    cells = {"agree": (1, 1.5, "recommended"), "mood": (2, 3.0, "best")}
    options = SweepOptions(engine=engine, steer_positions=positions)
    ticks: list[int] = []
    table = run_side_effects(
        loaded, vectors, cells, probes, options, planner=planner_for(loaded, max_rows=4), tick=ticks.append
    )
    assert sum(ticks) == probe_work(probes, list(cells))
    assert list(table.columns) == [f.name for f in SIDE_EFFECTS.fields]
    # each behavior on every set but its own
    assert [(r.behavior, r.target) for r in table.itertuples()] == [
        ("agree", "capability"),
        ("agree", "mood"),
        ("mood", "agree"),
        ("mood", "capability"),
    ]
    for r in table.itertuples():
        probe = next(p for p in probes if p.name == r.target)
        layer, m, cell = cells[r.behavior]
        vector = torch.from_numpy(vectors.vector(r.behavior, layer).copy())
        ref = _reference_scores(loaded, probe, vector, layer, m, positions)
        gains = ref[:, 1] - ref[:, 0]
        half = t_quantile(0.975, len(gains) - 1) * gains.std(ddof=1) / math.sqrt(len(gains))
        assert (r.layer, r.multiplier, r.cell, r.n) == (layer, m, cell, len(probe.pairs))
        assert r.score_kind == ("p_match" if probe.is_ab else "logp_diff")
        got = [r.unsteered, r.steered, r.delta, r.delta_low, r.delta_high]
        want = [ref[:, 0].mean(), ref[:, 1].mean(), gains.mean(), gains.mean() - half, gains.mean() + half]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=f"{r.behavior} on {r.target}")
        assert abs(r.delta) > 1e-6  # the steering reached the scores


def test_probes_are_test_splits_of_names_and_files(tmp_path: Path, pairs_file: Path) -> None:
    capability = read_probes(["capability"], max_items=500)[0]
    assert (capability.name, capability.source, capability.is_ab) == ("capability", "built-in", True)
    full = caa.api.ingest(DATA / "capability.json").frame
    assert list(capability.pairs.pair_id) == list(full[full.split == "test"].pair_id)
    assert 40 < len(capability.pairs) < len(full)
    # a pairs.parquet gives one probe per behavior, each its test split, at most max_items
    probes = read_probes([str(pairs_file)], max_items=2)
    assert [(p.name, p.source, len(p.pairs)) for p in probes] == [
        ("agree", str(pairs_file), 2),
        ("mood", str(pairs_file), 2),
    ]
    assert set(probes[1].pairs.pair_id) <= set(held_out(pairs_file).pair_id)
    # a file of rows is ingested in memory, the way caa ingest splits it
    rows = tmp_path / "moods.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in FREEFORM_ROWS * 1))
    ingested = caa.api.ingest(rows).frame
    (probe,) = read_probes([str(rows)])
    assert probe.name == "moods" and not probe.is_ab
    assert list(probe.pairs.pair_id) == list(ingested[ingested.split == "test"].pair_id)


def test_probes_refuse_what_they_cannot_measure(tmp_path: Path) -> None:
    with pytest.raises(OptionError) as unknown:
        read_probes(["capabilty"])
    assert unknown.value.option == "side_effects"
    assert "capabilty: no such file, and not a built-in dataset (built-in: " in str(unknown.value)
    with pytest.raises(OptionError, match="no such file"):
        read_probes([str(tmp_path / "missing.jsonl")])
    train_only = write_pairs_file(tmp_path / "train.parquet", {"agree": AB_ROWS}, test_fraction=0.0)
    with pytest.raises(CaaError, match=r"train.parquet: no held-out \(test split\) pairs"):
        read_probes([str(train_only)])
    with pytest.raises(OptionError, match="names behavior 'capability' twice"):
        read_probes(["capability", "capability"])
    with pytest.raises(OptionError, match="names nothing"):
        SweepOptions(side_effects=("capability", " "))
    with pytest.raises(OptionError, match="at least 1"):
        SweepOptions(side_effects_max_items=0)


def _sweep_args(pipelines: Callable[[str], tuple[Path, Path]], tiny: Path, out: Path) -> list[str]:
    pairs, vectors = pipelines("llama")
    neutral = out.parent / "neutral.jsonl"
    neutral.write_text("".join(json.dumps({"text": t}) + "\n" for t in NEUTRAL[:3]))
    return [
        "sweep", str(vectors), str(pairs), "-m", str(tiny), "--layers", "1,2", "--multipliers", "-1,1",
        "--neutral", str(neutral), "--max-kl", "100", "-o", str(out),
    ]  # fmt: skip


def test_sweep_side_effects_end_to_end(
    pipelines: Callable[[str], tuple[Path, Path]], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "sweep.parquet"
    args = _sweep_args(pipelines, tiny_models["llama"], out)
    pairs, _ = pipelines("llama")
    result = runner.invoke(
        app, [*args, "--side-effects", f"capability,{pairs}", "--side-effects-max-items", "8"]
    )
    assert result.exit_code == 0, result.output
    side = tmp_path / "sweep.side_effects.parquet"
    art = read_artifact(side, SIDE_EFFECTS)
    frame = art.table.to_pandas()
    assert art.meta["kind"] == "sweep_side_effects"
    assert art.meta["options"]["side_effects"] == f"capability,{pairs}"  # as typed
    assert list(frame.columns) == [f.name for f in SIDE_EFFECTS.fields]
    swept = SweepResult.read(out)
    cells = chosen_cells(swept.recommended, swept.best)
    assert cells, "the tiny model's sweep gives no cell: the test needs one"
    assert sorted({(r.behavior, r.layer, r.multiplier, r.cell) for r in frame.itertuples()}) == sorted(
        (b, c[0], c[1], c[2]) for b, c in cells.items()
    )
    for r in frame.itertuples():
        assert r.target != r.behavior and r.target in {"capability", "agree", "mood"}
        test = held_out(pairs)
        assert r.n == (8 if r.target == "capability" else int((test.behavior == r.target).sum()))
        assert r.delta == pytest.approx(r.steered - r.unsteered)
        assert r.delta_low <= r.delta <= r.delta_high
    assert "side effects: each behavior's cell" in result.output and "capability" in result.output
    assert f"wrote {side}" in result.output.replace("\n", "")
    # read back with the sweep; a rerun without --side-effects removes the old file, which is not its own
    assert swept.side_effects is not None
    pd.testing.assert_frame_equal(swept.side_effects, frame)
    rerun = runner.invoke(app, args)
    assert rerun.exit_code == 0, rerun.output
    assert not side.exists() and SweepResult.read(out).side_effects is None
    assert f"removed {side} (an earlier run's side effects)" in rerun.output.replace("\n", "")
    side.write_bytes(b"PAR1 not ours")  # a file of another kind by that name is left alone
    assert runner.invoke(app, args).exit_code == 0 and side.read_bytes() == b"PAR1 not ours"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "capability,sycofancy",
            "--side-effects 'capability,sycofancy': sycofancy: no such file, and not a built-in",
        ),
        ("nowhere/pairs.jsonl", "--side-effects 'nowhere/pairs.jsonl': nowhere/pairs.jsonl: no such file"),
        ("capability,", "--side-effects 'capability,': '' names nothing"),
    ],
)
def test_sweep_side_effects_refusals_exit_2_with_one_line(
    pipelines: Callable[[str], tuple[Path, Path]],
    tiny_models: dict[str, Path],
    tmp_path: Path,
    value: str,
    message: str,
) -> None:
    out = tmp_path / "sweep.parquet"
    result = runner.invoke(app, [*_sweep_args(pipelines, tiny_models["llama"], out), "--side-effects", value])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.output
    assert not out.exists()  # refused before the model loads
