"""`caa extract`: residual-stream activations of every pair, per layer, batched, streamed to Parquet.

"Layer l" is the output of decoder block l (0-based): ``hidden_states[l + 1]`` in transformers for
every block but the last, where transformers returns the output after the final norm instead; we
always record the block's own output.

This module holds the batched forward pass that records and the in-memory result
(:class:`Activations`); :mod:`caa.stages.extract_file` the run that streams to Parquet with
checkpoints and shares its batches over processes. They share the encoding and the batch loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from caa.core.hooks import recording, run_until_stop
from caa.core.options import model_layers
from caa.core.prompts import (
    Batch,
    Encoded,
    PromptFormat,
    collate,
    encode_many,
    fit_context,
    prompt_format,
)
from caa.errors import CaaError, InputError, MismatchError
from caa.models.loading import LoadedModel
from caa.stages.ingest import SIDES, describe_pair
from caa.stages.options import ExtractOptions
from caa.store.artifacts import Artifact, StreamWriter, columns_table, make_meta, read_artifact, vectors_of
from caa.store.schemas import ACTIVATIONS


@dataclass(frozen=True)
class TextItem:
    """One side of one pair, encoded."""

    pair_index: int
    side: str
    encoded: Encoded


def encode_pairs(
    pairs: pd.DataFrame,
    loaded: LoadedModel,
    style: PromptFormat,
    position: str,
    truncate: bool = False,
    notice: Callable[[str], None] | None = None,
    pairs_path: Path | None = None,
) -> list[TextItem]:
    """Both sides of every pair, encoded with their read positions (the answer letter for A/B).

    A text longer than the model's context is an error naming its pair, or with ``truncate`` loses
    the start of its prompt (``notice`` gets the count of pairs cut)."""
    items = []
    cut: set[int] = set()
    limit = loaded.context_length
    rows = list(pairs.itertuples(index=False))
    texts = [
        (row.prompt, getattr(row, side), row.format, "answer" if row.format == "ab" else position)
        for row in rows
        for side in SIDES
    ]
    encoded = iter(encode_many(loaded.tokenizer, style, texts))
    for index, row in enumerate(rows):
        for side in SIDES:
            enc, was_cut = fit_context(next(encoded), limit, truncate, describe_pair(row, side, pairs_path))
            if was_cut:
                cut.add(index)
            items.append(TextItem(index, side, enc))
    if cut and notice:
        notice(
            f"--truncate: cut the start of {len(cut)} of {len(pairs)} pairs to the context of {limit} tokens"
        )
    return items


def length_order(items: Sequence[TextItem]) -> list[TextItem]:
    """The texts sorted by length (least padding; ties keep their order): the order they run in."""
    return sorted(items, key=lambda it: len(it.encoded.input_ids))


def batch_ranges(n_texts: int, batch_size: int) -> list[tuple[int, int]]:
    """The batches of a run, as ranges ``[start, stop)`` of the texts in :func:`length_order`."""
    return [(at, min(at + batch_size, n_texts)) for at in range(0, n_texts, batch_size)]


def batches_by_length(items: Sequence[TextItem], batch_size: int) -> list[list[TextItem]]:
    """The texts of :func:`length_order` cut into the batches of :func:`batch_ranges`."""
    ordered = length_order(items)
    return [ordered[a:b] for a, b in batch_ranges(len(ordered), batch_size)]


@torch.inference_mode()
def forward_layers(loaded: LoadedModel, batch: Batch, layers: Sequence[int]) -> torch.Tensor:
    """Block outputs at the batch's read positions: float32 [batch, len(layers), d_model].

    Runs the model's decoder only as far as the deepest requested block.
    """
    batch = batch.to(loaded.device)
    with recording(loaded.blocks, layers, batch.read_weights) as records:
        run_until_stop(
            loaded.model.base_model,
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
    return torch.stack([records[layer] for layer in layers], dim=1)


def extract_activations(
    pairs: pd.DataFrame,
    loaded: LoadedModel,
    layers: Sequence[int],
    *,
    position: str = "last",
    chat_template: str = "auto",
    batch_size: int = 16,
    padding_side: str = "left",
    on_texts: Callable[[int], None] | None = None,
    notice: Callable[[str], None] | None = None,
    truncate: bool = False,
    pairs_path: Path | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield row groups of the activations table (column arrays), one per batch.

    Each text is one side of one pair; its rows are one per layer. Texts run in order of length
    (ties in pair order), and each row group holds the next texts of that order. ``truncate``: see
    :func:`encode_pairs`; out of memory: see :func:`run_batches`.
    """
    items = length_order(encode_texts(pairs, loaded, position, chat_template, truncate, notice, pairs_path))
    ranges = batch_ranges(len(items), batch_size)
    for start, stop, group in run_batches(
        loaded, items, ranges, layers, pair_keys(pairs), padding_side, notice
    ):
        yield group
        if on_texts:
            on_texts(stop - start)


