"""What an extract, sweep or generate run reads and checks before its model loads.

A client (the command line) builds the stage's options, calls :func:`plan_extract`,
:func:`plan_sweep` or :func:`plan_generate`, loads the model and hands the plan to the run. Everything
that can be refused without the model (option values, input files, the vectors against the
options, the layers against the model's config) is refused here, in seconds, naming the option or
file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from caa.core.options import model_layers
from caa.evaluation.fluency import default_neutral, read_neutral
from caa.models.specs import config_num_layers
from caa.stages.generate import gather_prompts
from caa.stages.ingest import PairSet, read_pairs, select_pairs
from caa.stages.options import ExtractOptions, GenerateOptions, SweepOptions
from caa.stages.prompting import SystemPrompts, prompting_layers, system_prompts
from caa.stages.sweep import held_out, sweep_work, texts_scored
from caa.stages.vectors import VectorSet
from caa.store.checkpoint import check_fresh


def check_model_layers(model: str, layers: Sequence[int] | None) -> bool:
    """``layers`` against the model's config, where it gives the layer count without loading it;
    whether it did (else the layers wait for the model)."""
    count = config_num_layers(model)
    if layers is not None and count is not None:
        model_layers(layers, count)
    return count is not None


def check_vectors(
    vectors: VectorSet, behaviors: Sequence[str], layers: Sequence[int] | None, scale: str
) -> list[str]:
    """Refuse what ``scale`` cannot do with these vectors; the warnings about absurd vector norms."""
    for name in behaviors:
        for layer in vectors.require(name, layers):
            vectors.vector(name, layer, scale)  # residual needs the residual norms
    return vectors.absurd_norms(behaviors, list(layers) if layers is not None else None)


def plan_extract(
    pairs: Path, out: Path, model: str, options: ExtractOptions, resume: bool = False
) -> pd.DataFrame:
    """Check an extract run's output and layers, and read the pairs it records."""
    check_fresh(out, resume)  # OUT.partial/: an interrupted run, or a file in its way
    frame = select_pairs(read_pairs(pairs)[0], pairs, options.split, options.behaviors)
    check_model_layers(model, options.layers)
    return frame


@dataclass
class SweepPlan:
    """A sweep's inputs, read and checked: what :func:`caa.api.sweep` takes besides the model."""

    vectors: VectorSet
    pairs: PairSet
    behaviors: list[str]
    test: pd.DataFrame  # the held-out pairs swept
    neutral: list[str]
    neutral_path: Path
    warnings: list[str] = field(default_factory=list)
    prompts: dict[str, SystemPrompts] = field(default_factory=dict)  # the prompting arms' behaviors
    prompting_layer: int | None = None

    def work(self, layers: Sequence[int] | None) -> int:
        """The texts the sweep scores over ``layers`` (the prompting arms' too): the total of its
        progress ticks."""
        total = sweep_work(self.vectors, self.test, self.behaviors, layers, len(self.neutral))
        for name, given in self.prompts.items():
            texts = texts_scored(self.test[self.test.behavior == name])
            count = 1 if self.prompting_layer is not None else len(self.vectors.require(name, layers))
            total += texts * count * len(given.arms())
        return total


def plan_sweep(
    vectors: Path, pairs: Path, model: str, options: SweepOptions, neutral: Path | None = None
) -> SweepPlan:
    """Read a sweep's files and check them against its options (``neutral`` None: the packaged
    neutral texts)."""
    vecs, pair_set = VectorSet.read(vectors), PairSet.read(pairs)
    names, test = held_out(vecs, pair_set.frame, pairs, options.behaviors, options.max_pairs)
    count = config_num_layers(model)  # None where the config does not say without loading
    if count is not None and options.layers is not None:
        model_layers(options.layers, count)
    known = options.layers if count is not None else None
    warnings = check_vectors(vecs, names, known, options.scale)
    neutral = neutral or default_neutral(options.steer_positions)
    texts = read_neutral(neutral, options.neutral_count, options.steer_positions)
    prompts: dict[str, SystemPrompts] = {}
    if options.prompting:
        prompts, said = system_prompts(test, names, options)
        warnings += said
        if options.prompting_layer is not None and count is not None:
            model_layers([options.prompting_layer], count, "prompting_layer")
        for name in prompts:
            prompting_layers(dict.fromkeys(vecs.require(name, options.layers)), name, options)
    return SweepPlan(vecs, pair_set, names, test, texts, neutral, warnings, prompts, options.prompting_layer)


@dataclass
class GeneratePlan:
    """A generate run's inputs, read and checked: what :func:`caa.api.generate` takes besides the model."""

    vectors: VectorSet
    behavior: str
    prompts: list[str]
    labels: list[str]  # what names each prompt in errors
    warnings: list[str] = field(default_factory=list)


def plan_generate(
    vectors: Path,
    model: str,
    options: GenerateOptions,
    prompts: Sequence[str] = (),
    prompts_file: Path | None = None,
    limit: int | None = None,
) -> GeneratePlan:
    """Read a generate run's vectors and prompts and check them against its options."""
    texts, labels = gather_prompts(prompts, prompts_file, limit)
    vecs = VectorSet.read(vectors)
    picked = vecs.pick(options.behavior)
    warnings = check_vectors(vecs, [picked], [options.layer], options.scale)
    if options.judge and not os.environ.get(options.judge_key_env):
        warnings.append(f"{options.judge_key_env} is not set: the judge's requests carry no API key")
    return GeneratePlan(vecs, picked, texts, labels, warnings)
