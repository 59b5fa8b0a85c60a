"""`caa generate`: steered text side by side, and its bad input."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from caa.cli import app
from caa.core.prompts import prompt_format
from caa.evaluation.judge import Judge, rubric
from caa.models.loading import load_model
from caa.stages.generate import Generations, judge_generations
from caa.store.artifacts import read_artifact, read_meta
from caa.store.schemas import GENERATIONS
from tests.evaluation.openai_server import Server, expected_rating, gone, running_server

runner = CliRunner()


def test_generate_cli(
    pipelines: Callable[[str], tuple[Path, Path]], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    model = str(tiny_models["llama"])
    _, vectors = pipelines("llama")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("tell me about the city\n\ndescribe a walk in the park\n")
    out = tmp_path / "gen.parquet"
    result = runner.invoke(
        app,
        [
            "generate",
            "-v",
            str(vectors),
            "--behavior",
            "mood",
            "--layer",
            "2",
            "-m",
            model,
            "--multipliers",
            "-4,0,4",
            "--prompts",
            str(prompts),
            "-p",
            "hello",
            "--max-new-tokens",
            "5",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    frame = read_artifact(out, GENERATIONS).table.to_pandas()
    assert len(frame) == 3 * 3
    assert sorted(set(frame.multiplier)) == [-4.0, 0.0, 4.0]
    assert frame.prompt.iloc[0] == "hello"
    # the unsteered column equals plain greedy generation, prompt by prompt
    loaded = load_model(model, device="cpu")
    style = prompt_format(loaded.tokenizer)
    for r in frame[frame.multiplier == 0].itertuples():
        ids = loaded.tokenizer(
            style.prefix(loaded.tokenizer, r.prompt), add_special_tokens=False, return_tensors="pt"
        ).input_ids
        with torch.inference_mode():
            plain = loaded.model.generate(
                ids, max_new_tokens=5, do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id
            )
        expected = loaded.tokenizer.decode(plain[0, ids.shape[1] :], skip_special_tokens=True).strip()
        assert r.text == expected
    steered = frame[frame.multiplier == 4].text.tolist()
    assert steered != frame[frame.multiplier == 0].text.tolist()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layer", "2"], "holds several behaviors (agree, mood): pick one with --behavior"),
        (["--layer", "9", "--behavior", "mood"], "no vector for 'mood' at layer 9"),
        (["--layer", "2", "--behavior", "mood", "--multipliers", "a"], "'a' is not a number"),
        (["--layer", "2", "--behavior", "mood", "--prompts", "nope.txt"], "nope.txt: file not found"),
    ],
)
def test_generate_bad_input(
    pipelines: Callable[[str], tuple[Path, Path]],
    tiny_models: dict[str, Path],
    tmp_path: Path,
    args: list[str],
    message: str,
) -> None:
    _, vectors = pipelines("llama")
    out = tmp_path / "gen.parquet"
    result = runner.invoke(
        app,
        ["generate", "-v", str(vectors), "-m", str(tiny_models["llama"]), "-p", "hi", "-o", str(out), *args],
    )
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists()


def test_a_generate_batch_out_of_cuda_memory_is_retried_in_halves(
    pipelines: Callable[[str], tuple[Path, Path]],
    tiny_models: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Generation whose batch runs out of CUDA memory (injected on the CPU) retries it in halves,
    says so, and writes the greedy text of the run without errors."""
    import caa
    from tests.helpers import inject_oom

    loaded = load_model(str(tiny_models["llama"]), device="cpu")
    vectors = caa.VectorSet.read(pipelines("llama")[1])
    prompts = ["tell me about the city", "describe a walk", "a plan for dinner", "music and books"]

    def run(notice: Callable[[str], None] | None = None) -> list[str]:
        options = caa.GenerateOptions(
            layer=2, behavior="mood", multipliers=(-4, 0, 4), max_new_tokens=5, batch_size=4
        )
        gens = caa.generate(loaded, vectors, prompts, options, notice=notice)
        return list(gens.frame.text)

    clean = run()
    sizes = inject_oom(monkeypatch, loaded, max_rows=6)  # two prompts x three multipliers
    notices: list[str] = []
    assert run(notices.append) == clean
    assert notices == ["CUDA out of memory at 4 prompts a batch; retrying at 2"]
    assert sizes[0] == 12 and max(sizes[1:]) <= 6