def encode_texts(
    pairs: pd.DataFrame,
    loaded: LoadedModel,
    position: str,
    chat_template: str,
    truncate: bool,
    notice: Callable[[str], None] | None,
    pairs_path: Path | None,
) -> list[TextItem]:
    """:func:`encode_pairs` in the model's prompt format; no pairs is an error."""
    if pairs.empty:
        raise CaaError("no pairs to extract")
    style = prompt_format(loaded.tokenizer, chat_template)
    return encode_pairs(pairs, loaded, style, position, truncate, notice, pairs_path)


def run_batches(
    loaded: LoadedModel,
    ordered: Sequence[TextItem],
    ranges: Sequence[tuple[int, int]],
    layers: Sequence[int],
    keys: dict[str, np.ndarray],
    padding_side: str = "left",
    notice: Callable[[str], None] | None = None,
) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(start, stop, row group) of the texts ``ordered[start:stop]`` of each batch in ``ranges``.

    On a CUDA out-of-memory error the batch is retried in halves, and every later batch is cut to
    that size; the pieces of a batch stay in order, so the rows do."""
    pad_id = loaded.tokenizer.pad_token_id
    queue = list(ranges)
    cap: int | None = None
    while queue:
        start, stop = queue.pop(0)
        if cap is not None and stop - start > cap:
            queue[:0] = [(at, min(at + cap, stop)) for at in range(start, stop, cap)]
            continue
        chunk = ordered[start:stop]
        acts: torch.Tensor | None = None
        try:
            acts = forward_layers(loaded, collate([it.encoded for it in chunk], pad_id, padding_side), layers)
        except torch.cuda.OutOfMemoryError:
            if len(chunk) == 1:
                raise CaaError("out of GPU memory with a batch of one text; try a smaller --dtype") from None
        if acts is None:
            # out of the except block: its traceback held the failed pass's tensors until now
            torch.cuda.empty_cache()
            cap = len(chunk) // 2
            if notice:
                notice(f"CUDA out of memory at batch size {len(chunk)}; retrying at {cap}")
            queue[:0] = [(start, start + cap), (start + cap, stop)]
            continue
        yield start, stop, _rows(keys, chunk, layers, acts.cpu().numpy())


def pair_keys(pairs: pd.DataFrame) -> dict[str, np.ndarray]:
    """The pair columns every row group repeats, converted once (not once per batch)."""
    return {
        "pair_id": pairs.pair_id.to_numpy(),
        "behavior": pairs.behavior.to_numpy(),
        "split": pairs.split.astype(str).to_numpy(),
    }


def _rows(
    keys: dict[str, np.ndarray], chunk: Sequence[TextItem], layers: Sequence[int], acts: np.ndarray
) -> dict[str, Any]:
    n_layers = len(layers)
    index = np.repeat([it.pair_index for it in chunk], n_layers)
    return {
        **{name: column[index] for name, column in keys.items()},
        "side": np.repeat([it.side for it in chunk], n_layers),
        "layer": np.tile(np.asarray(layers, dtype=np.int16), len(chunk)),
        "n_tokens": np.repeat([len(it.encoded.input_ids) for it in chunk], n_layers),
        "activation": acts.reshape(len(chunk) * n_layers, -1),  # [texts * layers, d_model]
    }


@dataclass
class Activations:
    """Activation rows (keys as a DataFrame) and their vectors as one float32 array [rows, d_model],
    with the provenance of the run (model, prompt format, layers). ``caa.extract`` makes one in
    memory; :meth:`read` reads one or more ``activations.parquet`` files, :meth:`save` writes one."""

    keys: pd.DataFrame  # pair_id, behavior, split, side, layer, n_tokens
    values: np.ndarray  # [rows, d_model] float32
    meta: dict[str, Any]
    paths: list[Path] = field(default_factory=list)

    @property
    def label(self) -> Path:
        """What errors call these activations: their (first) file, or ``<activations in memory>``."""
        return self.paths[0] if self.paths else Path("<activations in memory>")

    def save(self, path: Path | str) -> Path:
        """Write ``activations.parquet`` (streamed in row groups), with its provenance."""
        schema = ACTIVATIONS.schema(self.values.shape[1])
        step = 65536
        with StreamWriter(Path(path), ACTIVATIONS, self.meta, d_model=self.values.shape[1]) as writer:
            for at in range(0, len(self.keys), step):
                part = self.keys.iloc[at : at + step]
                columns = {name: part[name].to_numpy() for name in schema.names if name != "activation"}
                writer.write_table(
                    columns_table({**columns, "activation": self.values[at : at + step]}, schema)
                )
        return Path(path)

    @classmethod
    def read(cls, *paths: Path | str) -> Activations:
        """One or more activation files of the same model and prompt format."""
        return read_activations([Path(p) for p in paths])


def read_activations(paths: Sequence[Path]) -> Activations:
    """Read one or more activation files of the same model and hidden size."""
    if not paths:
        raise CaaError("no activation files given")
    resolved = [Path(p).resolve() for p in paths]
    for i, p in enumerate(resolved):
        if p in resolved[:i]:
            raise CaaError(f"{paths[i]}: given twice; each activations file counts once")
    arts = [read_artifact(Path(p), ACTIVATIONS) for p in paths]
    first = arts[0]
    for art in arts[1:]:
        check_same_model(first, art)
    for art in arts:
        if art.table.num_rows == 0:
            raise InputError(art.path, "has no activation rows")
    keys = pd.concat(
        [a.table.drop_columns("activation").to_pandas().assign(file=i) for i, a in enumerate(arts)],
        ignore_index=True,
    )
    keys["split"] = keys["split"].astype(str)
    values = np.concatenate([vectors_of(a.table, "activation") for a in arts])
    bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if len(bad):
        r = keys.iloc[int(bad[0])]
        raise InputError(
            arts[r.file].path,
            f"the {r.side} activation of pair '{r.pair_id}' at layer {r.layer} has NaN or infinite values",
            where=f"row {int(bad[0]) - int((keys.file < r.file).sum())}",
            field="activation",
        )
    key = ["pair_id", "side", "layer"]
    repeated = keys.duplicated(key, keep=False)
    if repeated.any():
        r = keys[repeated].iloc[0]
        twins = keys[repeated & (keys[key] == r[key]).all(axis=1)]
        where = " and ".join(dict.fromkeys(str(arts[i].path) for i in twins.file))
        raise CaaError(
            f"{where}: duplicate rows: the {r.side} activation of pair '{r.pair_id}' "
            f"at layer {r.layer} appears twice"
        )
    return Activations(keys.drop(columns="file"), values, first.meta, [a.path for a in arts])


SAME_MODEL = (
    ("model", "hidden_size", "come from different models"),
    ("model", "weights_hash", "come from different models"),
    ("prompt", "chat_template", "were read differently"),
    ("prompt", "position", "were read differently"),
)


def check_same_model(a: Artifact, b: Artifact) -> None:
    """Refuse artifacts of different models or prompt formats, naming both files and the field."""
    for section, f, problem in SAME_MODEL:
        va, vb = (a.meta.get(section) or {}).get(f), (b.meta.get(section) or {}).get(f)
        if va != vb:
            raise MismatchError(
                f"{a.path} and {b.path} {problem}: field '{section}.{f}' is "
                f"{va!r} in the first and {vb!r} in the second"
            )


def activations_meta(
    loaded: LoadedModel,
    layers: Sequence[int],
    position: str,
    chat_template: str,
    options: Mapping[str, Any] | None = None,
    inputs: Mapping[str, Path] | None = None,
) -> dict[str, Any]:
    """The provenance of an activations table: options, inputs, the model, how texts were read."""
    style = prompt_format(loaded.tokenizer, chat_template)
    return make_meta(
        ACTIVATIONS,
        options or {},
        inputs=inputs,
        model=loaded.fingerprint.to_dict(),
        prompt={**style.describe(), "position": position, "ab_position": "answer"},
        layers=list(layers),
    )


def extract_in_memory(
    loaded: LoadedModel,
    pairs: pd.DataFrame,
    options: ExtractOptions,
    *,
    provenance: Mapping[str, Any] | None = None,
    pairs_path: Path | None = None,
    on_texts: Callable[[int], None] | None = None,
    notice: Callable[[str], None] | None = None,
) -> Activations:
    """The activations of ``pairs`` at ``options.layers`` (checked against the model; None: every
    block) as an :class:`Activations` (no files): the rows :func:`run_extract` writes, in the same
    order. The options and ``provenance`` (what a command was told besides) go into its metadata."""
    layers = model_layers(options.layers, loaded.num_layers)
    groups = list(
        extract_activations(
            pairs,
            loaded,
            layers,
            position=options.position,
            chat_template=options.chat_template,
            batch_size=options.batch_size,
            on_texts=on_texts,
            notice=notice,
            truncate=options.truncate,
            pairs_path=pairs_path,
        )
    )
    keys = pd.DataFrame({k: np.concatenate([g[k] for g in groups]) for k in groups[0] if k != "activation"})
    values = np.concatenate([g["activation"] for g in groups]).astype(np.float32)
    inputs = {"pairs": pairs_path} if pairs_path is not None and Path(pairs_path).is_file() else None
    recorded = {**options.provenance(), **(provenance or {})}
    meta = activations_meta(loaded, layers, options.position, options.chat_template, recorded, inputs)
    return Activations(keys, values, meta, [])
