"""Per-request steering for a serving engine, without the engine: what a request asks for, the bank of
loaded vectors, and the per-token tables that one tensor operation inside the model reads.

A request asks with flat keys (vLLM's ``vllm_xargs``): ``caa_behavior``, ``caa_layer``,
``caa_multiplier`` and ``caa_positions`` (``answer`` default, ``prompt-end``, ``all``: exactly
:func:`caa.core.hooks.steer_start`). Steering adds ``multiplier * vector`` to the residual stream
after decoder block ``layer`` at the positions the policy names; a request without the keys is
unsteered. The rule depends only on a token's absolute position and its request's prompt length, so a
batch may hold any mix of requests, and chunked prefill or recomputation after preemption steer alike.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from caa.core.hooks import STEER_POSITIONS, steer_start
from caa.errors import CaaError
from caa.stages.vectors import VectorSet
from caa.store.text import same_name

PREFIX = "caa_"
KEYS = ("caa_behavior", "caa_layer", "caa_multiplier", "caa_positions")
# each policy's first steered position, as an offset from the prompt length (None: every position)
_START_OFFSET = {p: None if (first := steer_start(p, 0)) is None else int(first[0]) for p in STEER_POSITIONS}


class SteeringRequestError(CaaError):
    """A request's steering keys are wrong; ``field`` names the key (an HTTP 400, not an engine crash)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"vllm_xargs.{field}: {problem}")
        self.field = field


@dataclass(frozen=True)
class Steer:
    """What one request asks for: ``row`` is the vector's row in the :class:`VectorBank`."""

    behavior: str
    layer: int
    multiplier: float
    positions: str
    row: int

    def salt(self) -> str:
        """A prefix-cache salt naming this steering: requests steered otherwise never share KV blocks."""
        return "caa:" + json.dumps([self.behavior, self.layer, self.multiplier.hex(), self.positions])

    def start(self, prompt_length: int) -> int:
        """The first steered absolute position (0 for ``all``): :func:`steer_start`'s, without
        building a tensor (this runs for every request at every forward pass)."""
        offset = _START_OFFSET[self.positions]
        return 0 if offset is None else prompt_length + offset


