"""`caa extract` to a file: the batches of :mod:`caa.stages.extract` streamed to Parquet, with
checkpoints (``--resume``), shared out over the processes of a launcher.

The batches are those of one process: every process encodes every pair, sorts the texts by length
and cuts them at ``batch_size`` (:func:`~caa.stages.extract.batch_ranges`); whole batches are shared
out by :meth:`caa.core.distributed.Shard.take`. Each process keeps its finished batches as pieces
named by the texts they cover, and the main process merges every process's pieces in text order:
the file of several processes is the file of one, row for row and bit for bit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from caa.core.distributed import ONE, Shard
from caa.core.options import model_layers
from caa.models.loading import LoadedModel
from caa.stages.extract import (
    activations_meta,
    batch_ranges,
    encode_texts,
    length_order,
    pair_keys,
    run_batches,
)
from caa.stages.options import ExtractOptions
from caa.store import checkpoint
from caa.store.artifacts import StreamWriter, columns_table
from caa.store.schemas import ACTIVATIONS


def text_share(n_texts: int, batch_size: int, shard: Shard = ONE) -> list[tuple[int, int]]:
    """This process's batches of a run over ``n_texts`` texts, as ranges of the length order.

    Batches are balanced by their count of texts (all but the last are ``batch_size``); they are
    never split, so each is padded as one process pads it."""
    plan = [list(range(a, b)) for a, b in batch_ranges(n_texts, batch_size)]
    return [(b[0], b[-1] + 1) for b in shard.take(plan, len, split=False)]


def run_extract(
    pairs: pd.DataFrame,
    pairs_path: Path,
    out: Path,
    loaded: LoadedModel,
    options: ExtractOptions,
    *,
    resume: bool = False,
    provenance: Mapping[str, Any] | None = None,
    on_texts: Callable[[int], None] | None = None,
    notice: Callable[[str], None] | None = None,
    shard: Shard = ONE,
) -> int:
    """Extract activations of ``pairs`` (read from ``pairs_path``, already filtered with
    :func:`~caa.stages.ingest.select_pairs`) into ``out``; returns the number of pairs.

    Finished batches are kept in ``out.partial/`` until the whole run is done, so an interrupted
    run continues with ``resume`` and gives the same file. Under ``shard`` each process runs its
    batches of the one-process plan (see :func:`text_share`); the main process merges the pieces.
    A second run on ``out`` while this one runs is refused (each process holds a lock).
    """
    out = Path(out)
    layers = model_layers(options.layers, loaded.num_layers)
    recorded = {**options.provenance(), **(provenance or {})}
    meta = activations_meta(
        loaded, layers, options.position, options.chat_template, recorded, {"pairs": Path(pairs_path)}
    )
    identity = {
        "pairs_sha256": meta["inputs"][str(pairs_path)],
        "pair_ids_sha256": hashlib.sha256("\n".join(pairs.pair_id).encode()).hexdigest(),
        "model": meta["model"],
        "prompt": meta["prompt"],
        "layers": layers,
        "batch_size": options.batch_size,
        "truncate": options.truncate,
        "processes": shard.world,
    }
    lock = checkpoint.RunLock(out, shard.rank)
    try:
        if not all(shard.merge([lock.held])):
            raise checkpoint.busy_error(out)
        checkpoint.refuse_interrupted(out, resume)
        shard.merge([])  # every rank has looked before the main one clears an empty run...
        if shard.main:
            checkpoint.clear_if_empty(out)
        shard.merge([])  # ...and before any rank creates its pieces
        _run_share(pairs, pairs_path, out, loaded, options, identity, layers, on_texts, notice, shard)
        shard.merge([])
        if shard.main:
            with StreamWriter(out, ACTIVATIONS, meta, d_model=loaded.hidden_size) as writer:
                for table in checkpoint.merged_pieces(out, shard.world, 2 * len(pairs)):
                    writer.write_table(table)
            checkpoint.remove(out)
        shard.merge([])
    except BaseException:
        if shard.world == 1 and lock.held and not checkpoint.has_pieces(out):
            checkpoint.remove(out)  # failed before any batch was done: nothing to resume
        raise
    finally:
        lock.release()
    return len(pairs)


def _run_share(
    pairs: pd.DataFrame,
    pairs_path: Path,
    out: Path,
    loaded: LoadedModel,
    options: ExtractOptions,
    identity: Mapping[str, Any],
    layers: list[int],
    on_texts: Callable[[int], None] | None,
    notice: Callable[[str], None] | None,
    shard: Shard,
) -> None:
    """This process's batches, each kept as a piece once finished; resumed from the pieces on disk."""
    items = encode_texts(
        pairs, loaded, options.position, options.chat_template, options.truncate, notice, Path(pairs_path)
    )
    work = text_share(len(items), options.batch_size, shard)
    pieces = checkpoint.Checkpoint(out, identity, shard.rank, work)
    for message in pieces.discarded:
        if notice:
            notice(message)
    total = sum(b - a for a, b in work)
    if pieces.done:
        if notice:
            notice(f"resuming: {pieces.done} of {total} texts were done before the interruption")
        if on_texts:
            on_texts(pieces.done)
    schema = ACTIVATIONS.schema(loaded.hidden_size)
    ordered = length_order(items)
    for start, stop, group in run_batches(
        loaded, ordered, pieces.todo(), layers, pair_keys(pairs), notice=notice
    ):
        pieces.add(stop - start, columns_table(group, schema))
        if on_texts:
            on_texts(stop - start)
