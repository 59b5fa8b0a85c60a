"""Context managers that record or steer the outputs of decoder blocks.

Only our own hook handles are ever removed, also when the block raises; steering hooks are
registered with ``prepend=True`` so they run before transformers' own output-capturing hooks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from typing import Any

import torch
from torch import Tensor, nn

from caa.errors import CaaError


class StopForward(Exception):
    """Raised by a recording hook after the deepest requested block: the rest of the pass is skipped."""


def untuple(output: Any) -> Tensor:
    """A block's hidden states, whether the block returns a tensor or a tuple (by version)."""
    return output[0] if isinstance(output, tuple) else output


def _retuple(output: Any, hidden: Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def _recorder(
    blocks: nn.ModuleList | Sequence[nn.Module], layers: Sequence[int], keep: Any, stop: bool
) -> Iterator[dict[int, Any]]:
    """Hooks that store ``keep(output)`` of each block in ``layers``; with ``stop``, the pass ends
    (StopForward) after the deepest of them."""
    records: dict[int, Any] = {}
    deepest = max(layers, default=-1)

    def make_hook(layer: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            records[layer] = keep(output)
            if stop and layer == deepest:
                raise StopForward

        return hook

    handles = [blocks[layer].register_forward_hook(make_hook(layer)) for layer in layers]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def recording(
    blocks: nn.ModuleList | Sequence[nn.Module], layers: Sequence[int], weights: Tensor, stop: bool = True
) -> AbstractContextManager[dict[int, Tensor]]:
    """Record, for each layer in ``layers``, the weighted sum over positions of block l's output.

    ``weights`` is [batch, seq] (one-hot for a single read token, 1/n over n tokens for a mean).
    The yielded dict fills with float32 tensors [batch, d_model]. With ``stop``, the forward pass
    raises :class:`StopForward` after the deepest layer; wrap the call in :func:`run_until_stop`.
    """

    def weighted(output: Any) -> Tensor:
        hidden = untuple(output)  # [batch, seq, d_model]
        return torch.einsum("btd,bt->bd", hidden.float(), weights.to(hidden.device))

    return _recorder(blocks, layers, weighted, stop)


def run_until_stop(fn: Any, *args: Any, **kwargs: Any) -> None:
    """Call ``fn`` and swallow the :class:`StopForward` that ends an early-stopped pass."""
    with suppress(StopForward):
        fn(*args, **kwargs)


STEER_POSITIONS = ("answer", "prompt-end", "all")


def steer_start(positions: str, prompt_length: Tensor | int) -> Tensor | None:
    """The first steered position of each row under a ``--steer-positions`` policy.

    ``prompt_length`` is the number of prompt tokens of each row (an int, or [batch]); positions
    are the model's own ``position_ids`` (real tokens only, so padding does not shift them).

    - ``answer`` (the paper's): positions after the prompt's last token, ``position > prompt_end``;
    - ``prompt-end``: the prompt's last token too, so the first generated token is steered;
    - ``all``: every position (``None``), prompt included, as llama.cpp's control vectors do.
    """
    if positions not in STEER_POSITIONS:
        raise CaaError(f"--steer-positions '{positions}': use one of {', '.join(STEER_POSITIONS)}")
    if positions == "all":
        return None
    length = torch.as_tensor(prompt_length, dtype=torch.long).reshape(-1)  # [batch] or [1]
    return length if positions == "answer" else length - 1


def _position_ids(kwargs: Mapping[str, Any], seq: int) -> Tensor:
    """The positions of this call's tokens, as the model numbers them: [batch or 1, seq]."""
    positions = kwargs.get("position_ids")
    if positions is None:
        positions = kwargs.get("cache_position")
    if positions is None:
        raise CaaError(
            "this model's decoder blocks receive no position_ids: steer every position (start=None)"
        )
    if positions.dim() == 3:  # multimodal rotary models stack [3, batch, seq]; the text axis comes first
        positions = positions[0]
    return positions.view(-1, seq) if positions.dim() == 1 else positions


class _Adder:
    """Adds ``delta`` to a block's output at the positions >= ``start`` (per row).

    Stateless: the positions are the ``position_ids`` the model hands the block in this call, so any
    number of passes (prefill, token-by-token decoding under a KV cache, another ``generate``) are
    steered alike, and left padding does not shift them (the paper's ``position_ids > end`` mask)."""

    def __init__(self, delta: Tensor, start: Tensor | None):
        self.delta = delta  # [d_model] or [batch, d_model]
        self.start = start  # [batch] or [1] first steered position, None = all
        # delta and start moved to each (device, dtype) once: a blocking host-to-device copy in
        # every call would make the host wait for the GPU's queue at every decoding step
        self._placed: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor | None]] = {}

    def _on(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        placed = self._placed.get((device, dtype))
        if placed is None:
            delta = self.delta.to(device=device, dtype=dtype)
            delta = delta.view(1, 1, -1) if delta.dim() == 1 else delta[:, None, :]
            start = None if self.start is None else self.start.to(device)[:, None]
            placed = self._placed[(device, dtype)] = (delta, start)
        return placed

    def __call__(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        hidden = untuple(output)  # [batch, seq, d_model]
        delta, start = self._on(hidden.device, hidden.dtype)
        if start is None:
            steered = hidden + delta
        else:
            positions = _position_ids(kwargs, hidden.shape[1]).to(hidden.device)  # [batch or 1, seq]
            mask = positions >= start  # [batch, seq]
            steered = hidden + mask[..., None].to(hidden.dtype) * delta
        return _retuple(output, steered)


def deltas(vector: Tensor, multipliers: Sequence[float] | Tensor) -> Tensor:
    """What steering adds to each row: ``multipliers[r] * vector``, [rows, d_model] (float32
    multipliers, on the vector's device), for :func:`steering`'s ``deltas``."""
    coef = torch.as_tensor(multipliers, dtype=torch.float32, device=vector.device)  # [rows]
    return coef[:, None] * vector  # [rows, d_model]


@contextmanager
def steering(
    blocks: nn.ModuleList | Sequence[nn.Module], deltas: Mapping[int, Tensor], start: Tensor | None = None
) -> Iterator[None]:
    """Add ``deltas[l]`` to the output of block l while the context is open.

    ``deltas[l]`` is [d_model] (the same for every row) or [batch, d_model] (e.g. a different
    multiplier per row). ``start`` is [batch] (or [1]): the first steered position of each row, in
    the model's ``position_ids`` (real tokens, from 0), compared in every call, so generation with a
    KV cache keeps steering every new token and a second pass starts over; ``None`` steers every
    position. See :func:`steer_start` for the ``--steer-positions`` policies.
    """
    handles = []
    try:
        for layer, delta in deltas.items():
            handles.append(
                blocks[layer].register_forward_hook(_Adder(delta, start), prepend=True, with_kwargs=True)
            )
        yield
    finally:
        for h in handles:
            h.remove()


class _Replay(nn.Module):
    """Stands in for a decoder block and returns a recorded output, skipping the computation."""

    def __init__(self, output: Any):
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


@contextmanager
def replaying(blocks: nn.ModuleList, upto: int, output: Any) -> Iterator[None]:
    """Skip blocks ``0..upto-1``: each returns ``output``, the recorded output of block ``upto - 1``.

    Block ``upto`` then receives exactly the input it would have computed, and nothing below it runs.
    The blocks are put back on exit, also after an error.
    """
    originals = [blocks[i] for i in range(upto)]
    try:
        for i in range(upto):
            blocks[i] = _Replay(output)
        yield
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block


def capturing(
    blocks: nn.ModuleList | Sequence[nn.Module], layers: Sequence[int], stop: bool = True
) -> AbstractContextManager[dict[int, Any]]:
    """Record the raw outputs (tensor or tuple, as the block returns them) of blocks ``layers``;
    with ``stop``, end the pass after the deepest (wrap the call in :func:`run_until_stop`)."""
    return _recorder(blocks, layers, lambda output: output, stop)


def repeat_rows(output: Any, reps: int) -> Any:
    """A block output with each batch row repeated ``reps`` times (tensor or tuple of them)."""
    hidden = untuple(output).repeat_interleave(reps, 0)
    return _retuple(output, hidden)
