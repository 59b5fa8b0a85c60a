"""The datasets shipped in the package: found through importlib.resources from any directory, their
cards (data/README.md) true to the files, `caa datasets`, `caa ingest NAME` and sweep's default neutral."""

from __future__ import annotations

import itertools
import json
from importlib.resources import files
from pathlib import Path

import pytest
from typer.testing import CliRunner

from caa import cli
from caa.cli import app
from caa.errors import CaaError
from caa.stages.ingest import ingest, read_pairs
from caa.store import datasets
from caa.store.artifacts import read_artifact
from caa.store.schemas import SWEEP
from tests.helpers import DATA, make_vectors

runner = CliRunner()
BUILTINS = ["sycophancy", "corrigibility", "myopic_reward", "sentiment", "formality", "capability"]


def _shipped(path: Path) -> bool:
    return path.is_file() and path.name != "__init__.py" and "__pycache__" not in path.parts


def test_packaged_files_are_data_byte_for_byte() -> None:
    packaged = files("caa._data")
    ours = sorted(p.name for p in DATA.iterdir() if _shipped(p))
    assert "README.md" in ours and "sentiment.jsonl" in ours
    for name in ours:
        assert packaged.joinpath(name).read_bytes() == (DATA / name).read_bytes(), name
    assert (
        datasets.data_dir().joinpath("sentiment.jsonl").read_bytes()
        == (DATA / "sentiment.jsonl").read_bytes()
    )


def test_every_shipped_file_has_a_card_and_every_card_a_file() -> None:
    cards = datasets.cards()
    assert sorted(c.file for c in cards) == sorted(
        p.name for p in DATA.iterdir() if _shipped(p) and p.suffix != ".md"
    )
    assert [c.name for c in datasets.datasets()] == BUILTINS
    for card in cards:
        assert card.path.is_file()
        assert card.description.endswith(".") and card.licence == "CC-BY-4.0" and card.source


@pytest.mark.parametrize("name", BUILTINS)
def test_a_card_states_its_file_size_and_format(name: str) -> None:
    card = datasets.builtin(name)
    assert card is not None and datasets.builtin(card.file) == card
    result = ingest([card.path])
    assert len(result.pairs) == card.count and not result.duplicates
    assert {p.format for p in result.pairs} == {"ab" if card.format == "A/B" else "freeform"}
    assert card.unit == ("questions" if card.format == "A/B" else "pairs")


def test_neutral_cards_count_their_texts() -> None:
    prompts = [line for line in datasets.neutral_prompts().read_text().splitlines() if line.strip()]
    texts = [json.loads(line)["text"] for line in datasets.neutral_text().read_text().splitlines()]
    counts = {c.file: c.count for c in datasets.cards() if not c.is_pairs}
    assert counts == {"neutral_prompts.txt": len(prompts), "neutral_text.jsonl": len(texts)}
    assert datasets.default_neutral("all") == datasets.neutral_text()
    assert (
        datasets.default_neutral("answer")
        == datasets.default_neutral("prompt-end")
        == datasets.neutral_prompts()
    )


def test_cards_parse_fields_per_section() -> None:
    text = (
        "# x\n\n- Source: ours\n- License: CC0\n\n"
        "## a.jsonl (free-form, 3 pairs)\n\nHappy vs sad (1.5x). More.\n\n"
        "## b.json (A/B, 2 questions)\n\n- License: MIT\n\nAgreeing.\n\n"
        "## n.txt (4 prompts)\n\nPlain text.\n"
    )
    a, b, n = datasets._parse_cards(text)
    assert (a.name, a.format, a.count, a.unit, a.description, a.licence) == (
        "a",
        "free-form",
        3,
        "pairs",
        "Happy vs sad (1.5x).",
        "CC0",
    )
    assert (b.format, b.licence, b.source) == ("A/B", "MIT", "ours")
    assert (n.format, n.is_pairs, n.unit) == ("neutral", False, "prompts")


@pytest.mark.parametrize("name", [n for n in BUILTINS if n != "capability"])
def test_a_dataset_card_gives_its_two_system_prompts(name: str) -> None:
    card = datasets.builtin(name)
    assert card is not None
    prompts = (card.system_positive, card.system_negative)
    assert all(p and p.endswith(".") and len(p) <= 120 and "\n" not in p for p in prompts), prompts
    assert card.system_positive != card.system_negative
    assert card.description.endswith(".") and "System" not in card.description  # fields are not prose
    for other in datasets.cards():
        if not other.is_pairs:
            assert (other.system_positive, other.system_negative) == ("", "")


def test_system_prompts_are_a_section_of_its_own_never_a_default() -> None:
    text = (
        "# x\n\n- Source: ours\n- License: CC0\n- System positive: Not a default.\n\n"
        "## a.jsonl (free-form, 3 pairs)\n\nHappy vs sad.\n\n"
        "- System positive: Be happy.\n- System negative: Be sad.\n\n"
        "## b.json (A/B, 2 questions)\n\nAgreeing.\n"
    )
    a, b = datasets._parse_cards(text)
    assert (a.system_positive, a.system_negative, a.description) == ("Be happy.", "Be sad.", "Happy vs sad.")
    assert (b.system_positive, b.system_negative, b.source) == ("", "", "ours")


