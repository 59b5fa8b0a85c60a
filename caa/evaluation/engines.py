"""The sweep's engines: next-token log-probabilities of many texts under every (layer, multiplier).

An engine runs texts with ``multiplier * vector`` added to one block's output at the positions a
``--steer-positions`` policy names, and hands the log-probabilities at each text's read positions to
a ``reduce`` function (the scores, the fluency cost), batch by batch, so the full vocabulary never
outlives its batch. Two engines give the same numbers:

- :func:`reference_grid` runs the whole text per (texts, layer), multipliers riding in the batch as
  per-row coefficients; with ``skip_layers`` the blocks below the steered layer run once per batch
  and are replayed (exact: they are unsteered).
- :func:`cached_grid` also runs each text's unsteered prefix (every position before the first steered
  or read one) once, and reuses its KV cache for every (layer, multiplier), and runs the unsteered
  tail once for the x0 cell of every layer; a :class:`SplitReduce` (the fluency cost) is handed
  the raw logits of the steered cells, the unsteered cell apart.

Under ``accelerate launch`` each process runs its share of the batches (:mod:`caa.core.distributed`).
The two engines share this module on purpose: the fast one is only trustworthy read side by side
with the reference it must equal. The KV-cache plumbing they rest on is :mod:`caa.evaluation.kvcache`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from caa.core.budget import Planner, planner_for, run_halving
from caa.core.distributed import ONE, Shard
from caa.core.hooks import (
    capturing,
    deltas,
    repeat_rows,
    replaying,
    run_until_stop,
    steer_start,
    steering,
)
from caa.core.prompts import Encoded, collate
from caa.evaluation.kvcache import (
    ReusedLogits,
    cache_argument,
    prefix_cache,
    repeated,
    repeated_in_place,
    rewinder,
    supports_prefix_cache,
)
from caa.models.loading import LoadedModel

Tick = Callable[[int], None]


@dataclass(frozen=True)
class ScoreText:
    """One text of the sweep: its ids, where its prompt ends, and which positions are read.

    Positions ``read_from .. read_from + reads - 1`` are read; each predicts the token after it, which
    is the next id of the text, or for an A/B question (the text stops before the answer letter)
    one of ``targets``, the (matching, other) letter ids.
    """

    input_ids: tuple[int, ...]
    prompt_length: int  # tokens of the prompt; position prompt_length - 1 ends the instruction
    read_from: int
    reads: int
    targets: tuple[int, ...] = ()

    def next_ids(self) -> list[int]:
        """The token each read position predicts (free-form texts)."""
        return list(self.input_ids[self.read_from + 1 : self.read_from + 1 + self.reads])


# reduce(texts, logp [texts, multipliers, width, vocab], valid [texts, width]) -> [texts, multipliers, k]
Reduce = Callable[[Sequence[ScoreText], torch.Tensor, torch.Tensor], torch.Tensor]


@runtime_checkable
class SplitReduce(Protocol):
    """A reduction the fast engine runs on raw logits with the unsteered cell apart: what every cell
    needs from the unsteered distribution is computed once per batch, not once per layer, and no
    log-softmax of a steered cell is kept. Called as a :data:`Reduce` (the reference engine's way),
    it gives the same numbers."""

    def __call__(self, texts: Sequence[ScoreText], logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The reference: log-probabilities of every cell [texts, multipliers, width, vocab]."""
        ...

    def unsteered(
        self, texts: Sequence[ScoreText], logits: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, Any]:
        """The unsteered cell's logits [texts, width, vocab] -> (its results [texts, 1, k], what
        :meth:`steered` needs from them)."""
        ...

    def steered(
        self, texts: Sequence[ScoreText], logits: torch.Tensor, valid: torch.Tensor, unsteered: Any
    ) -> torch.Tensor:
        """Steered logits [texts, multipliers, width, vocab] -> [texts, multipliers, k]."""
        ...


def _starts(texts: Sequence[ScoreText], positions: str, reps: int) -> torch.Tensor | None:
    """Each row's first steered position (rows are text-major, ``reps`` multipliers each)."""
    first = steer_start(positions, torch.tensor([t.prompt_length for t in texts]))
    return None if first is None else first.repeat_interleave(reps)


def _valid(texts: Sequence[ScoreText], width: int) -> torch.Tensor:
    return torch.arange(width)[None, :] < torch.tensor([t.reads for t in texts])[:, None]  # [texts, width]


def _gather_reads(logp: torch.Tensor, first: torch.Tensor, width: int) -> torch.Tensor:
    """Rows' logits (or log-probs) at positions ``first[r] .. first[r] + width - 1``: [rows, width, vocab]."""
    index = (first[:, None] + torch.arange(width)[None, :]).clamp(max=logp.shape[1] - 1).to(logp.device)
    return logp.gather(1, index[..., None].expand(-1, -1, logp.shape[-1]))


def _inputs_of(vectors: dict[int, torch.Tensor]) -> list[int]:
    return [layer - 1 for layer in vectors if layer > 0]


Part = tuple[list[int], dict[int, np.ndarray]]  # a batch's text indices and its results per layer


def _plan(planner: Planner, texts: Sequence[ScoreText], reps: int, shard: Shard) -> list[list[int]]:
    """This process's batches: the texts sorted by length, in batches that fit ``planner``."""
    lengths = [len(t.input_ids) for t in texts]
    batches = planner.batches(lengths, reps, keep_all=any(t.reads > 1 for t in texts))
    return shard.take(batches, lambda index: len(index) * max(lengths[i] for i in index))


def _collect(
    parts: list[Part], layers: Sequence[int], n: int, shard: Shard, tick: Tick | None
) -> dict[int, np.ndarray]:
    """Every process's batches (``shard``) put back in the texts' order: {layer: [texts, multipliers, k]}."""
    everything = shard.merge(parts)
    if tick and len(everything) > len(parts):  # the other processes' batches, done
        tick((sum(len(i) for i, _ in everything) - sum(len(i) for i, _ in parts)) * len(layers))
    return {layer: _assemble([(index, r[layer]) for index, r in everything], n) for layer in layers}


@torch.inference_mode()
def reference_grid(
    loaded: LoadedModel,
    texts: Sequence[ScoreText],
    vectors: dict[int, torch.Tensor],
    multipliers: Sequence[float],
    reduce: Reduce,
    positions: str = "answer",
    planner: Planner | None = None,
    skip_layers: bool = False,
    tick: Tick | None = None,
    shard: Shard = ONE,
    notice: Callable[[str], None] | None = None,
) -> dict[int, np.ndarray]:
    """``reduce`` of every text under every (layer, multiplier): {layer: [texts, multipliers, k]}.

    One batched forward pass per (texts, layer), left-padded, with the model's own position ids;
    ``skip_layers`` runs the blocks below each layer once per batch instead of once per layer.
    Under ``shard`` this process runs its share of the batches and returns everyone's results. A
    batch that runs out of CUDA memory is retried in halves (:func:`caa.core.budget.run_halving`, said
    in ``notice``).
    """
    m = torch.tensor(list(multipliers), dtype=torch.float32)
    reps = len(multipliers)

    def one(index: list[int]) -> Part:
        chunk = [texts[i] for i in index]
        rows = [t for t in chunk for _ in range(reps)]
        keep = max(len(t.input_ids) - t.read_from for t in chunk)
        batch = collate([Encoded(list(t.input_ids), 0, [0]) for t in rows], loaded.tokenizer.pad_token_id)
        batch = batch.to(loaded.device)
        # row r reads from kept position keep - (len - read_from): the texts end each left-padded row
        first = torch.tensor([keep - len(t.input_ids) + t.read_from for t in rows])
        start = _starts(chunk, positions, reps)
        below: dict[int, Any] = {}
        if skip_layers:
            with capturing(loaded.blocks, _inputs_of(vectors)) as below:
                run_until_stop(
                    loaded.model,
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids,
                    use_cache=False,
                )
        results = {}
        for layer, vector in vectors.items():
            added = deltas(vector, m.repeat(len(chunk)))  # [rows, d_model], text-major
            skip = (
                replaying(loaded.blocks, layer, below[layer - 1])
                if skip_layers and layer > 0
                else nullcontext()
            )
            with skip, steering(loaded.blocks, {layer: added}, start):
                logits = loaded.model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids,
                    use_cache=False,
                    logits_to_keep=keep,
                ).logits
            results[layer] = _reduced(chunk, logits, first, reps, reduce)
        if tick:
            tick(len(index) * len(vectors))
        return index, results

    parts = run_halving(_plan(planner or planner_for(loaded), texts, reps, shard), one, notice)
    return _collect(parts, list(vectors), len(texts), shard, tick)


