"""How a pair becomes token ids: the chat template, where the completion starts, which tokens are read.

Every position comes from the tokenizer's character offsets, never from string lengths, so a
completion whose first token merges with the text before it is still found.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from caa.errors import CaaError, InputError
from caa.store.records import read_records

POSITIONS = ("last", "mean", "answer")
TEMPLATES = ("auto", "on", "off")


@dataclass(frozen=True)
class PromptFormat:
    """How prompts are rendered for one model: through its chat template, or as plain text; with
    ``system``, a system prompt of ours goes first (a system message in the chat template, in place of
    any default the template has; in plain text, its own paragraph before the prompt)."""

    chat: bool
    system: str | None = None

    def prefix(self, tokenizer: Any, prompt: str) -> str:
        """The text before the completion: the user turn and the assistant header, or the prompt."""
        if self.chat:
            messages = [{"role": "user", "content": prompt}]
            if self.system is not None:
                messages.insert(0, {"role": "system", "content": self.system})
            try:
                text = str(
                    tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                )
            except Exception as e:  # jinja's TemplateError: e.g. "System role not supported"
                if self.system is None:
                    raise
                raise CaaError(f"this model's chat template refuses a system message ({e})") from None
            if self.system is not None and self.system.strip() not in text:
                raise CaaError("this model's chat template drops the system message: it cannot be prompted")
            return text
        if self.system is not None:
            return f"{self.system.strip()}\n\n{prompt.rstrip()}\n"
        return prompt.rstrip() + "\n"

    def describe(self) -> dict[str, Any]:
        return {"chat_template": self.chat}


def prompt_format(tokenizer: Any, chat_template: str = "auto") -> PromptFormat:
    """``auto`` uses the tokenizer's chat template when it has one; ``on`` requires it; ``off`` never."""
    if chat_template not in TEMPLATES:
        raise CaaError(f"--chat-template '{chat_template}': use one of {', '.join(TEMPLATES)}")
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat_template == "on" and not has:
        raise CaaError("--chat-template on: this model's tokenizer has no chat template")
    return PromptFormat(chat=has and chat_template != "off")


@dataclass(frozen=True)
class Encoded:
    """One text as token ids, with the token where the completion starts and the tokens read."""

    input_ids: list[int]
    completion_start: int  # first token that overlaps the completion: steering starts here
    read: list[int]  # token positions whose block outputs are averaged (one for last/answer)


def fit_context(enc: Encoded, limit: int | None, truncate: bool, what: str) -> tuple[Encoded, bool]:
    """``enc`` if it fits ``limit`` tokens; with ``truncate``, its last ``limit`` tokens (the start
    of the prompt is cut, the completion is kept); returns the text and whether it was cut.

    ``what`` names the text in the error for one too long (or whose completion alone is too long)."""
    n = len(enc.input_ids)
    if limit is None or n <= limit:
        return enc, False
    cut = n - limit
    if not truncate:
        raise CaaError(
            f"{what} is {n} tokens, longer than the model's context of {limit}: "
            "shorten it, or pass --truncate to cut the start of long prompts"
        )
    if enc.completion_start - cut < 1:
        raise CaaError(
            f"{what}: its completion alone is {n - enc.completion_start} tokens, "
            f"too long for the model's context of {limit} even with --truncate"
        )
    return Encoded(enc.input_ids[cut:], enc.completion_start - cut, [r - cut for r in enc.read]), True


def completion_text(fmt: str, completion: str) -> str:
    """The text appended after the prefix: for A/B pairs the answer's opening, e.g. ``(A``."""
    return completion.rstrip(")") if fmt == "ab" else completion


def encode(
    tokenizer: Any, style: PromptFormat, prompt: str, completion: str, fmt: str, position: str = "last"
) -> Encoded:
    """Tokenise prefix + completion and locate the completion and the tokens to read.

    ``position``: ``answer`` (the answer-letter token; the rule for A/B pairs), ``last`` (the last
    completion token) or ``mean`` (all completion tokens).
    """
    return encode_many(tokenizer, style, [(prompt, completion, fmt, position)])[0]


# Texts per tokeniser call: enough for a fast tokeniser to use every core, few enough that the token
# offsets of a whole dataset (Python tuples, several times the size of the ids kept) are never held at
# once.
ENCODE_CHUNK = 1024