def test_caa_datasets_lists_the_cards(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli.out, "width", 400)  # one line per card
    result = runner.invoke(app, ["datasets"])
    assert result.exit_code == 0, result.output
    for card in datasets.cards():
        assert card.name in result.output and card.description in result.output
        assert f"{card.count} {card.unit}" in result.output
    assert "A/B" in result.output and "free-form" in result.output and "CC-BY-4.0" in result.output
    assert f"source of every file: {datasets.cards()[0].source}" in result.output
    assert str(datasets.data_dir()) in result.output


def test_ingest_a_builtin_name_from_another_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["ingest", "sentiment", "sycophancy.json", "-o", "pairs.parquet"])
    assert result.exit_code == 0, result.output
    used = datasets.data_dir()
    assert f"using the built-in dataset sentiment: {used / 'sentiment.jsonl'}" in result.output
    assert f"using the built-in dataset sycophancy: {used / 'sycophancy.json'}" in result.output
    frame = read_pairs(tmp_path / "pairs.parquet")[0]
    assert frame.groupby("behavior").size().to_dict() == {"sentiment": 194, "sycophancy": 190}
    assert set(frame.source) == {"sentiment.jsonl", "sycophancy.json"}


def test_a_file_of_that_name_wins_over_the_builtin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rows = [{"prompt": f"Say {w}.", "positive": f"{w}, great!", "negative": f"{w}, awful."} for w in "abc"]
    Path("sentiment.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = runner.invoke(app, ["ingest", "sentiment.jsonl", "-o", "pairs.parquet"])
    assert result.exit_code == 0, result.output
    assert "built-in" not in result.output
    assert len(read_pairs(tmp_path / "pairs.parquet")[0]) == 3


def test_neither_file_nor_builtin_is_one_line_listing_the_builtins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["ingest", "sentiments", "-o", "pairs.parquet"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines == [
        "error: sentiments: no such file, and not a built-in dataset (built-in: " + ", ".join(BUILTINS) + ")"
    ]
    assert not (tmp_path / "pairs.parquet").exists()
    # a path with a directory is a file or an error about that file, never a built-in
    result = runner.invoke(app, ["ingest", "sub/sentiment.jsonl", "-o", "pairs.parquet"])
    assert result.exit_code == 2 and "file not found" in result.output
    with pytest.raises(CaaError, match="not a built-in dataset"):
        datasets.resolve_dataset(Path("neutral_text"))  # neutral texts are not pairs


@pytest.mark.parametrize("positions", ["answer", "all"])
def test_sweep_defaults_to_the_packaged_neutral_texts_from_any_directory(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, positions: str
) -> None:
    pairs, vectors = make_vectors(tiny_models["llama"], tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    args = ["sweep", str(vectors), str(pairs), "-m", str(tiny_models["llama"]), "--layers", "1"]
    args += ["--multipliers", "1", "--max-pairs", "2", "--neutral-count", "2", "--steer-positions", positions]
    result = runner.invoke(app, [*args, "-o", "sweep.parquet"])
    assert result.exit_code == 0, result.output
    meta = read_artifact(elsewhere / "sweep.parquet", SWEEP).meta
    assert meta["options"]["neutral"] == str(datasets.default_neutral(positions))


def test_capability_is_a_balanced_set_of_single_answer_questions() -> None:
    rows = json.loads((DATA / "capability.json").read_text(encoding="utf-8"))
    assert len(rows) >= 200
    stems = [r["question"].split("\n\nChoices:")[0] for r in rows]
    assert len(set(stems)) == len(stems), "a question is asked twice"
    at_a = 0
    for r in rows:
        head, choices = r["question"].split("\n\nChoices:\n")
        first, second = choices.split("\n")
        assert first.startswith(" (A) ") and second.startswith(" (B) ") and head.strip()
        assert first[5:].strip() and second[5:].strip() and first[5:] != second[5:]
        assert {r["answer_matching_behavior"], r["answer_not_matching_behavior"]} == {"(A)", "(B)"}
        at_a += r["answer_matching_behavior"] == "(A)"
    assert at_a * 2 == len(rows)
    letters = [r["answer_matching_behavior"] for r in rows]
    longest = max(len(list(run)) for _, run in itertools.groupby(letters))
    assert longest < 12, "the correct letters are not shuffled"


def test_the_capability_probe_has_no_system_prompts() -> None:
    """It is what steering must not break, not a behavior to ask for (`caa sweep --side-effects`)."""
    card = datasets.builtin("capability")
    assert card is not None and (card.system_positive, card.system_negative) == ("", "")
