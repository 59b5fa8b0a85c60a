"""A/B answers on a tokenizer that merges the parenthesis with the letter (Qwen's: "(A" and "(B" are
single tokens): extract reads the "(A" token itself, and the sweep scores p("(A") against p("(B")
from the position before it, the prompt's last token; never "A" after a "(" the model would not write.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import caa
from caa.core.prompts import encode, prompt_format
from caa.evaluation.engines import ScoreText, run_grid
from caa.evaluation.scoring import ab_scores
from caa.models.loading import LoadedModel, load_model
from caa.stages.options import ExtractOptions
from caa.stages.sweep import ab_text
from tests.helpers import AB_ROWS
from tests.tiny_models import CHARACTERS, SPECIALS, WORDS, make_config

# ChatML's shape: the assistant header ends in a newline, so the answer "(A" starts a word of its own
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def merging_tokenizer() -> Any:
    """A byte-level BPE with Qwen's split rule (one non-letter may open a word: "(A"), trained on text
    where "(A" and "(B" are frequent enough to become tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    split = r"""[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS), " ".join(CHARACTERS)] + ["(A\n(B\n(A)\n(B)"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=SPECIALS[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A tiny random Qwen2 model with that tokenizer, saved and loaded back as a user's would be."""
    from transformers import AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("merged")
    tokenizer = merging_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config("qwen2", vocab_size=len(tokenizer)))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return load_model(str(directory), device="cpu")


QUESTION = AB_ROWS[0]["question"]


def _prefix_ids(loaded: LoadedModel, question: str) -> list[int]:
    tok = loaded.tokenizer
    return list(tok(prompt_format(tok).prefix(tok, question), add_special_tokens=False)["input_ids"])


def test_the_tokenizer_merges_the_parenthesis(merged: LoadedModel) -> None:
    tok = merged.tokenizer
    assert tok.convert_ids_to_tokens(tok("\n(A", add_special_tokens=False)["input_ids"]) == ["Ċ", "(A"]
    assert tok.convert_ids_to_tokens(tok("\n(B", add_special_tokens=False)["input_ids"]) == ["Ċ", "(B"]


def test_extract_reads_the_merged_letter_token(merged: LoadedModel) -> None:
    tok = merged.tokenizer
    prefix = _prefix_ids(merged, QUESTION)
    enc = encode(tok, prompt_format(tok), QUESTION, "(B)", "ab", "answer")
    # the prefix, then one token "(B": the completion starts at the letter, and it is the one read
    assert enc.input_ids == [*prefix, tok.convert_tokens_to_ids("(B")]
    assert enc.completion_start == enc.read[0] == len(prefix)
    assert tok.convert_ids_to_tokens(enc.input_ids[len(prefix) - 1]) == "Ċ"
    # caa.extract stores each side's block outputs at its letter token: hidden_states[l + 1] there
    row = AB_ROWS[0]
    pairs = caa.ingest([row], caa.IngestOptions(behavior="agree", test_fraction=0.0))
    acts = caa.extract(merged, pairs, ExtractOptions(layers=(1, 2)))
    for side, answer in (
        ("positive", row["answer_matching_behavior"]),
        ("negative", row["answer_not_matching_behavior"]),
    ):
        ids = encode(tok, prompt_format(tok), QUESTION, answer, "ab", "answer").input_ids
        assert tok.convert_ids_to_tokens(ids[-1]) == answer[:2]
        with torch.inference_mode():
            states = merged.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        for layer in (1, 2):
            at = np.flatnonzero((acts.keys.side == side) & (acts.keys.layer == layer))
            assert len(at) == 1
            np.testing.assert_allclose(acts.values[at[0]], states[layer + 1][0, -1].numpy(), atol=1e-5)


def _set_answer_logits(loaded: LoadedModel, ids: list[int], logits: dict[str, float]) -> None:
    """Make the model's next-token logits after ``ids`` exactly ``logits`` for the named tokens and 0
    for every other: the output rows are zero but those tokens', which are the final hidden state
    scaled to give their logit."""
    with torch.inference_mode():
        h = loaded.model.model(torch.tensor([ids])).last_hidden_state[0, -1]
    head = loaded.model.lm_head.weight
    with torch.no_grad():
        head.zero_()
        for token, logit in logits.items():
            head[loaded.tokenizer.convert_tokens_to_ids(token)] = h * (logit / float(h @ h))