def _reduced(
    chunk: Sequence[ScoreText], logits: torch.Tensor, first: torch.Tensor, reps: int, reduce: Reduce
) -> np.ndarray:
    """One pass's logits [rows, seq, vocab], read from each row's ``first`` position on, reduced:
    [texts, multipliers, k]. The read positions are picked before the softmax (fewer to normalise)."""
    width = max(t.reads for t in chunk)
    if not (logits.shape[1] == width and bool((first == 0).all())):
        logits = _gather_reads(logits, first, width)
    logp = torch.log_softmax(logits.float(), -1).view(len(chunk), reps, width, -1)
    return reduce(chunk, logp, _valid(chunk, width).to(logp.device)).cpu().numpy()


def _assemble(parts: list[tuple[list[int], np.ndarray]], n: int) -> np.ndarray:
    """Batches' results [batch, multipliers, k] put back in the texts' order: [texts, multipliers, k]."""
    shape = parts[0][1].shape[1:] if parts else (0, 0)
    result = np.zeros((n, *shape))
    for index, values in parts:
        result[index] = values
    return result


def prefix_lengths(texts: Sequence[ScoreText], positions: str) -> list[int]:
    """Each text's unsteered, unread prefix: what the cached engine runs once and reuses."""
    first = steer_start(positions, torch.tensor([t.prompt_length for t in texts]))
    if first is None:
        return [0] * len(texts)
    return [min(int(s), t.read_from) for s, t in zip(first.tolist(), texts, strict=True)]


