"""Batch sizes from a memory budget: how many rows of a given length fit in ``--max-memory``.

The estimate per row covers what a forward pass keeps alive at its peak: the KV cache of every
layer, one block's activations (residual, attention, MLP), the attention scores, and the kept
logits with the float32 log-probabilities and temporaries computed from them. It is an upper bound
within a factor of about two, which is what a batch planner needs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from caa.core.options import parse_size as parse_size  # caa.api imports it here
from caa.errors import CaaError
from caa.models.loading import LoadedModel

T = TypeVar("T")

CPU_DEFAULT = 4 * 2**30
MAX_ROWS_DEFAULT = 256  # beyond this a CPU or GPU batch is no faster per row, and progress is coarse


def default_budget(device: torch.device) -> int:
    """Half the free memory of a CUDA device; on CPU a quarter of the RAM, at most 4 GiB."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return CPU_DEFAULT
    return min(CPU_DEFAULT, ram // 4)


@dataclass(frozen=True)
class Planner:
    """Groups texts (sorted by length) into batches whose estimated peak memory fits ``budget`` bytes."""

    budget: int
    row_bytes: Callable[[int, int], int]  # (sequence length, kept logit positions) -> bytes
    max_rows: int = MAX_ROWS_DEFAULT

    def batches(
        self, lengths: Sequence[int], reps: int, keep_all: bool, order: Sequence[int] | None = None
    ) -> list[list[int]]:
        """Indices of ``lengths`` in batches, each text taking ``reps`` rows (one per multiplier).

        ``keep_all``: logits are kept at every position (else at one). A text too long for the
        budget on its own still gets a batch of one.
        """
        order = sorted(range(len(lengths)), key=lambda i: lengths[i]) if order is None else order
        batches: list[list[int]] = []
        current: list[int] = []
        longest = 0
        for i in order:
            n = max(longest, lengths[i])
            rows = (len(current) + 1) * reps
            cost = rows * self.row_bytes(n, n if keep_all else 1)
            if current and (cost > self.budget or rows > self.max_rows):
                batches.append(current)
                current, n = [], lengths[i]
            current.append(i)
            longest = n
        if current:
            batches.append(current)
        return batches


def planner_for(loaded: LoadedModel, budget: int | None = None, max_rows: int | None = None) -> Planner:
    """A planner with this model's per-row cost; ``budget`` None: :func:`default_budget`."""
    config = loaded.model.config.get_text_config()
    d = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d
    layers = loaded.num_layers
    vocab = config.vocab_size
    elem = loaded.model.dtype.itemsize

    def row_bytes(seq: int, keep: int) -> int:
        kv = 2 * layers * kv_heads * head_dim * seq * elem
        block = seq * (6 * d + 3 * inter) * elem
        scores = heads * seq * seq * 4
        logits = keep * vocab * (elem + 4 * 4)  # logits, float log-probs, and KL temporaries
        return kv + block + scores + logits

    return Planner(
        budget if budget is not None else default_budget(loaded.device),
        row_bytes,
        max_rows or MAX_ROWS_DEFAULT,
    )


def run_halving(
    plan: Sequence[list[int]],
    run: Callable[[list[int]], T],
    notice: Callable[[str], None] | None = None,
    unit: str = "texts",
) -> list[T]:
    """``run`` on each batch of ``plan`` (lists of item indices), its results in the order run.

    On a CUDA out-of-memory error the batch is retried in halves, and every later batch is cut to
    that size (the estimate that sized them was too low); with a batch of one it is an error. A
    batch's results must not depend on which other items share it beyond float rounding.
    """
    queue = [list(batch) for batch in plan]
    cap: int | None = None
    done: list[T] = []
    while queue:
        batch = queue.pop(0)
        if cap is not None and len(batch) > cap:
            queue[:0] = [batch[at : at + cap] for at in range(0, len(batch), cap)]
            continue
        failed = False
        try:
            done.append(run(batch))
        except torch.cuda.OutOfMemoryError:
            if len(batch) == 1:
                raise CaaError(
                    f"out of GPU memory with a batch of one of the {unit}; lower --max-memory, or try a "
                    "smaller --dtype"
                ) from None
            failed = True
        if failed:
            # out of the except block: its traceback held the failed pass's tensors until now
            torch.cuda.empty_cache()
            cap = len(batch) // 2
            if notice:
                notice(f"CUDA out of memory at {len(batch)} {unit} a batch; retrying at {cap}")
            queue.insert(0, batch)
    return done