def encode_many(
    tokenizer: Any, style: PromptFormat, texts: Sequence[tuple[str, str, str, str]]
) -> list[Encoded]:
    """:func:`encode` of each (prompt, completion, format, position), the same tokens and positions:
    each prompt templated once (a pair's two sides share it) and one tokeniser call per
    ``ENCODE_CHUNK`` texts (a fast tokeniser encodes a list on every core)."""
    for *_, position in texts:
        if position not in POSITIONS:
            raise CaaError(f"--position '{position}': use one of {', '.join(POSITIONS)}")
    prefixes: dict[str, str] = {}
    for prompt, *_ in texts:
        if prompt not in prefixes:
            prefixes[prompt] = style.prefix(tokenizer, prompt)
    tails = [completion_text(fmt, completion) for _, completion, fmt, _ in texts]
    starts = [len(prefixes[prompt]) for prompt, *_ in texts]
    whole = [prefixes[prompt] + tail for (prompt, *_), tail in zip(texts, tails, strict=True)]
    made: list[Encoded] = []
    for at in range(0, len(whole), ENCODE_CHUNK):
        enc = tokenizer(
            whole[at : at + ENCODE_CHUNK], add_special_tokens=not style.chat, return_offsets_mapping=True
        )
        chunk = slice(at, at + ENCODE_CHUNK)
        made += [
            _locate(ids, offsets, start, tail, fmt, position)
            for ids, offsets, start, tail, (_, _, fmt, position) in zip(
                enc["input_ids"],
                enc["offset_mapping"],
                starts[chunk],
                tails[chunk],
                texts[chunk],
                strict=True,
            )
        ]
    return made


def _locate(
    ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    start_char: int,
    tail: str,
    fmt: str,
    position: str,
) -> Encoded:
    """The completion's first token and the tokens to read, from the character offsets."""
    spans = [(i, s, e) for i, (s, e) in enumerate(offsets) if e > s]
    completion_tokens = [i for i, s, e in spans if e > start_char]
    if not completion_tokens:
        raise CaaError(f"the completion {tail!r} produced no tokens")
    if fmt == "ab" and position in ("answer", "last"):
        letter_char = start_char + len(tail) - 1  # the letter closes "(A"
        read = [next(i for i, s, e in spans if s <= letter_char < e)]
    elif position == "mean":
        read = completion_tokens
    else:
        read = [completion_tokens[-1]]
    return Encoded(input_ids=list(ids), completion_start=completion_tokens[0], read=read)


@dataclass
class Batch:
    """Padded token ids with their mask, position ids and per-row token positions."""

    input_ids: torch.Tensor  # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq]
    position_ids: torch.Tensor  # [batch, seq]
    offsets: torch.Tensor  # [batch] index of each row's first real token (left padding)
    read_weights: torch.Tensor  # [batch, seq] weights of the read tokens, summing to 1 per row
    completion_start: torch.Tensor  # [batch] padded position where each row's completion starts

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            *(
                t.to(device)
                for t in (
                    self.input_ids,
                    self.attention_mask,
                    self.position_ids,
                    self.offsets,
                    self.read_weights,
                    self.completion_start,
                )
            )
        )


def collate(items: Sequence[Encoded], pad_id: int, padding_side: str = "left") -> Batch:
    """Pad a list of encoded texts into one batch. Position ids count real tokens only, so a row's
    numbers do not depend on its padding, whichever side it is on."""
    width = max(len(e.input_ids) for e in items)
    n = len(items)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    weights = torch.zeros((n, width), dtype=torch.float32)
    offsets = torch.zeros(n, dtype=torch.long)
    for row, e in enumerate(items):
        off = width - len(e.input_ids) if padding_side == "left" else 0
        offsets[row] = off
        input_ids[row, off : off + len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[row, off : off + len(e.input_ids)] = 1
        weights[row, [off + r for r in e.read]] = 1.0 / len(e.read)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    starts = offsets + torch.tensor([e.completion_start for e in items])
    return Batch(input_ids, mask, position_ids, offsets, weights, starts)


TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def read_texts(path: Path, field: str) -> list[str]:
    """Texts from a .txt (one per line), .jsonl (objects with ``field``) or .parquet (a ``field``
    column), with errors that name the file, the line and the field; blank texts are skipped."""
    path = Path(path)
    texts: list[str] = []
    hint = "use .txt, .jsonl or .parquet"
    for where, record in read_records(path, TEXT_SUFFIXES, hint, allow_empty=True, line_field=field):
        text = record.get(field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise InputError(path, f"expected an object with a {field} string", where=where, field=field)
        if text.strip():
            texts.append(text)
    if not texts:
        raise InputError(path, "no texts in file")
    return texts