@torch.inference_mode()
def cached_grid(
    loaded: LoadedModel,
    texts: Sequence[ScoreText],
    vectors: dict[int, torch.Tensor],
    multipliers: Sequence[float],
    reduce: Reduce,
    positions: str = "answer",
    planner: Planner | None = None,
    tick: Tick | None = None,
    shard: Shard = ONE,
    notice: Callable[[str], None] | None = None,
) -> dict[int, np.ndarray]:
    """Like :func:`reference_grid`, computing what steering cannot change once.

    Positions before each text's first steered (and first read) position are the same in every cell
    of the grid (causal attention): they run once per text, unsteered, and their KV cache is reused
    for every (layer, multiplier); the tokens all prefixes of a batch start with run once for all of
    them. Blocks 0..l run once on the rest (steering adds to block l's output, not its input); only
    the blocks above l run per cell, multipliers in the batch dimension, up to the last read
    position. Every prefix must be at least one token (:func:`prefix_lengths`).
    """
    m = torch.tensor(list(multipliers), dtype=torch.float32)
    reps = len(multipliers)
    zero = list(multipliers).index(0.0) if 0.0 in multipliers else None
    steered = m if zero is None else torch.cat([m[:zero], m[zero + 1 :]])  # x0 needs no steered pass
    heads_of = prefix_lengths(texts, positions)
    device = loaded.device
    pad = loaded.tokenizer.pad_token_id
    cache_kwarg = cache_argument(loaded)

    def one(index: list[int]) -> Part:
        chunk = [texts[i] for i in index]
        cut = [heads_of[i] for i in index]
        # a tail ends at its last read position: a later one cannot change a read position's logits
        tails = [t.input_ids[c : t.read_from + t.reads] for t, c in zip(chunk, cut, strict=True)]
        s_len = max(map(len, tails))
        tail_ids = torch.full((len(chunk), s_len), pad, dtype=torch.long)
        tail_mask = torch.zeros((len(chunk), s_len), dtype=torch.long)
        for r, t in enumerate(tails):
            tail_ids[r, : len(t)] = torch.tensor(t)  # padded on the right
            tail_mask[r, : len(t)] = 1
        prefix, _, head_mask = prefix_cache(
            loaded, [t.input_ids[:c] for t, c in zip(chunk, cut, strict=True)], cache_kwarg
        )
        tail_pos = head_mask.sum(-1, keepdim=True) + torch.arange(s_len)[None, :]  # real positions
        unsteered = rewinder(prefix)
        mask = torch.cat([head_mask, tail_mask], 1).to(device)
        read_at = torch.tensor([t.read_from - c for t, c in zip(chunk, cut, strict=True)])
        keep = s_len - int(read_at.min())  # logits are kept from the first read position on
        read_at -= s_len - keep  # each text's first read position, among the kept ones
        # The tail runs once unsteered: its logits are the x0 cell of every layer, and it records the
        # output of every block l of the grid, so the steered passes skip blocks 0..l (steering adds
        # to block l's output, not its input).
        with capturing(loaded.blocks, list(vectors), stop=zero is None) as below:
            base = _tail_logits(
                loaded, tail_ids, mask, tail_pos, keep, {cache_kwarg: prefix}, stop=zero is None
            )
        if not len(steered):  # the x0 cell alone: nothing is steered
            base_only = _with_base(None, base, zero, len(chunk))
            if tick:
                tick(len(index) * len(vectors))
            return index, {layer: _reduced(chunk, base_only, read_at, 1, reduce) for layer in vectors}
        rewind = repeated_in_place(unsteered(), len(steered), s_len) or repeated(unsteered(), len(steered))
        mask = mask.repeat_interleave(len(steered), 0)
        start = _starts(chunk, positions, len(steered))
        split = _split(reduce, chunk, base, read_at, zero)
        results = {}
        reused_logits = ReusedLogits(loaded)  # each pass's logits are reduced before the next one
        for layer, vector in vectors.items():
            added = deltas(vector, steered.repeat(len(chunk)))  # [rows, d_model], text-major
            skip = replaying(loaded.blocks, layer + 1, repeat_rows(below[layer], len(steered)))
            with skip, steering(loaded.blocks, {layer: added}, start), reused_logits:
                logits = _tail_logits(
                    loaded,
                    tail_ids.repeat_interleave(len(steered), 0),
                    mask,
                    tail_pos.repeat_interleave(len(steered), 0),
                    keep,
                    {cache_kwarg: rewind()},
                )
            if split is not None and logits is not None:
                results[layer] = split(logits, read_at.repeat_interleave(len(steered)))
            else:
                logits = _with_base(logits, base, zero, len(chunk))
                results[layer] = _reduced(chunk, logits, read_at.repeat_interleave(reps), reps, reduce)
        if tick:
            tick(len(index) * len(vectors))
        return index, results

    parts = run_halving(_plan(planner or planner_for(loaded), texts, reps, shard), one, notice)
    return _collect(parts, list(vectors), len(texts), shard, tick)


