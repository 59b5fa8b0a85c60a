"""caa.evaluation.fluency: the texts the fluency cost reads, and the neutral files they come from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from caa.core.prompts import PromptFormat
from caa.errors import CaaError, InputError
from caa.evaluation.engines import ScoreText
from caa.evaluation.fluency import default_neutral, fluency_texts, read_neutral
from caa.models.loading import LoadedModel, load_model
from tests.helpers import NEUTRAL


@pytest.fixture(scope="module")
def llama(tiny_models: dict[str, Path]) -> LoadedModel:
    return load_model(str(tiny_models["llama"]), device="cpu")


def test_all_reads_every_position_of_each_text(llama: LoadedModel) -> None:
    texts = fluency_texts(llama, PromptFormat(chat=False), [*NEUTRAL, "the"], "all")
    assert len(texts) == len(NEUTRAL)  # a one-token text predicts nothing: left out
    for text, neutral in zip(texts, NEUTRAL, strict=True):
        ids = tuple(llama.tokenizer(neutral)["input_ids"])
        assert text == ScoreText(ids, 0, 0, len(ids) - 1)


def test_answer_reads_the_greedy_continuation_of_each_prompt(llama: LoadedModel) -> None:
    style = PromptFormat(chat=True)
    prompts = NEUTRAL[:3]
    texts = fluency_texts(llama, style, prompts, "answer", new_tokens=5, batch_size=2)
    tok = llama.tokenizer
    for text, prompt in zip(texts, prompts, strict=True):
        ids = tok(style.prefix(tok, prompt), add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            out = llama.model.generate(
                torch.tensor([ids]), max_new_tokens=5, min_new_tokens=1, do_sample=False,
                pad_token_id=tok.pad_token_id,
            )[0, len(ids) :].tolist()  # fmt: skip
        if tok.eos_token_id in out:
            out = out[: out.index(tok.eos_token_id) + 1]
        assert list(text.input_ids) == ids + out
        assert (text.prompt_length, text.read_from, text.reads) == (len(ids), len(ids) - 1, len(out))


def test_a_text_longer_than_the_context_is_named(llama: LoadedModel) -> None:
    limit = llama.context_length
    assert limit is not None
    long = " ".join(["the"] * (limit + 5))
    with pytest.raises(
        CaaError, match=rf"my texts: text 2 is \d+ tokens, longer than the model's context of {limit}"
    ):
        fluency_texts(llama, PromptFormat(chat=False), ["a b", long], "all", source="my texts")
    with pytest.raises(CaaError, match="and its 32-token continuation"):
        fluency_texts(llama, PromptFormat(chat=False), [" ".join(["the"] * (limit - 10))], "answer")


def test_no_text_long_enough_is_refused(llama: LoadedModel) -> None:
    with pytest.raises(CaaError, match="neutral texts: no text is long enough"):
        fluency_texts(llama, PromptFormat(chat=False), ["the", "a"], "all")


def test_read_neutral_takes_text_for_all_and_prompt_otherwise(tmp_path: Path) -> None:
    both = tmp_path / "n.jsonl"
    both.write_text("".join(json.dumps({"text": f"t{i}", "prompt": f"p{i}"}) + "\n" for i in range(4)))
    assert read_neutral(both, 10, "all") == ["t0", "t1", "t2", "t3"]
    assert read_neutral(both, 2, "answer") == ["p0", "p1"]
    only_prompts = tmp_path / "p.jsonl"
    only_prompts.write_text('{"prompt": "hello"}\n')
    assert read_neutral(only_prompts, 5, "all") == ["hello"]  # the other field is accepted
    lines = tmp_path / "n.txt"
    lines.write_text("one\n\ntwo\n")
    assert read_neutral(lines, 5, "prompt-end") == ["one", "two"]


def test_read_neutral_names_the_field_when_neither_is_there(tmp_path: Path) -> None:
    bad = tmp_path / "n.jsonl"
    bad.write_text('{"words": "x"}\n')
    with pytest.raises(InputError) as e:
        read_neutral(bad, 5, "all")
    assert (e.value.where, e.value.field) == ("line 1", "prompt")


def test_default_neutral_files_exist_for_each_policy() -> None:
    for positions in ("all", "answer", "prompt-end"):
        path = default_neutral(positions)
        assert path.is_file()
        assert read_neutral(path, 3, positions)
