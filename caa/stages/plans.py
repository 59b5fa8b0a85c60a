"""What an extract, sweep or generate run reads and checks before its model loads.

A command parses its options, calls :func:`plan_extract`, :func:`plan_sweep` or :func:`plan_generate`,
loads the model and hands the plan to :func:`caa.stages.extract.run_extract`, :func:`caa.api.sweep` or
:func:`caa.api.generate`. Everything that can be refused
without the model (option values, input files, the vectors against the options, ``--layers`` against
the model's config) is refused here, in seconds, with the option or file named.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from caa.core.hooks import steer_start
from caa.core.options import parse_layers, parse_multipliers, parse_size
from caa.core.prompts import POSITIONS, TEMPLATES
from caa.errors import CaaError
from caa.evaluation.fluency import default_neutral, read_neutral
from caa.stages.generate import check_sampling, gather_prompts
from caa.stages.ingest import PairSet
from caa.stages.sweep import check_engine, held_out, sweep_work
from caa.stages.vectors import VectorSet


def require(ok: bool, message: str) -> None:
    """Refuse an option value: ``message`` names the option."""
    if not ok:
        raise CaaError(message)


def check_model_options(
    model: str, chat_template: str, layers: str | None, position: str = "last"
) -> list[int] | None:
    """The checks of --chat-template, --position and --layers that need no model: the layers (their
    range checked) where the model's config gives the layer count without loading it, else None."""
    from caa.models.specs import config_num_layers

    require(
        chat_template in TEMPLATES, f"--chat-template '{chat_template}': use one of {', '.join(TEMPLATES)}"
    )
    require(position in POSITIONS, f"--position '{position}': use one of {', '.join(POSITIONS)}")
    if layers is None:
        return None
    count = config_num_layers(model)
    chosen = parse_layers(layers, count)
    return chosen if count is not None else None


def check_vectors(
    vectors: VectorSet, behaviors: Sequence[str], layers: Sequence[int] | None, scale: str
) -> list[str]:
    """Refuse what ``scale`` cannot do with these vectors; the warnings about absurd vector norms."""
    for name in behaviors:
        for layer in vectors.require(name, layers):
            vectors.vector(name, layer, scale)  # residual needs the residual norms
    return vectors.absurd_norms(behaviors, list(layers) if layers is not None else None)


def plan_extract(
    pairs: Path,
    out: Path,
    *,
    model: str,
    layers: str,
    split: str = "all",
    behaviors: Sequence[str] | None = None,
    position: str = "last",
    chat_template: str = "auto",
    batch_size: int = 32,
    resume: bool = False,
) -> pd.DataFrame:
    """Check an extract run's options and output, and read the pairs it records."""
    from caa.stages.ingest import read_pairs, select_pairs
    from caa.store.checkpoint import check_fresh

    check_fresh(out, resume)  # OUT.partial/: an interrupted run, or a file in its way
    require(batch_size >= 1, f"--batch-size {batch_size}: must be at least 1")
    frame = select_pairs(read_pairs(pairs)[0], pairs, split, behaviors)
    check_model_options(model, chat_template, layers, position)
    return frame


@dataclass
class SweepPlan:
    """A sweep's inputs, read and checked: what :func:`caa.api.sweep` takes besides the model."""

    vectors: VectorSet
    pairs: PairSet
    behaviors: list[str]
    test: pd.DataFrame  # the held-out pairs swept
    multipliers: list[float]
    neutral: list[str]
    neutral_path: Path
    warnings: list[str] = field(default_factory=list)

    def arguments(self) -> dict[str, Any]:
        """What :func:`caa.api.sweep` takes from the plan, by name."""
        return {
            "vectors": self.vectors,
            "pairs": self.pairs,
            "multipliers": self.multipliers,
            "neutral": self.neutral,
            "behaviors": self.behaviors,
            "neutral_source": str(self.neutral_path),
        }

    def work(self, layers: Sequence[int] | None) -> int:
        """The texts the sweep scores over ``layers``: the total of its progress ticks."""
        return sweep_work(self.vectors, self.test, self.behaviors, layers, len(self.neutral))


def plan_sweep(
    vectors: Path,
    pairs: Path,
    *,
    model: str,
    behaviors: Sequence[str] | None = None,
    layers: str | None = None,
    multipliers: str = "-2,-1,0,1,2",
    max_pairs: int | None = None,
    neutral: Path | None = None,
    neutral_count: int = 16,
    max_kl: float = 0.5,
    max_anti: float | None = None,
    seed: int = 0,
    steer_positions: str = "answer",
    scale: str = "raw",
    engine: str = "fast",
    chat_template: str = "auto",
    max_memory: str | None = None,
    batch_size: int | None = None,
) -> SweepPlan:
    """Check a sweep's options and read its files (``neutral`` None: the packaged neutral texts)."""
    if max_memory is not None:
        parse_size(max_memory)
    require(batch_size is None or batch_size >= 1, f"--batch-size {batch_size}: must be at least 1")
    require(max_pairs is None or max_pairs >= 1, f"--max-pairs {max_pairs}: must be at least 1")
    require(neutral_count >= 1, f"--neutral-count {neutral_count}: must be at least 1")
    require(max_kl >= 0, f"--max-kl {max_kl}: must be 0 or above")
    require(max_anti is None or 0 <= max_anti <= 1, f"--max-anti {max_anti}: must be between 0 and 1")
    require(0 <= seed < 2**32, f"--seed {seed}: must be between 0 and 2**32 - 1")
    check_engine(engine)
    steer_start(steer_positions, 0)  # refuses an unknown policy
    mults = parse_multipliers(multipliers)
    vecs, pair_set = VectorSet.read(vectors), PairSet.read(pairs)
    names, test = held_out(vecs, pair_set.frame, pairs, behaviors, max_pairs)
    early = check_model_options(model, chat_template, layers)
    warnings = check_vectors(vecs, names, early, scale)
    neutral = neutral or default_neutral(steer_positions)
    texts = read_neutral(neutral, neutral_count, steer_positions)
    return SweepPlan(vecs, pair_set, names, test, mults, texts, neutral, warnings)


@dataclass
class GeneratePlan:
    """A generate run's inputs, read and checked: what :func:`caa.api.generate` takes besides the model."""

    vectors: VectorSet
    behavior: str
    prompts: list[str]
    labels: list[str]  # what names each prompt in errors
    multipliers: list[float]
    warnings: list[str] = field(default_factory=list)


def plan_generate(
    vectors: Path,
    *,
    model: str,
    layer: int,
    behavior: str | None = None,
    multipliers: str = "-1,0,1",
    prompts: Sequence[str] = (),
    prompts_file: Path | None = None,
    limit: int | None = None,
    max_new_tokens: int = 48,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    steer_positions: str = "answer",
    scale: str = "raw",
    chat_template: str = "auto",
    batch_size: int = 32,
) -> GeneratePlan:
    """Check a generate run's options and read its files."""
    check_sampling(max_new_tokens, temperature, top_p, seed, batch_size)
    mults = parse_multipliers(multipliers, include_zero=False)
    steer_start(steer_positions, 0)
    texts, labels = gather_prompts(prompts, prompts_file, limit)
    vecs = VectorSet.read(vectors)
    picked = vecs.pick(behavior)
    warnings = check_vectors(vecs, [picked], [layer], scale)
    check_model_options(model, chat_template, None)
    return GeneratePlan(vecs, picked, texts, labels, mults, warnings)