def test_the_sweep_scores_the_merged_tokens_from_the_prompts_last_position(merged: LoadedModel) -> None:
    tok = merged.tokenizer
    prefix = _prefix_ids(merged, QUESTION)
    text = ab_text(merged, prompt_format(tok), QUESTION, "(B)", "(A)")
    a, b = tok.convert_tokens_to_ids(["(A", "(B"])
    assert text == ScoreText(tuple(prefix), len(prefix), len(prefix) - 1, 1, (b, a))
    # p("(A") = 3/5, p("(B") = 1/5: e^logit of 3(V-2) and V-2 against V-2 tokens at logit 0
    others = merged.model.config.vocab_size - 2
    saved = merged.model.lm_head.weight.detach().clone()
    try:
        _set_answer_logits(merged, prefix, {"(A": float(np.log(3 * others)), "(B": float(np.log(others))})
        with torch.inference_mode():
            p = torch.softmax(merged.model(torch.tensor([prefix])).logits[0, -1].double(), -1)
        assert float(p[a] + p[b]) == pytest.approx(0.8, abs=1e-5)  # the mass the score divides
        assert float(p[tok.convert_tokens_to_ids("A")] + p[tok.convert_tokens_to_ids("B")]) < 0.01

        def mass(texts: list[ScoreText], logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
            ids = torch.tensor([t.targets for t in texts])
            return (
                logp[:, :, 0]
                .gather(-1, ids[:, None, :].expand(-1, logp.shape[1], -1))
                .exp()
                .sum(-1)[..., None]
            )

        zero = {1: torch.zeros(merged.model.config.hidden_size)}
        for engine in ("fast", "naive"):
            got = run_grid(engine, merged, [text], zero, [0.0], mass, "prompt-end")[1]
            assert got[0, 0, 0] == pytest.approx(0.8, abs=1e-5)
            score = run_grid(engine, merged, [text], zero, [0.0], ab_scores, "prompt-end")[1]
            assert score[0, 0, 0] == pytest.approx(0.25, abs=1e-5)  # p(matching "(B") / 0.8
    finally:
        with torch.no_grad():
            merged.model.lm_head.weight.copy_(saved)


@pytest.mark.parametrize("positions", ["answer", "prompt-end"])
def test_steering_reaches_the_score_only_where_the_prompts_last_token_is_steered(
    merged: LoadedModel, positions: str
) -> None:
    """The letter is predicted from the prompt's last token: ``answer`` (the paper's rule) leaves it
    unsteered, so the score cannot move, and the sweep says so; ``prompt-end`` steers it, and the
    score equals one unbatched forward steering from that token."""
    tok = merged.tokenizer
    text = ab_text(merged, prompt_format(tok), QUESTION, "(B)", "(A)")
    torch.manual_seed(1)
    vector = torch.randn(merged.model.config.hidden_size)
    multipliers = [-4.0, 0.0, 4.0]
    got = run_grid("fast", merged, [text], {2: vector}, multipliers, ab_scores, positions)[2][0, :, 0]

    def reference(m: float) -> float:
        """p(matching) from one unbatched forward adding ``m * vector`` from the prompt's last token."""

        def hook(module: Any, args: Any, output: Any) -> Any:
            hidden = (output[0] if isinstance(output, tuple) else output).clone()
            hidden[:, len(text.input_ids) - 1 :] += m * vector
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = merged.blocks[2].register_forward_hook(hook)
        try:
            with torch.inference_mode():
                p = torch.softmax(merged.model(torch.tensor([list(text.input_ids)])).logits[0, -1], -1)
        finally:
            handle.remove()
        return float(p[text.targets[0]] / p[list(text.targets)].sum())

    expected = [reference(m) for m in multipliers]
    if positions == "answer":
        np.testing.assert_allclose(got, [expected[1]] * 3, atol=1e-5)
    else:
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert abs(expected[2] - expected[0]) > 1e-3
