"""`caa generate`: steered text side by side, and its bad input."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from caa.cli import app
from caa.core.prompts import prompt_format
from caa.models.loading import load_model
from caa.store.artifacts import read_artifact
from caa.store.schemas import GENERATIONS

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