class VectorBank:
    """Every vector of a ``vectors.parquet``, one row per (behavior, layer), in float32."""

    def __init__(self, vectors: VectorSet):
        self.path = vectors.path
        self.model: dict[str, Any] | None = vectors.meta.get("model")  # the fingerprint they were made with
        self.keys: list[tuple[str, int]] = [
            (str(b), int(layer)) for b, layer in zip(vectors.frame.behavior, vectors.frame.layer, strict=True)
        ]
        self.values = np.ascontiguousarray(vectors.values, dtype=np.float32)  # [rows, d_model]
        self._row = {key: i for i, key in enumerate(self.keys)}
        self._peak = np.abs(self.values).max(axis=1)  # the largest entry of each vector

    @classmethod
    def read(cls, path: Path | str) -> VectorBank:
        return cls(VectorSet.read(path))

    @property
    def width(self) -> int:
        return int(self.values.shape[1])

    def layers(self) -> list[int]:
        return sorted({layer for _, layer in self.keys})

    def behaviors(self) -> list[str]:
        return sorted({b for b, _ in self.keys})

    def tensor(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.from_numpy(self.values.copy()).to(dtype)

    def parse(self, extra: Mapping[str, Any] | None, dtype: torch.dtype = torch.float32) -> Steer | None:
        """The steering a request's ``extra_args`` ask for (None: unsteered), or a
        :class:`SteeringRequestError` naming the key. ``dtype`` is the model's: a multiplier whose
        product with the vector overflows it is refused."""
        mine = {k: v for k, v in (extra or {}).items() if isinstance(k, str) and k.startswith(PREFIX)}
        if not mine:
            return None
        for key in mine:
            if key not in KEYS:
                raise SteeringRequestError(key, f"unknown key; use {', '.join(KEYS)}")
        behavior = mine.get("caa_behavior")
        if not isinstance(behavior, str) or not behavior:
            raise SteeringRequestError("caa_behavior", "a behavior name (text) is required")
        behavior = same_name(behavior)
        layers = sorted(layer for b, layer in self.keys if b == behavior)
        if not layers:
            raise SteeringRequestError(
                "caa_behavior", f"no behavior '{behavior}'; loaded: {', '.join(self.behaviors())}"
            )
        layer = mine.get("caa_layer")
        if layer is None:
            if len(layers) != 1:
                raise SteeringRequestError("caa_layer", f"'{behavior}' has layers {_ints(layers)}: pick one")
            layer = layers[0]
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise SteeringRequestError("caa_layer", f"{layer!r} is not an integer")
        if layer not in layers:
            raise SteeringRequestError(
                "caa_layer", f"no vector for '{behavior}' at layer {layer}; it has {_ints(layers)}"
            )
        multiplier = mine.get("caa_multiplier")
        if isinstance(multiplier, bool) or not isinstance(multiplier, int | float):
            raise SteeringRequestError("caa_multiplier", f"{multiplier!r} is not a number (it is required)")
        multiplier = float(multiplier)
        if not math.isfinite(multiplier):
            raise SteeringRequestError("caa_multiplier", f"{multiplier} is not finite")
        row = self._row[(behavior, layer)]
        if abs(multiplier) * float(self._peak[row]) > float(torch.finfo(dtype).max) ** 0.5:
            raise SteeringRequestError(
                "caa_multiplier", f"{multiplier:g} times this vector overflows {dtype}"
            )
        positions = mine.get("caa_positions", "answer")
        if positions not in STEER_POSITIONS:
            raise SteeringRequestError(
                "caa_positions", f"{positions!r}: use one of {', '.join(STEER_POSITIONS)}"
            )
        return Steer(behavior, layer, multiplier, str(positions), row)


def _ints(values: Sequence[int]) -> str:
    return ", ".join(map(str, values))


class Tables:
    """The persistent buffers the steered layers read: ``bank`` [vectors, d_model], ``rows`` [tokens]
    (the vector row of each token of the batch) and ``scale`` [steered layers, tokens] (its coefficient
    at each steered layer, 0 where unsteered). Filled in place before each forward pass, outside any
    compiled region; the compiled graph reads them as inputs, so it steers whatever they hold."""

    def __init__(self, bank: VectorBank, max_tokens: int, dtype: torch.dtype, device: torch.device | str):
        self.layers = bank.layers()  # the decoder blocks that get a steered wrapper
        self.slot = {layer: i for i, layer in enumerate(self.layers)}
        self.bank = bank.tensor(dtype).to(device)
        self.rows = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.scale = torch.zeros(len(self.layers), max_tokens, dtype=dtype, device=device)
        self.max_tokens = max_tokens
        self.steered_tokens = 0  # how many tokens the last fill steered (for tests and logs)
        self._filled = 0  # the tokens the last fill wrote into scale: beyond them it is all zero

    def fill(
        self,
        steers: Sequence[Steer | None],
        prompt_lengths: Sequence[int],
        query_start: Sequence[int],
        positions: Tensor,
    ) -> None:
        """Fill the tables for one batch: request ``r`` owns tokens ``query_start[r]`` to
        ``query_start[r + 1]`` (the engine's order), at absolute ``positions`` [tokens] (the rest,
        padding, is unsteered).

        This runs before every forward pass, so it works in numpy on a few small arrays and writes
        the buffers once each: a handful of tiny torch operations per pass (each one dispatched, and
        parallelised by the engine's OpenMP threads) cost more than a decode step's steering itself.
        Only the tokens the previous batch steered are cleared: past them the tables stay zero."""
        if self._filled:
            self.scale[:, : self._filled].zero_()
            self._filled = 0
        self.steered_tokens = 0
        live = [r for r, s in enumerate(steers) if s is not None and s.multiplier != 0.0]
        if not live:
            return
        total = int(query_start[len(steers)])
        if total > min(self.max_tokens, positions.shape[0]):
            raise CaaError(f"steering tables hold {self.max_tokens} tokens; the batch has {total}")
        picked = [s for s in steers if s is not None and s.multiplier != 0.0]
        bounds = np.asarray(query_start, dtype=np.int64)
        begin, counts = bounds[live], bounds[[r + 1 for r in live]] - bounds[live]
        which = np.repeat(np.arange(len(live)), counts)  # each token's index into live
        tokens = np.arange(len(which)) + np.repeat(begin - (np.cumsum(counts) - counts), counts)
        start = np.array([s.start(int(prompt_lengths[r])) for r, s in zip(live, picked, strict=True)])
        at = positions[:total].cpu().numpy()
        steered = at[tokens] >= start[which]
        tokens, which = tokens[steered], which[steered]
        self.steered_tokens = int(tokens.size)
        if not tokens.size:
            return
        span = int(tokens[-1]) + 1  # tokens ascend: the live requests' ranges, in batch order
        rows = np.zeros(span, dtype=np.int64)
        rows[tokens] = np.array([s.row for s in picked])[which]
        scale = np.zeros((len(self.layers), span), dtype=np.float64)
        slot = np.array([self.slot[s.layer] for s in picked])
        scale[slot[which], tokens] = np.array([s.multiplier for s in picked])[which]
        self.rows[:span].copy_(torch.from_numpy(rows))
        self.scale[:, :span].copy_(torch.from_numpy(scale))  # float64 to the model's dtype: one rounding
        self._filled = span