def _reads(logits: torch.Tensor, first: torch.Tensor, width: int) -> torch.Tensor:
    """Rows' logits at ``first[r] .. first[r] + width - 1``: [rows, width, vocab], a view (no copy)
    when every row starts at the same position."""
    at = int(first[0])
    if bool((first == at).all()) and at + width <= logits.shape[1]:
        return logits[:, at : at + width]
    return _gather_reads(logits, first, width)


def _split(
    reduce: Reduce,
    chunk: Sequence[ScoreText],
    base: torch.Tensor | None,
    read_at: torch.Tensor,
    zero: int | None,
) -> Callable[[torch.Tensor, torch.Tensor], np.ndarray] | None:
    """For a :class:`SplitReduce`, what turns a layer's steered logits [texts x steered, kept, vocab]
    (each row's first read at ``first``) into the layer's results [texts, multipliers, k], the
    unsteered cell (``base``, [texts, kept, vocab], each text's first read at ``read_at``) reduced
    once here and put in as multiplier ``zero``. None for another reduction."""
    if not isinstance(reduce, SplitReduce) or base is None or zero is None:
        return None
    width = max(t.reads for t in chunk)
    valid = _valid(chunk, width).to(base.device)
    base_row, state = reduce.unsteered(chunk, _reads(base, read_at, width), valid)

    def layer_results(logits: torch.Tensor, first: torch.Tensor) -> np.ndarray:
        reads = _reads(logits, first, width)  # [texts x steered, width, vocab]
        rows = reduce.steered(chunk, reads.view(len(chunk), -1, *reads.shape[1:]), valid, state)
        return torch.cat([rows[:, :zero], base_row, rows[:, zero:]], 1).cpu().numpy()

    return layer_results


