"""`caa extract`: residual-stream activations of every pair, per layer, batched, streamed to Parquet.

"Layer l" is the output of decoder block l (0-based): ``hidden_states[l + 1]`` in transformers for
every block but the last, where transformers returns the output after the final norm instead; we
always record the block's own output.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from caa import checkpoint
from caa.artifacts import ACTIVATIONS, StreamWriter, columns_table, make_meta
from caa.errors import CaaError
from caa.hooks import recording, run_until_stop
from caa.ingest import read_pairs as read_pairs  # the reader lives beside its writer
from caa.models import LoadedModel
from caa.prompts import Batch, Encoded, PromptFormat, collate, encode, fit_context, prompt_format

SIDES = ("positive", "negative")


def parse_layers(spec: str, num_layers: int | None) -> list[int]:
    """``all``, ``12``, ``8,12,16``, ``4-20`` or a mix (``4-8,12``), checked against the model.

    With ``num_layers`` None (the model is not known yet) only the syntax is checked, and the
    result is empty."""
    if spec.strip() == "all":
        return list(range(num_layers or 0))
    layers: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            first, last = (int(lo), int(hi)) if sep else (int(part), int(part))
        except ValueError:
            raise CaaError(
                f"--layers '{spec}': '{part}' is not a layer, a range like 4-20, or 'all'"
            ) from None
        if first > last:
            raise CaaError(f"--layers '{spec}': empty range {part}")
        if num_layers is None:
            continue
        if last >= num_layers:  # the first layer of the part that the model lacks
            raise CaaError(
                f"--layers '{spec}': layer {max(first, num_layers)} is out of range; valid layers are "
                f"0-{num_layers - 1} (this model has {num_layers} blocks)"
            )
        layers.update(range(first, last + 1))
    return sorted(layers)


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
    for index, row in enumerate(pairs.itertuples(index=False)):
        for side in SIDES:
            rule = "answer" if row.format == "ab" else position
            enc = encode(loaded.tokenizer, style, row.prompt, getattr(row, side), row.format, rule)
            enc, was_cut = fit_context(enc, limit, truncate, describe_pair(row, side, pairs_path))
            if was_cut:
                cut.add(index)
            items.append(TextItem(index, side, enc))
    if cut and notice:
        notice(
            f"--truncate: cut the start of {len(cut)} of {len(pairs)} pairs to the context of {limit} tokens"
        )
    return items


def describe_pair(row: Any, side: str | None = None, path: Path | None = None) -> str:
    """``pairs.parquet: pair 'id' (behavior, source.jsonl line 3), positive side``, for messages."""
    origin = f"{row.behavior}, {row.source} {row.source_row}" if hasattr(row, "source") else row.behavior
    text = f"pair '{row.pair_id}' ({origin})" + (f", {side} side" if side else "")
    return f"{path}: {text}" if path else text


def batches_by_length(items: Sequence[TextItem], batch_size: int, skip: int = 0) -> list[list[TextItem]]:
    """Sort by length (least padding; ties keep their order), leave out the first ``skip``, and cut
    into batches."""
    ordered = sorted(items, key=lambda it: len(it.encoded.input_ids))[skip:]
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


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
    skip: int = 0,
    truncate: bool = False,
    pairs_path: Path | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield row groups of the activations table (column arrays), one per batch.

    Each text is one side of one pair; its rows are one per layer. Texts run in order of length
    (ties in pair order), and each row group holds the next texts of that order; ``skip`` leaves
    out its first texts (done before an interruption). On a CUDA out-of-memory error the batch is
    retried in halves and the batch size stays halved. ``truncate``: see :func:`encode_pairs`.
    """
    if pairs.empty:
        raise CaaError("no pairs to extract")
    style = prompt_format(loaded.tokenizer, chat_template)
    items = encode_pairs(pairs, loaded, style, position, truncate, notice, pairs_path)
    pad_id = loaded.tokenizer.pad_token_id
    queue = batches_by_length(items, batch_size, skip)
    while queue:
        chunk = queue.pop(0)
        try:
            acts = forward_layers(loaded, collate([it.encoded for it in chunk], pad_id, padding_side), layers)
        except torch.cuda.OutOfMemoryError:
            if len(chunk) == 1:
                raise CaaError("out of GPU memory with a batch of one text; try a smaller --dtype") from None
            torch.cuda.empty_cache()
            half = len(chunk) // 2
            if notice:
                notice(f"CUDA out of memory at batch size {len(chunk)}; retrying at {half}")
            rest = [it for b in queue for it in b]
            queue = [chunk[:half], chunk[half:], *batches_by_length(rest, half)]
            continue
        yield _rows(pairs, chunk, layers, acts.cpu().numpy())
        if on_texts:
            on_texts(len(chunk))


