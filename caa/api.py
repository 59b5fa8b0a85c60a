"""The Python API: one function per stage, each taking and returning values in memory.

    import caa
    model = caa.load_model("smollm2-135m")
    pairs = caa.ingest("data/sentiment.jsonl")                                   # PairSet
    acts = caa.extract(model, pairs, caa.ExtractOptions(layers=(12, 18)))         # Activations
    vectors = caa.compute_vectors(acts)                                           # VectorSet
    result = caa.sweep(model, vectors, pairs)                                     # SweepResult
    gens = caa.generate(model, vectors, ["Hi."], caa.GenerateOptions(layer=18))   # Generations

Each stage's options are one dataclass (:mod:`caa.stages.options`): its fields are the options, it
checks them when made, and it is what the artifacts record. Each value saves itself (``.save(path)``
writes the file the command line writes, provenance included) and reads itself back
(``VectorSet.read(path)``, ...). The command line is a client of this module: it imports nothing
else of the library, so what it needs besides the verbs is named here too (the plans that check a
run before its model loads, the file checks, interchange and the report).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import pandas as pd

from caa.core.distributed import Shard
from caa.core.options import model_layers
from caa.errors import CaaError, OptionError
from caa.evaluation.comparison import read_comparison, sentence
from caa.evaluation.fluency import default_neutral, read_neutral
from caa.evaluation.judge import JudgeError
from caa.evaluation.scoring import fluency_label
from caa.models.cache import transformers_path
from caa.models.loading import LoadedModel, load_model
from caa.models.specs import config_num_layers
from caa.report.page import build_report, find_artifacts, write_report
from caa.report.summary import inspect_artifact, layer_spans
from caa.serve.launch import ServeOptions, ServePlan, plan_serve, run_serve
from caa.stages.extract import Activations, extract_in_memory, read_activations
from caa.stages.extract_file import run_extract, text_share
from caa.stages.foreign import read_foreign
from caa.stages.generate import Generations, run_generate
from caa.stages.ingest import PairSet, ingest_records, pair_set, parse_mapping
from caa.stages.ingest import ingest as ingest_files
from caa.stages.interchange import check_layers, export_format, export_vectors, import_vectors
from caa.stages.options import (
    MIN_TEMPERATURE,
    ExtractOptions,
    GenerateOptions,
    IngestOptions,
    SweepOptions,
    check_behavior,
)
from caa.stages.plans import GeneratePlan, SweepPlan, plan_extract, plan_generate, plan_sweep
from caa.stages.prompting import SystemPrompts
from caa.stages.side_effects import (
    Probe,
    chosen_cells,
    probe_work,
    read_probes,
    run_side_effects,
)
from caa.stages.steer import steer
from caa.stages.sweep import SweepResult, held_out, run_sweep, unprompted
from caa.stages.vectors import VectorSet, vector_rows, vector_set
from caa.store.checkpoint import partial_dir
from caa.store.datasets import cards, data_dir, resolve_dataset
from caa.store.outputs import check_outputs, side_effects_path, sweep_paths
from caa.store.schemas import EXPORT, KINDS, PLOT, REPORT
from caa.store.text import clean, text_problem

Source: TypeAlias = str | os.PathLike[str] | Sequence[Any] | pd.DataFrame
OUTPUTS = {**KINDS, PLOT.name: PLOT, EXPORT.name: EXPORT, REPORT.name: REPORT}  # what a command may write

__all__ = [
    "KINDS",
    "MIN_TEMPERATURE",
    "OUTPUTS",
    "Activations",
    "CaaError",
    "ExtractOptions",
    "GenerateOptions",
    "GeneratePlan",
    "Generations",
    "IngestOptions",
    "JudgeError",
    "LoadedModel",
    "OptionError",
    "PairSet",
    "Probe",
    "ServeOptions",
    "ServePlan",
    "SweepOptions",
    "SweepPlan",
    "SweepResult",
    "VectorSet",
    "build_report",
    "cards",
    "check_behavior",
    "check_layers",
    "check_outputs",
    "clean",
    "compute_vectors",
    "config_num_layers",
    "data_dir",
    "default_neutral",
    "export_format",
    "export_vectors",
    "extract",
    "extract_share",
    "extract_to_file",
    "find_artifacts",
    "fluency_label",
    "generate",
    "import_vectors",
    "ingest",
    "inspect_artifact",
    "layer_spans",
    "load_model",
    "model_layers",
    "parse_mapping",
    "partial_dir",
    "plan_extract",
    "plan_generate",
    "plan_serve",
    "plan_sweep",
    "probe_work",
    "read_activations",
    "read_comparison",
    "read_foreign",
    "read_probes",
    "resolve_dataset",
    "run_serve",
    "sentence",
    "serve",
    "side_effects",
    "side_effects_path",
    "steer",
    "sweep",
    "sweep_paths",
    "text_problem",
    "transformers_path",
    "unprompted",
    "write_report",
]


def _model(model: LoadedModel | str) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model)


def _options(given: Any, kind: type, defaults: bool = True) -> Any:
    """The options given, or (with ``defaults``) the defaults; anything else is refused, not ignored."""
    if given is None and defaults:
        return kind()
    if not isinstance(given, kind):
        raise OptionError("options", given, f"must be a {kind.__name__}")
    return given


def ingest(source: Source, options: IngestOptions | None = None) -> PairSet:
    """Contrastive pairs from a file path, a list of paths, a list of dicts (A/B or free-form rows, as
    a file holds them) or a DataFrame, validated, with a stable train/test split."""
    options = _options(options, IngestOptions)
    recorded = options.provenance()
    if isinstance(source, pd.DataFrame):
        source = source.to_dict("records")
    if isinstance(source, (str, os.PathLike)):
        source = [source]
    rows = list(source)
    fields: dict[str, Any] = {
        "behavior": options.behavior,
        "mapping": options.mapping,
        "test_fraction": options.test_fraction,
        "seed": options.seed,
        "skip_invalid": options.skip_invalid,
    }
    if rows and all(isinstance(r, (str, os.PathLike)) for r in rows):
        paths = [Path(r) for r in rows]
        return pair_set(ingest_files(paths, **fields), paths, {**recorded, "files": [str(p) for p in paths]})
    return pair_set(ingest_records(rows, **fields), (), recorded)


def extract(
    model: LoadedModel | str,
    pairs: PairSet,
    options: ExtractOptions | None = None,
    *,
    on_texts: Callable[[int], None] | None = None,
    notice: Callable[[str], None] | None = None,
) -> Activations:
    """Residual-stream activations of both sides of every pair (of ``options.split`` and
    ``options.behaviors``) at ``options.layers`` (None: every block; layer l is the output of decoder
    block l), in memory."""
    options = _options(options, ExtractOptions)
    loaded = _model(model)
    selected = pairs.select(options.split, options.behaviors)
    return extract_in_memory(
        loaded, selected.frame, options, pairs_path=pairs.path, on_texts=on_texts, notice=notice
    )


def extract_to_file(
    model: LoadedModel,
    pairs: pd.DataFrame,
    pairs_path: Path,
    out: Path,
    options: ExtractOptions,
    *,
    resume: bool = False,
    provenance: Mapping[str, Any] | None = None,
    on_texts: Callable[[int], None] | None = None,
    notice: Callable[[str], None] | None = None,
    accelerator: Any = None,
) -> int:
    """``caa extract``: the activations of ``pairs`` (from :func:`plan_extract`) streamed to ``out``
    with checkpoints (``resume`` continues an interrupted run); under ``accelerate launch`` (pass the
    ``Accelerator``) the pairs are shared out and merged. Returns the number of pairs."""
    return run_extract(
        pairs,
        pairs_path,
        out,
        model,
        options,
        resume=resume,
        provenance=provenance,
        on_texts=on_texts,
        notice=notice,
        shard=Shard.of(accelerator),
    )


def extract_share(pairs: pd.DataFrame, options: ExtractOptions, accelerator: Any = None) -> float:
    """How many of ``pairs`` (in texts / 2) this process of ``accelerate launch`` extracts: the
    total of its progress."""
    work = text_share(2 * len(pairs), options.batch_size, Shard.of(accelerator))
    return sum(b - a for a, b in work) / 2


def compute_vectors(
    activations: Activations, method: str = "mean", *, provenance: Mapping[str, Any] | None = None
) -> VectorSet:
    """Mean-difference (or ``pca``) steering vectors per behavior and layer, with diagnostics;
    ``provenance`` (what a caller was told besides) goes into their metadata."""
    return vector_set(vector_rows(activations, method), activations, {**(provenance or {}), "method": method})


def sweep(
    model: LoadedModel | str,
    vectors: VectorSet,
    pairs: PairSet,
    options: SweepOptions | None = None,
    *,
    neutral: Sequence[str] | None = None,
    neutral_source: str = "neutral texts",
    provenance: Mapping[str, Any] | None = None,
    inputs: Mapping[str, Path] | None = None,
    tick: Callable[[int], None] | None = None,
    notice: Callable[[str], None] | None = None,
    accelerator: Any = None,
    probes: Sequence[Probe] | None = None,
    prompts: Mapping[str, SystemPrompts] | None = None,
) -> SweepResult:
    """Score the held-out pairs at every (layer, multiplier), with the fluency cost, the per-item
    reliability and the recommendation. ``neutral``: texts for the fluency cost (default: the
    project's neutral prompts, or neutral text with ``steer_positions="all"``; ``neutral_source``
    names given ones in messages). ``provenance`` (what a caller was told besides the options) and
    ``inputs`` (files, hashed) go into the result's metadata; ``tick`` counts texts scored;
    ``notice`` receives one-line notes. Under ``accelerate launch``, pass the ``Accelerator``: each
    process runs its share of the batches and every process returns the whole result. With
    ``options.side_effects`` (or ``probes``, from :func:`read_probes`) the result also holds
    :func:`side_effects`. With ``options.prompting``, ``prompts`` are the system prompts a
    :func:`plan_sweep` found (and warned about); by default they are found here, said in ``notice``."""
    options = _options(options, SweepOptions)
    loaded = _model(model)
    path = pairs.path or Path("pairs")
    names, test = held_out(vectors, pairs.frame, path, options.behaviors, options.max_pairs)
    if neutral is None:
        default = default_neutral(options.steer_positions)
        neutral = read_neutral(default, options.neutral_count, options.steer_positions)
        neutral_source = str(default)
    elif isinstance(neutral, str):
        raise OptionError("neutral", neutral, "must be a list of texts, not one string")
    result = run_sweep(
        loaded,
        vectors,
        test,
        list(neutral),
        options,
        behaviors=names,
        pairs_path=path,
        neutral_source=neutral_source,
        provenance=dict(provenance or {}),
        inputs=dict(inputs or {}),
        tick=tick,
        notice=notice,
        shard=Shard.of(accelerator),
        prompts=prompts,
    )
    if options.side_effects or probes:
        result.side_effects = side_effects(
            loaded, vectors, result, options, probes=probes, tick=tick, notice=notice, accelerator=accelerator
        )
    return result


def side_effects(
    model: LoadedModel | str,
    vectors: VectorSet,
    result: SweepResult,
    options: SweepOptions | None = None,
    *,
    probes: Sequence[Probe] | None = None,
    tick: Callable[[int], None] | None = None,
    notice: Callable[[str], None] | None = None,
    accelerator: Any = None,
) -> pd.DataFrame:
    """What steering does off target: each swept behavior's cell (its recommended one, else its best
    gain, said in ``notice``) evaluated on the held-out items of the other sets ``options.side_effects``
    names (or ``probes``, from :func:`read_probes`; ``capability`` is the built-in probe of general
    knowledge). One row per behavior and set: the mean score unsteered and steered, their difference
    and its paired 95% interval. Pass the sweep's ``options``: the texts are put to the model as they
    say (template, steered positions, scale, engine)."""
    options = _options(options, SweepOptions)
    if probes is None:
        probes = read_probes(options.side_effects, options.side_effects_max_items)
    cells = chosen_cells(result.recommended, result.best, notice)
    return run_side_effects(
        _model(model), vectors, cells, probes, options, tick=tick, notice=notice, shard=Shard.of(accelerator)
    )


def generate(
    model: LoadedModel | str,
    vectors: VectorSet,
    prompts: Sequence[str],
    options: GenerateOptions,
    *,
    labels: Sequence[str] | None = None,
    provenance: Mapping[str, Any] | None = None,
    inputs: Mapping[str, Path] | None = None,
    notice: Callable[[str], None] | None = None,
    accelerator: Any = None,
    on_rows: Callable[[int], None] | None = None,
    on_judged: Callable[[int], None] | None = None,
) -> Generations:
    """Every prompt under every multiplier, ``options.batch_size`` prompts per batch (greedy unless
    ``options.temperature`` > 0). ``labels`` name the prompts in errors; ``provenance`` and
    ``inputs`` (files, hashed) go into the result's metadata; ``notice`` receives one-line notes (a
    batch retried in halves after running out of CUDA memory). Under ``accelerate launch``, pass the
    ``Accelerator``: the batches are shared out, and every process returns all the rows.

    ``options.score="probe"`` adds each text's ``probe_score`` (the unsteered model's mean
    projection on the unit vector over the generated tokens); ``options.judge`` has an
    OpenAI-compatible endpoint rate each text 1-10 (``judge_rating``; on the main process only). A
    judge that fails raises :class:`JudgeError`, whose ``partial`` holds the unrated generations.
    ``on_rows`` and ``on_judged`` get the texts made (batch by batch) and rated (one by one).
    ``Generations.scores()`` gives both per multiplier with their 95% intervals."""
    if isinstance(prompts, str):
        prompts = [prompts]
    return run_generate(
        _model(model),
        vectors,
        list(prompts),
        _options(options, GenerateOptions, defaults=False),  # its layer has no default
        labels=labels,
        provenance=dict(provenance or {}),
        inputs=dict(inputs or {}),
        shard=Shard.of(accelerator),
        notice=notice,
        on_rows=on_rows,
        on_judged=on_judged,
    )


def serve(
    vectors: Path | str,
    model: str = "smollm2-135m",
    options: ServeOptions | None = None,
    *,
    on_ready: Callable[[ServePlan], None] = lambda plan: None,
    on_output: Callable[[str], None] = lambda line: None,
    progress: Callable[[str], None] | None = None,
) -> int:
    """Serve ``model`` on vLLM's OpenAI-compatible server, each request steered by the vectors of
    ``vectors`` as it asks (``extra_body={"steering": {"behavior", "layer", "multiplier", ...}}``).

    Everything that can be refused is refused before an engine starts (the vectors' model, the port,
    vLLM missing: a :class:`CaaError`); then this blocks until the server exits (its exit code) or
    the caller is interrupted (the server and its engine processes are stopped first).
    ``on_ready`` is called once the server answers; ``on_output`` gets each line vLLM prints."""
    plan = plan_serve(vectors, model, _options(options, ServeOptions), progress)
    return run_serve(plan, on_ready, on_output)