def _tail_logits(
    loaded: LoadedModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    keep: int,
    cache: dict[str, Any],
    stop: bool = False,
) -> torch.Tensor | None:
    """The last ``keep`` positions' logits of a pass over a tail after its cached prefix (None when
    ``stop``: a recording pass that ends early)."""
    device = loaded.device
    inputs = {"input_ids": ids.to(device), "attention_mask": mask, "position_ids": positions.to(device)}
    if stop:
        run_until_stop(loaded.model, **inputs, use_cache=True, **cache)
        return None
    return loaded.model(**inputs, use_cache=True, logits_to_keep=keep, **cache).logits


def _with_base(
    steered: torch.Tensor | None, base: torch.Tensor | None, zero: int | None, texts: int
) -> torch.Tensor:
    """The steered rows' logits with the unsteered ones put in as multiplier ``zero``: [rows, keep, vocab]."""
    if zero is None or base is None:
        assert steered is not None
        return steered
    if steered is None or steered.shape[0] == 0:
        return base
    s = steered.view(texts, -1, *steered.shape[1:])
    return torch.cat([s[:, :zero], base[:, None].to(s.dtype), s[:, zero:]], 1).flatten(0, 1)


def run_grid(
    engine: str,
    loaded: LoadedModel,
    texts: Sequence[ScoreText],
    vectors: dict[int, torch.Tensor],
    multipliers: Sequence[float],
    reduce: Reduce,
    positions: str,
    planner: Planner | None = None,
    tick: Tick | None = None,
    notice: Callable[[str], None] | None = None,
    shard: Shard = ONE,
) -> dict[int, np.ndarray]:
    """``engine`` ``fast`` (prefix cache where it is exact, else the layer skip, said in ``notice``)
    or ``naive`` (the reference: every block of every row in every pass)."""
    if engine == "naive":
        return reference_grid(
            loaded, texts, vectors, multipliers, reduce, positions, planner, False, tick, shard, notice
        )
    heads = prefix_lengths(texts, positions)
    width = max(heads) + max(len(t.input_ids) - h for t, h in zip(texts, heads, strict=True))  # any batch's
    if all(h > 0 for h in heads):
        if supports_prefix_cache(loaded, width):
            return cached_grid(
                loaded, texts, vectors, multipliers, reduce, positions, planner, tick, shard, notice
            )
        if notice:
            window = loaded.model.config.get_text_config().sliding_window
            notice(
                f"{loaded.fingerprint.architecture} has sliding-window layers narrower than these texts "
                f"(window {window}): using the reference engine"
            )
    return reference_grid(
        loaded, texts, vectors, multipliers, reduce, positions, planner, True, tick, shard, notice
    )
