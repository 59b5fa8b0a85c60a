"""The Python API: one function per stage, each taking and returning values in memory.

    import caa
    model = caa.load_model("smollm2-135m")
    pairs = caa.ingest("data/sentiment.jsonl")            # PairSet
    acts = caa.extract(model, pairs, layers=[12, 18])      # Activations
    vectors = caa.compute_vectors(acts)                    # VectorSet
    result = caa.sweep(model, vectors, pairs)              # SweepResult
    gens = caa.generate(model, vectors, ["Hi."], layer=18) # Generations

Each value saves itself (``.save(path)`` writes the file the command line writes, provenance
included) and reads itself back (``VectorSet.read(path)``, ...). The command line is a client of
these same functions.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from caa.core.budget import parse_size, planner_for
from caa.core.distributed import Shard
from caa.core.hooks import steer_start, steering
from caa.errors import CaaError
from caa.evaluation.fluency import default_neutral, read_neutral
from caa.models.loading import LoadedModel, decoder_blocks, load_model
from caa.stages.extract import Activations, extract_in_memory, parse_layers
from caa.stages.generate import Generations, run_generate
from caa.stages.ingest import PairSet, ingest_records, pair_set
from caa.stages.ingest import ingest as ingest_files
from caa.stages.sweep import SweepResult, held_out, run_sweep
from caa.stages.vectors import VectorSet, vector_rows, vector_set

Source: TypeAlias = str | os.PathLike[str] | Sequence[Any] | pd.DataFrame


def _model(model: LoadedModel | str) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model)


def ingest(
    source: Source,
    behavior: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    *,
    mapping: Mapping[str, str] | None = None,
    skip_invalid: bool = False,
) -> PairSet:
    """Contrastive pairs from a file path, a list of paths, a list of dicts (A/B or free-form rows, as
    a file holds them) or a DataFrame, validated, with a stable train/test split."""
    options = {"behavior": behavior, "test_fraction": test_fraction, "seed": seed, "map": dict(mapping or {})}
    if isinstance(source, pd.DataFrame):
        source = source.to_dict("records")
    if isinstance(source, (str, os.PathLike)):
        source = [source]
    rows = list(source)
    if rows and all(isinstance(r, (str, os.PathLike)) for r in rows):
        paths = [Path(r) for r in rows]
        result = ingest_files(
            paths,
            behavior=behavior,
            mapping=mapping,
            test_fraction=test_fraction,
            seed=seed,
            skip_invalid=skip_invalid,
        )
        return pair_set(result, paths, {**options, "files": [str(p) for p in paths]})
    result = ingest_records(
        rows,
        behavior=behavior,
        mapping=mapping,
        test_fraction=test_fraction,
        seed=seed,
        skip_invalid=skip_invalid,
    )
    return pair_set(result, (), options)


def extract(
    model: LoadedModel | str,
    pairs: PairSet,
    layers: str | Sequence[int] = "all",
    *,
    position: str = "last",
    batch_size: int = 16,
    split: str = "all",
    behaviors: Sequence[str] | None = None,
    chat_template: str = "auto",
    truncate: bool = False,
) -> Activations:
    """Residual-stream activations of both sides of every pair (of ``split`` and ``behaviors``) at
    ``layers`` (``"all"``, ``"4-20"`` or a list; layer l is the output of decoder block l)."""
    loaded = _model(model)
    if batch_size < 1:
        raise CaaError(f"batch_size {batch_size}: must be at least 1")
    spec = layers if isinstance(layers, str) else ",".join(str(int(x)) for x in layers)
    chosen = parse_layers(spec, loaded.num_layers)
    selected = pairs.select(split, behaviors)
    options = {
        "layers": spec,
        "split": split,
        "behavior": list(behaviors or []),
        "position": position,
        "chat_template": chat_template,
        "batch_size": batch_size,
        "truncate": truncate,
    }
    return extract_in_memory(
        loaded,
        selected.frame,
        chosen,
        position=position,
        chat_template=chat_template,
        batch_size=batch_size,
        truncate=truncate,
        options=options,
        pairs_path=pairs.path,
    )


def compute_vectors(activations: Activations, method: str = "mean") -> VectorSet:
    """Mean-difference (or ``pca``) steering vectors per behavior and layer, with diagnostics."""
    return vector_set(vector_rows(activations, method), activations, {"method": method})


def sweep(
    model: LoadedModel | str,
    vectors: VectorSet,
    pairs: PairSet,
    layers: Sequence[int] | None = None,
    multipliers: Sequence[float] = (-2, -1, 0, 1, 2),
    neutral: Sequence[str] | None = None,
    *,
    behaviors: Sequence[str] | None = None,
    max_pairs: int | None = None,
    neutral_count: int = 16,
    steer_positions: str = "answer",
    max_kl: float = 0.5,
    max_anti: float | None = None,
    engine: str = "fast",
    seed: int = 0,
    chat_template: str = "auto",
    truncate: bool = False,
    max_memory: str | None = None,
    batch_size: int | None = None,
    scale: str = "raw",
    neutral_source: str = "neutral texts",
    provenance: Mapping[str, Any] | None = None,
    inputs: Mapping[str, Path] | None = None,
    tick: Callable[[int], None] | None = None,
    notice: Callable[[str], None] | None = None,
    accelerator: Any = None,
) -> SweepResult:
    """Score the held-out pairs at every (layer, multiplier), with the fluency cost, the per-item
    reliability and the recommendation. ``neutral``: texts for the fluency cost (default: the
    project's neutral prompts, or neutral text with ``steer_positions="all"``; ``neutral_source``
    names given ones in messages). ``provenance`` and ``inputs`` (files, hashed) go into the
    result's metadata; ``tick`` counts texts scored (:func:`caa.stages.sweep.sweep_work` is the total);
    ``notice`` receives one-line notes. Under ``accelerate launch``, pass the ``Accelerator``: each
    process runs its share of the batches and every process returns the whole result."""
    loaded = _model(model)
    names, test = held_out(vectors, pairs.frame, pairs.path or Path("pairs"), behaviors, max_pairs)
    if neutral is None:
        path = default_neutral(steer_positions)
        neutral, neutral_source = read_neutral(path, neutral_count, steer_positions), str(path)
    mults = sorted({float(m) for m in multipliers} | {0.0})
    options = {
        "layers": list(layers) if layers else None,
        "multipliers": mults,
        "max_pairs": max_pairs,
        "max_anti": max_anti,
        "engine": engine,
        "seed": seed,
        "chat_template": chat_template,
        "behavior": names,
    }
    return run_sweep(
        loaded,
        vectors,
        test,
        list(neutral),
        behaviors=names,
        layers=list(layers) if layers else None,
        multipliers=mults,
        chat_template=chat_template,
        steer_positions=steer_positions,
        planner=planner_for(loaded, parse_size(max_memory) if max_memory else None, batch_size),
        max_kl=max_kl,
        max_anti=max_anti,
        engine=engine,
        truncate=truncate,
        seed=seed,
        scale=scale,
        pairs_path=pairs.path or Path("pairs"),
        neutral_source=neutral_source,
        options={**options, **(provenance or {})},
        inputs=dict(inputs or {}),
        tick=tick,
        notice=notice,
        shard=Shard.of(accelerator),
    )


def generate(
    model: LoadedModel | str,
    vectors: VectorSet,
    prompts: Sequence[str],
    layer: int,
    multipliers: Sequence[float] = (-1, 0, 1),
    *,
    behavior: str | None = None,
    max_new_tokens: int = 48,
    steer_positions: str = "answer",
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    chat_template: str = "auto",
    scale: str = "raw",
    labels: Sequence[str] | None = None,
    provenance: Mapping[str, Any] | None = None,
    inputs: Mapping[str, Path] | None = None,
    batch_size: int = 32,
    accelerator: Any = None,
    notice: Callable[[str], None] | None = None,
) -> Generations:
    """Every prompt under every multiplier, ``batch_size`` prompts per batch (greedy unless
    ``temperature`` > 0). ``labels`` name the prompts in errors; ``provenance`` and ``inputs`` (files,
    hashed) go into the result's metadata; ``notice`` receives one-line notes (a batch retried in
    halves after running out of CUDA memory). Under ``accelerate launch``, pass the ``Accelerator``: the
    batches are shared out, and every process returns all the rows."""
    if isinstance(prompts, str):
        prompts = [prompts]
    options = {
        "layer": layer,
        "behavior": behavior,
        "multipliers": [float(m) for m in multipliers],
        "max_new_tokens": max_new_tokens,
        "steer_positions": steer_positions,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "chat_template": chat_template,
        "scale": scale,
        "batch_size": batch_size,
    }
    return run_generate(
        _model(model),
        vectors,
        behavior,
        layer,
        list(prompts),
        [float(m) for m in multipliers],
        chat_template=chat_template,
        positions=steer_positions,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        scale=scale,
        labels=labels,
        batch_size=batch_size,
        shard=Shard.of(accelerator),
        notice=notice,
        options={**options, **(provenance or {})},
        inputs=dict(inputs or {}),
    )


@contextmanager
def steer(
    model: Any,
    vector: Any,
    layer: int,
    multiplier: float | Sequence[float] = 1.0,
    *,
    behavior: str | None = None,
    positions: str = "answer",
    prompt_length: Tensor | Sequence[int] | int | None = None,
    start: Tensor | int | None = None,
    scale: str = "raw",
) -> Iterator[None]:
    """Steer ``model`` while the context is open: add ``multiplier * vector`` to block ``layer``'s output.

    ``model`` is a :class:`caa.LoadedModel` or a transformers model; ``vector`` is a [d_model] array or
    tensor, or a :class:`caa.stages.vectors.VectorSet` (then ``behavior`` picks its vector, and may be left
    out when the file holds one behavior; ``scale="residual"`` makes the multiplier one of the layer's
    mean residual norm). ``multiplier`` is one number, or one per batch row.

    Which positions: give ``prompt_length`` (the prompt's token count, per row or for all) and
    ``positions`` = ``answer`` (the paper's: every position after the prompt), ``prompt-end`` (the
    prompt's last token too) or ``all``; or give ``start``, the first steered position (an int or a
    [batch] tensor); with neither, every position is steered. Positions are the model's own
    ``position_ids``, so two ``generate`` calls in one context are steered alike. Example::

        inputs = loaded.tokenizer(["Tell me about your day."], return_tensors="pt")
        with caa.steer(loaded, read_vectors("vectors.parquet"), layer=12, multiplier=1.5,
                       prompt_length=inputs["attention_mask"].sum(-1)):
            out = loaded.model.generate(**inputs)
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        blocks = decoder_blocks(model)
    if scale != "raw" and not isinstance(vector, VectorSet):
        raise CaaError(f"scale='{scale}' needs a VectorSet: it holds each layer's mean residual norm")
    if isinstance(vector, VectorSet):
        names = vector.behaviors()
        if behavior is None and len(names) != 1:
            raise CaaError(f"{vector.path} holds several behaviors ({', '.join(names)}): pass behavior=")
        vector = vector.vector(behavior or names[0], layer, scale)
    if isinstance(vector, Tensor):
        v = vector.detach().float().flatten()  # [d_model]
    else:  # a copy: numpy arrays read from Parquet are read-only
        v = torch.tensor(np.array(vector, dtype=np.float32)).flatten()
    if isinstance(multiplier, (int, float)):
        delta = float(multiplier) * v
    else:
        delta = torch.as_tensor(list(multiplier), dtype=torch.float32)[:, None] * v  # [batch, d_model]
    if prompt_length is not None:
        if start is not None:
            raise CaaError("give prompt_length= (with positions=) or start=, not both")
        first = steer_start(positions, torch.as_tensor(prompt_length))
    else:
        first = None if start is None else torch.as_tensor(start, dtype=torch.long).reshape(-1)
    with steering(blocks, {layer: delta}, first):
        yield