# --- scores: --score probe and --judge (a real OpenAI-compatible server, tests/evaluation/openai_server.py)


@pytest.fixture(scope="module")
def judge_server() -> Iterator[Server]:
    with running_server() as started:
        yield started
    assert gone(started.process.pid)


def _generate(vectors: Path, model: Path, out: Path, *args: str) -> Any:
    command = ["generate", "-v", str(vectors), "--behavior", "mood", "--layer", "2", "-m", str(model)]
    command += ["--multipliers=-4,0,4", "--max-new-tokens", "4", "-o", str(out), *args]
    return runner.invoke(app, command)


def test_generate_scores_with_the_probe_and_the_judge(
    pipelines: Callable[[str], tuple[Path, Path]],
    tiny_models: dict[str, Path],
    tmp_path: Path,
    judge_server: Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, vectors = pipelines("llama")
    out = tmp_path / "gen.parquet"
    judge_server.script(key="sk-test-1", unparseable=["hello"])
    monkeypatch.setenv("CAA_TEST_JUDGE_KEY", "sk-test-1")
    prompts = ["-p", "hello", "-p", "tell me about the city", "-p", "describe a walk in the park"]
    judging = [
        "--judge",
        judge_server.url,
        "--judge-model",
        "tiny-judge",
        "--judge-key-env",
        "CAA_TEST_JUDGE_KEY",
    ]
    result = _generate(vectors, tiny_models["llama"], out, *prompts, "--score", "probe", *judging)
    assert result.exit_code == 0, result.output
    assert "sk-test-1" not in result.output
    frame = read_artifact(out, GENERATIONS).table.to_pandas()
    assert frame.probe_score.notna().all()
    # each row's rating is the one the server derives from that row's text; the "hello" rows unparseable
    for r in frame.itertuples():
        assert (
            (r.judge_rating != r.judge_rating)
            if r.prompt == "hello"
            else r.judge_rating == expected_rating(r.text)
        )
    assert "3 of 9 ratings unparseable" in result.output
    assert "judge rating 1-10" in result.output and "probe score" in result.output
    log = judge_server.log()
    assert len(log) == 9 and {e["authorization"] for e in log} == {"Bearer sk-test-1"}
    meta = read_meta(out)
    assert meta["judge"]["model"] == "tiny-judge" and meta["judge"]["url"] == judge_server.url
    assert meta["judge"]["rubric"] == rubric("mood") and meta["judge"]["unparseable"] == 3
    assert meta["probe"]["layer"] == 2 and "generated tokens" in meta["probe"]["read"]
    assert "sk-test-1" not in json.dumps(meta)
    # the printed means are the file's, per multiplier
    scores = Generations.read(out).scores()
    for r in scores.itertuples():
        rows = frame[frame.multiplier == r.multiplier]
        assert r.probe_mean == pytest.approx(rows.probe_score.mean())
        assert r.judge_mean == pytest.approx(rows.judge_rating.mean()) and r.judge_n == 2


def test_an_unreachable_judge_is_one_error_after_its_retries_and_the_texts_are_kept(
    pipelines: Callable[[str], tuple[Path, Path]], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    _, vectors = pipelines("llama")
    out = tmp_path / "gen.parquet"
    with socket.socket() as sock:  # a port nobody listens on once this closes
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    result = _generate(
        vectors,
        tiny_models["llama"],
        out,
        "-p",
        "hi",
        "--judge",
        url,
        "--judge-model",
        "m",
        "--judge-retries",
        "1",
    )
    assert result.exit_code == 2, result.output
    assert (
        f"judge {url}/chat/completions: no answer after 2 attempts (last: connection refused)"
        in result.output
    )
    assert f"wrote {out} without ratings" in result.output
    assert "Traceback" not in result.output
    frame = read_artifact(out, GENERATIONS).table.to_pandas()
    assert len(frame) == 3 and frame.judge_rating.isna().all()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--judge", "ftp://host/v1", "--judge-model", "m"],
            "--judge 'ftp://host/v1': must be an http:// or https://",
        ),
        (["--judge", "http://127.0.0.1:9/v1"], "--judge-model: name the judge's model"),
        (["--judge-model", "m"], "--judge-model 'm': only with a judge URL"),
        (["--score", "judge"], "--score 'judge': use one of probe"),
        (
            ["--judge", "http://127.0.0.1:9/v1", "--judge-model", "m", "--judge-retries", "11"],
            "must be from 0 to 10",
        ),
    ],
)
def test_judge_options_are_refused_before_the_model_loads(
    pipelines: Callable[[str], tuple[Path, Path]], tmp_path: Path, args: list[str], message: str
) -> None:
    _, vectors = pipelines("llama")
    out = tmp_path / "gen.parquet"
    result = _generate(vectors, tmp_path / "no-model", out, "-p", "hi", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists()


def test_a_key_given_for_its_variable_is_refused_without_being_shown(
    pipelines: Callable[[str], tuple[Path, Path]], tmp_path: Path
) -> None:
    _, vectors = pipelines("llama")
    key = "sk-proj-abc123-secret"
    args = ["--judge", "http://127.0.0.1:9/v1", "--judge-model", "m", "--judge-key-env", key]
    result = _generate(vectors, tmp_path / "no-model", tmp_path / "gen.parquet", "-p", "hi", *args)
    assert result.exit_code == 2
    assert "judge_key_env: must be the name of an environment variable" in result.output
    assert key not in result.output


def test_judge_generations_rates_in_row_order_with_a_built_in_behaviors_card(judge_server: Server) -> None:
    """No model: a Generations of the built-in behavior sentiment, rated through the library."""
    from caa.store.datasets import builtin

    texts = ["What a lovely day!", "Grey and dull.", "", "Fine, I suppose, in the end.", "x" * 19]
    frame = pd.DataFrame(
        {
            "prompt_index": [0, 0, 1, 1, 2],
            "prompt": ["a", "a", "b", "b", "c"],
            "behavior": "sentiment",
            "layer": 3,
            "multiplier": [-1.0, 1.0, -1.0, 1.0, -1.0],
            "text": texts,
            "n_tokens": 4,
        }
    )
    judge_server.script(unparseable=["b"])
    ticks: list[int] = []
    gens = judge_generations(Generations(frame), Judge(judge_server.url, "j", workers=3), ticks.append)
    expected = [expected_rating(t) if p != "b" else None for t, p in zip(texts, frame.prompt, strict=True)]
    assert [None if pd.isna(x) else x for x in gens.frame.judge_rating] == expected
    assert sum(ticks) == 5 and gens.unparseable() == 2
    description = builtin("sentiment").description  # type: ignore[union-attr]
    assert f"Behavior: sentiment\nWhat it is: {description}" in gens.meta["judge"]["rubric"]


def test_generations_written_before_the_scores_still_read(tmp_path: Path) -> None:
    """A generations file without probe_score and judge_rating (as caa wrote it before them) reads,
    the scores null, and its report section shows its texts without score rows."""
    from caa.report.sections import generations_section
    from caa.store.artifacts import make_meta
    from caa.store.schemas import META_KEY

    columns = {
        "prompt_index": pa.array([0, 0], pa.int32()),
        "prompt": ["hi", "hi"],
        "behavior": ["mood", "mood"],
        "layer": pa.array([2, 2], pa.int16()),
        "multiplier": [-1.0, 1.0],
        "text": ["sad", "glad"],
        "n_tokens": pa.array([1, 1], pa.int32()),
    }
    meta = {**make_meta(GENERATIONS, {"layer": 2}), "schema_version": 1}  # before the scores: version 1
    old = tmp_path / "old.parquet"
    pq.write_table(pa.table(columns).replace_schema_metadata({META_KEY: json.dumps(meta)}), old)
    gens = Generations.read(old)
    assert gens.frame.probe_score.isna().all() and gens.frame.judge_rating.isna().all()
    assert gens.scores().columns.tolist() == ["multiplier"]
    assert "glad" in generations_section(old, 10) and "probe" not in generations_section(old, 10)
