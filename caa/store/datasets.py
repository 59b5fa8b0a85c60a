"""The datasets and neutral texts shipped inside caa, and their cards.

They are the package ``caa._data``, which is the repository's ``data/`` directory (pyproject.toml maps
one onto the other), read through importlib.resources, so they are found from any directory and in
any install. Their cards are the sections of ``data/README.md``, parsed here and nowhere else:

    ## sentiment.jsonl (free-form, 194 pairs)

    Positive versus negative emotional tone. ...

gives the file, its format and its size in the heading and what it holds in the first sentence; the
``- Source:`` and ``- License:`` lines before the first section apply to every file unless a section
has its own. A dataset's section may give the system prompts that ask a model for its behavior and for
the opposite (``- System positive:`` and ``- System negative:``), which `caa sweep --prompting`
compares steering with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path

from caa.errors import CaaError

DATA_PACKAGE = "caa._data"
CARDS_FILE = "README.md"
# "## sycophancy.json (A/B, 190 questions)" or "## neutral_prompts.txt (80 prompts)"
_HEADING = re.compile(r"^## (?P<file>\S+) \((?:(?P<format>A/B|free-form), )?(?P<count>\d+) (?P<unit>\w+)\)$")
_FIELD = re.compile(r"^- (?P<key>Source|License|System positive|System negative): (?P<value>.+)$")
_OWN = ("System positive", "System negative")  # a section's own: never defaults for every file
_SENTENCE = re.compile(r"^(.+?[.!?])(?=\s|$)")
NEUTRAL_PROMPTS = "neutral_prompts.txt"
NEUTRAL_TEXT = "neutral_text.jsonl"


@dataclass(frozen=True)
class Card:
    """One shipped file, as data/README.md describes it."""

    name: str  # what `caa ingest NAME` takes: the file's stem
    file: str
    format: str  # "A/B", "free-form" or "neutral"
    count: int  # items in the file: questions, pairs, prompts or passages
    unit: str
    description: str  # the first sentence of its section
    source: str
    licence: str
    system_positive: str = ""  # a system prompt asking for the behavior ("" where the card has none)
    system_negative: str = ""  # one asking for its opposite

    @property
    def is_pairs(self) -> bool:
        """Whether ``caa ingest`` reads it (a dataset of contrastive pairs, not neutral text)."""
        return self.format != "neutral"

    @property
    def path(self) -> Path:
        return data_dir() / self.file


def data_dir() -> Path:
    """The directory of the shipped files: data/ in the repository, caa/_data/ in an installed wheel."""
    root = files(DATA_PACKAGE)
    if not isinstance(root, Path):  # a zipped install: importlib.resources would extract each file
        raise CaaError(f"the package {DATA_PACKAGE} is not installed as files ({root}): reinstall caa")
    return root


@cache
def cards() -> tuple[Card, ...]:
    """Every shipped file's card, in the order of data/README.md (datasets first, then neutral texts)."""
    text = (data_dir() / CARDS_FILE).read_text(encoding="utf-8")
    return tuple(_parse_cards(text))


def _parse_cards(text: str) -> list[Card]:
    defaults: dict[str, str] = {}
    sections: list[tuple[re.Match[str], dict[str, str], list[str]]] = []
    for line in text.splitlines():
        if heading := _HEADING.match(line):
            sections.append((heading, {}, []))
        elif (field := _FIELD.match(line)) and (sections or field["key"] not in _OWN):
            (sections[-1][1] if sections else defaults)[field["key"]] = field["value"].strip()
        elif sections and line.strip():
            sections[-1][2].append(line.strip())
    out = []
    for heading, fields, body in sections:
        fields = {**defaults, **fields}
        first = _SENTENCE.match(" ".join(body))
        out.append(
            Card(
                name=Path(heading["file"]).stem,
                file=heading["file"],
                format=heading["format"] or "neutral",
                count=int(heading["count"]),
                unit=heading["unit"],
                description=first.group(1) if first else "",
                source=fields.get("Source", ""),
                licence=fields.get("License", ""),
                system_positive=fields.get("System positive", ""),
                system_negative=fields.get("System negative", ""),
            )
        )
    return out


def datasets() -> list[Card]:
    """The cards of the shipped datasets of contrastive pairs (what `caa ingest NAME` accepts)."""
    return [c for c in cards() if c.is_pairs]


def builtin(name: str) -> Card | None:
    """The shipped dataset called ``name`` (its stem, e.g. ``sentiment``, or its file name), if any."""
    return next((c for c in datasets() if name in (c.name, c.file)), None)


def resolve_dataset(arg: Path) -> tuple[Path, Card | None]:
    """An input of `caa ingest`: ``(arg, None)`` where a file (or anything) of that name exists or the
    name has a directory part; else the shipped dataset of that name and its card. A bare name that
    is neither raises one error listing the built-in datasets."""
    if arg.exists() or len(arg.parts) != 1:
        return arg, None
    card = builtin(arg.name)
    if card is None:
        names = ", ".join(c.name for c in datasets())
        raise CaaError(f"{arg}: no such file, and not a built-in dataset (built-in: {names})")
    return card.path, card


def neutral_prompts() -> Path:
    """The shipped neutral prompts (.txt, one per line): greedy continuations measure fluency."""
    return data_dir() / NEUTRAL_PROMPTS


def neutral_text() -> Path:
    """The shipped neutral passages (.jsonl of {"text"}): fluency read at every position."""
    return data_dir() / NEUTRAL_TEXT


def default_neutral(steer_positions: str) -> Path:
    """`caa sweep`'s default --neutral: the neutral text under ``all``, else the neutral prompts."""
    return neutral_text() if steer_positions == "all" else neutral_prompts()
