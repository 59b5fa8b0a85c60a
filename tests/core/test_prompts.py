"""Prompt formats and fitting texts to the context (caa.prompts)."""

from __future__ import annotations

import pytest

from caa.errors import CaaError


def test_fit_context_cuts_the_prompt_start_only() -> None:
    from caa.core.prompts import Encoded, fit_context

    enc = Encoded(list(range(10)), 7, [8, 9])
    assert fit_context(enc, 10, False, "x") == (enc, False)
    assert fit_context(enc, 6, True, "x") == (Encoded([4, 5, 6, 7, 8, 9], 3, [4, 5]), True)
    with pytest.raises(CaaError, match="x is 10 tokens, longer than the model's context of 6"):
        fit_context(enc, 6, False, "x")
    with pytest.raises(CaaError, match="x: its completion alone is 3 tokens"):
        fit_context(enc, 3, True, "x")


@pytest.mark.parametrize("chunk", [1024, 7])
@pytest.mark.parametrize("chat", [True, False])
def test_encode_many_equals_encoding_each_text_alone(
    chat: bool, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batched tokeniser calls (one, or several of ``chunk`` texts) and each prompt templated once
    give every text exactly the tokens and read positions it gets alone, A/B and free-form, every
    position rule."""
    from caa.core.prompts import encode, encode_many, prompt_format

    monkeypatch.setattr("caa.core.prompts.ENCODE_CHUNK", chunk)
    from tests.helpers import AB_ROWS, FREEFORM_ROWS
    from tests.tiny_models import make_tokenizer

    tok = make_tokenizer(chat=chat)
    style = prompt_format(tok)
    assert style.chat == chat
    texts = [
        (r["question"], r[key], "ab", "answer")
        for r in AB_ROWS
        for key in ("answer_matching_behavior", "answer_not_matching_behavior")
    ]
    texts += [
        (r["prompt"], r[side], "freeform", position)
        for r in FREEFORM_ROWS
        for side in ("positive", "negative")
        for position in ("last", "mean")
    ]
    assert len({t[0] for t in texts}) < len(texts)  # prompts repeat, as a pair's two sides do
    assert len(texts) > 2 * 7  # several chunks of 7
    assert encode_many(tok, style, texts) == [encode(tok, style, *t) for t in texts]
    assert encode_many(tok, style, []) == []
    with pytest.raises(CaaError, match="--position 'first'"):
        encode_many(tok, style, [("a", "b", "freeform", "first")])


def test_a_system_prompt_goes_first_in_the_template_or_as_a_paragraph() -> None:
    """With a chat template, a system message before the user turn; without one, the system prompt
    as its own paragraph; a template that refuses or drops a system message is an error."""
    from caa.core.prompts import PromptFormat
    from tests.tiny_models import make_tokenizer

    tok = make_tokenizer(chat=True)
    chat = PromptFormat(chat=True, system="Be brief.")
    assert chat.prefix(tok, "hi") == "<|system|> Be brief. <|end|> <|user|> hi <|end|> <|assistant|> "
    assert PromptFormat(chat=True).prefix(tok, "hi") == "<|user|> hi <|end|> <|assistant|> "
    plain = PromptFormat(chat=False, system=" Be brief. \n")
    assert plain.prefix(tok, "hi \n") == "Be brief.\n\nhi\n"
    assert PromptFormat(chat=False).prefix(tok, "hi") == "hi\n"
    tok.chat_template = (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(CaaError, match=r"refuses a system message \(System role not supported\)"):
        chat.prefix(tok, "hi")
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    with pytest.raises(CaaError, match="drops the system message"):
        chat.prefix(tok, "hi")