def _rows(
    pairs: pd.DataFrame, chunk: Sequence[TextItem], layers: Sequence[int], acts: np.ndarray
) -> dict[str, Any]:
    n_layers = len(layers)
    index = np.repeat([it.pair_index for it in chunk], n_layers)
    return {
        "pair_id": pairs.pair_id.to_numpy()[index],
        "behavior": pairs.behavior.to_numpy()[index],
        "split": pairs.split.astype(str).to_numpy()[index],
        "side": np.repeat([it.side for it in chunk], n_layers),
        "layer": np.tile(np.asarray(layers, dtype=np.int16), len(chunk)),
        "n_tokens": np.repeat([len(it.encoded.input_ids) for it in chunk], n_layers),
        "activation": acts.reshape(len(chunk) * n_layers, -1),  # [texts * layers, d_model]
    }


def select_pairs(
    pairs: pd.DataFrame, path: Path, split: str, behaviors: Sequence[str] | None
) -> pd.DataFrame:
    """Filter pairs by split (train, test or all) and behavior names, with clear errors."""
    if behaviors:
        missing = sorted(set(behaviors) - set(pairs.behavior))
        if missing:
            raise CaaError(
                f"{path}: no behavior {', '.join(missing)}; it has {', '.join(sorted(set(pairs.behavior)))}"
            )
        pairs = pairs[pairs.behavior.isin(behaviors)]
    if split != "all":
        if split not in ("train", "test"):
            raise CaaError(f"--split '{split}': use train, test or all")
        pairs = pairs[pairs.split == split]
    if pairs.empty:
        raise CaaError(
            f"{path}: no pairs in split '{split}'" + (f" for {', '.join(behaviors)}" if behaviors else "")
        )
    return pairs.reset_index(drop=True)


def run_extract(
    pairs: pd.DataFrame,
    pairs_path: Path,
    out: Path,
    loaded: LoadedModel,
    layers_spec: str = "all",
    *,
    position: str = "last",
    chat_template: str = "auto",
    batch_size: int = 16,
    resume: bool = False,
    truncate: bool = False,
    options: dict[str, Any] | None = None,
    on_texts: Callable[[int], None] | None = None,
    notice: Callable[[str], None] | None = None,
    accelerator: Any = None,
) -> int:
    """Extract activations of ``pairs`` (read from ``pairs_path``, already filtered with
    :func:`select_pairs`) into ``out``; returns the number of pairs.

    Finished batches are kept in ``out.partial/`` until the whole run is done, so an interrupted
    run continues with ``resume`` and gives the same file. Under ``accelerate launch`` each process
    takes every n-th pair; the main process merges the pieces into ``out``.
    """
    layers = parse_layers(layers_spec, loaded.num_layers)
    style = prompt_format(loaded.tokenizer, chat_template)
    meta = make_meta(
        ACTIVATIONS,
        options or {},
        inputs={"pairs": Path(pairs_path)},
        model=loaded.fingerprint.to_dict(),
        prompt={**style.describe(), "position": position, "ab_position": "answer"},
        layers=layers,
    )
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    identity = {
        "pairs_sha256": meta["inputs"][str(pairs_path)],
        "pair_ids_sha256": hashlib.sha256("\n".join(pairs.pair_id).encode()).hexdigest(),
        "model": meta["model"],
        "prompt": meta["prompt"],
        "layers": layers,
        "batch_size": batch_size,
        "truncate": truncate,
        "processes": world,
    }
    checkpoint.check_fresh(Path(out), resume)
    if accelerator:
        accelerator.wait_for_everyone()  # every rank has looked before any rank creates its pieces
    pieces = checkpoint.Checkpoint(Path(out), identity, rank)
    shard = pairs.iloc[rank::world].reset_index(drop=True)
    schema = ACTIVATIONS.schema(loaded.hidden_size)
    for message in pieces.discarded:
        if notice:
            notice(message)
    if pieces.done:
        if notice:
            notice(f"resuming: {pieces.done} of {2 * len(shard)} texts were done before the interruption")
        if on_texts:
            on_texts(pieces.done)
    if pieces.done < 2 * len(shard):
        try:
            for group in extract_activations(
                shard,
                loaded,
                layers,
                position=position,
                chat_template=chat_template,
                batch_size=batch_size,
                on_texts=on_texts,
                notice=notice,
                skip=pieces.done,
                truncate=truncate,
                pairs_path=Path(pairs_path),
            ):
                pieces.add(len(group["pair_id"]) // len(layers), columns_table(group, schema))
        except CaaError:
            if not pieces.done:  # an error in the inputs, before any work: nothing to resume
                checkpoint.remove(Path(out))
            raise
    if accelerator:
        accelerator.wait_for_everyone()
    if rank == 0:
        with StreamWriter(Path(out), ACTIVATIONS, meta, d_model=loaded.hidden_size) as writer:
            for table in checkpoint.merged_pieces(Path(out), world):
                writer.write_table(table)
        checkpoint.remove(Path(out))
    if accelerator:
        accelerator.wait_for_everyone()
    return len(pairs)
