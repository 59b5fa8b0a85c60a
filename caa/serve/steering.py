"""Per-request steering for a serving engine, without the engine: what a request asks for, the bank of
loaded vectors, and the per-token tables that one tensor operation inside the model reads.

A request asks with flat keys (vLLM's ``vllm_xargs``): ``caa_behavior``, ``caa_layer``,
``caa_multiplier``, ``caa_positions`` (``answer`` default, ``prompt-end``, ``all``: exactly
:func:`caa.core.hooks.steer_start`) and ``caa_scale`` (``raw`` default: the multiplier times the
vector; ``residual``: times the vector's direction at the layer's mean residual norm, as
:meth:`caa.stages.vectors.VectorSet.vector`), or with the same names nested in one object
(``{"steering": {"behavior": ..., "layer": ...}}``, :func:`flat_keys`). Steering adds
``coefficient * vector`` to the residual stream after decoder block ``layer`` at the positions the
policy names; a request without the keys is unsteered. The rule depends only on a token's absolute
position and its request's prompt length, so a batch may hold any mix of requests, and chunked
prefill or recomputation after preemption steer alike.
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
from caa.stages.options import SCALES
from caa.stages.vectors import VectorSet
from caa.store.text import behavior_name, same_name, text_problem

PREFIX = "caa_"
NAMES = ("behavior", "layer", "multiplier", "positions", "scale")
KEYS = tuple(PREFIX + name for name in NAMES)
# each policy's first steered position, as an offset from the prompt length (None: every position)
_START_OFFSET = {p: None if (first := steer_start(p, 0)) is None else int(first[0]) for p in STEER_POSITIONS}


class SteeringRequestError(CaaError):
    """A request's steering is wrong; ``field`` names it as the client wrote it
    (``vllm_xargs.caa_layer``, ``steering.layer``, ``vectors[0].vector``) and ``status`` is the HTTP
    status to answer with (400, or 409 / 413): the engine never sees such a request."""

    def __init__(self, field: str, problem: str, status: int = 400):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem
        self.status = status


@dataclass(frozen=True)
class Steer:
    """What one request asks for: ``row`` is the vector's row in the :class:`VectorBank`, and
    ``coefficient`` what that row is multiplied by (the multiplier, rescaled for ``residual``)."""

    behavior: str
    layer: int
    multiplier: float
    positions: str
    scale: str
    row: int
    coefficient: float

    def salt(self) -> str:
        """A prefix-cache salt naming this steering: requests steered otherwise never share KV blocks."""
        return "caa:" + json.dumps(
            [self.behavior, self.layer, self.multiplier.hex(), self.positions, self.scale]
        )

    def start(self, prompt_length: int) -> int:
        """The first steered absolute position (0 for ``all``): :func:`steer_start`'s, without
        building a tensor (this runs for every request at every forward pass)."""
        offset = _START_OFFSET[self.positions]
        return 0 if offset is None else prompt_length + offset


def flat_keys(steering: Any, field: str = "steering") -> dict[str, Any]:
    """A nested ``{"behavior": ..., "layer": ...}`` object as the flat ``caa_*`` keys, or an error
    naming ``steering.<key>``."""
    if not isinstance(steering, Mapping):
        raise SteeringRequestError(field, f"an object with {', '.join(NAMES)} is required")
    for key in steering:
        if key not in NAMES:
            raise SteeringRequestError(f"{field}.{key}", f"unknown key; use {', '.join(NAMES)}")
    return {PREFIX + k: v for k, v in steering.items()}


@dataclass(frozen=True)
class NewVector:
    """A vector to add to a running server (checked by :meth:`VectorBank.check_new`)."""

    behavior: str
    layer: int
    values: np.ndarray  # [d_model] float32
    mean_residual_norm: float | None = None


class VectorBank:
    """Every loaded vector, one row per (behavior, layer), in float32: those of a ``vectors.parquet``
    and those added while serving (at most ``capacity`` rows in all)."""

    def __init__(self, vectors: VectorSet, capacity: int | None = None):
        frame = vectors.frame
        self.path = vectors.path
        self.model: dict[str, Any] | None = vectors.meta.get("model")  # the fingerprint they were made with
        self.keys: list[tuple[str, int]] = [
            (str(b), int(layer)) for b, layer in zip(frame.behavior, frame.layer, strict=True)
        ]
        self.values = np.ascontiguousarray(vectors.values, dtype=np.float32)  # [rows, d_model]
        norms = frame["mean_residual_norm"] if "mean_residual_norm" in frame else [None] * len(frame)
        self.residual: list[float | None] = [_positive(x) for x in norms]
        self.sources = ["file"] * len(self.keys)
        self.capacity = max(len(self.keys), capacity or 0)
        self._row = {key: i for i, key in enumerate(self.keys)}
        self._peak = np.abs(self.values).max(axis=1) if len(self.values) else np.zeros(0)

    @classmethod
    def read(cls, path: Path | str, capacity: int | None = None) -> VectorBank:
        return cls(VectorSet.read(path), capacity)

    @property
    def width(self) -> int:
        return int(self.values.shape[1])

    def layers(self) -> list[int]:
        return sorted({layer for _, layer in self.keys})

    def behaviors(self) -> list[str]:
        return sorted({b for b, _ in self.keys})

    def tensor(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The bank as a tensor of ``capacity`` rows [capacity, d_model], zeros past the loaded ones."""
        bank = torch.zeros(self.capacity, self.width, dtype=dtype)
        bank[: len(self.keys)] = torch.from_numpy(self.values.copy()).to(dtype)
        return bank

    def listing(self) -> list[dict[str, Any]]:
        """One entry per loaded vector: behavior, layer, norm, what ``scale: residual`` uses, source."""
        norms = np.linalg.norm(self.values.astype(np.float64), axis=1)
        return [
            {
                "behavior": b,
                "layer": layer,
                "norm": float(norms[i]),
                "mean_residual_norm": self.residual[i],
                "source": self.sources[i],
            }
            for i, (b, layer) in enumerate(self.keys)
        ]

    def check_new(self, body: Any, steerable: Sequence[int]) -> list[NewVector]:
        """The vectors a POST body adds: ``{"vectors": [{behavior, layer, vector, mean_residual_norm?},
        ...]}`` (rows as a vectors file has them) or one such object; errors name the field."""
        items = body.get("vectors") if isinstance(body, Mapping) and "vectors" in body else [body]
        where = "vectors" if isinstance(body, Mapping) and "vectors" in body else ""
        if not isinstance(items, list) or not items:
            raise SteeringRequestError(where or "body", "a non-empty list of vectors is required")
        new: list[NewVector] = []
        seen = set(self.keys)
        for i, item in enumerate(items):
            at = f"{where}[{i}]." if where else ""
            vector = _new_vector(item, at, self.width, steerable)
            if (vector.behavior, vector.layer) in seen:
                raise SteeringRequestError(
                    f"{at}behavior",
                    f"'{vector.behavior}' at layer {vector.layer} is loaded already",
                    status=409,
                )
            seen.add((vector.behavior, vector.layer))
            new.append(vector)
        if len(self.keys) + len(new) > self.capacity:
            raise SteeringRequestError(
                where or "body",
                f"{len(new)} more vectors would make {len(self.keys) + len(new)}; this server holds at "
                f"most {self.capacity} (caa serve --max-vectors)",
                status=413,
            )
        return new

    def add(self, new: Sequence[NewVector]) -> list[int]:
        """Append checked vectors (:meth:`check_new`); their rows."""
        rows = list(range(len(self.keys), len(self.keys) + len(new)))
        if rows and rows[-1] >= self.capacity:
            raise CaaError(f"the vector bank holds at most {self.capacity} vectors")
        for row, v in zip(rows, new, strict=True):
            self.keys.append((v.behavior, v.layer))
            self._row[(v.behavior, v.layer)] = row
            self.residual.append(v.mean_residual_norm)
            self.sources.append("posted")
        values = np.stack([v.values for v in new]).astype(np.float32) if new else self.values[:0]
        self.values = np.concatenate([self.values, values])
        self._peak = np.concatenate([self._peak, np.abs(values).max(axis=1)])
        return rows

    def parse(
        self,
        extra: Mapping[str, Any] | None,
        dtype: torch.dtype = torch.float32,
        field: str = "vllm_xargs.caa_",
    ) -> Steer | None:
        """The steering a request's ``extra_args`` ask for (None: unsteered), or a
        :class:`SteeringRequestError` naming the key as ``field`` + name (``steering.`` for a nested
        request). ``dtype`` is the model's: a multiplier whose product with the vector overflows it
        is refused."""
        mine = {k: v for k, v in (extra or {}).items() if isinstance(k, str) and k.startswith(PREFIX)}
        if not mine:
            return None

        def error(name: str, problem: str) -> SteeringRequestError:
            return SteeringRequestError(field + name, problem)

        for key in mine:
            if key not in KEYS:
                raise error(
                    key.removeprefix(PREFIX), f"unknown key; use {', '.join(field + n for n in NAMES)}"
                )
        behavior = mine.get("caa_behavior")
        if not isinstance(behavior, str) or not behavior:
            raise error("behavior", "a behavior name (text) is required")
        behavior = same_name(behavior)
        layers = sorted(layer for b, layer in self.keys if b == behavior)
        if not layers:
            raise error("behavior", f"no behavior '{behavior}'; loaded: {', '.join(self.behaviors())}")
        layer = mine.get("caa_layer")
        if layer is None:
            if len(layers) != 1:
                raise error("layer", f"'{behavior}' has layers {_ints(layers)}: pick one")
            layer = layers[0]
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise error("layer", f"{layer!r} is not an integer")
        if layer not in layers:
            raise error("layer", f"no vector for '{behavior}' at layer {layer}; it has {_ints(layers)}")
        multiplier = mine.get("caa_multiplier")
        if isinstance(multiplier, bool) or not isinstance(multiplier, int | float):
            raise error("multiplier", f"{multiplier!r} is not a number (it is required)")
        multiplier = float(multiplier)
        if not math.isfinite(multiplier):
            raise error("multiplier", f"{multiplier} is not finite")
        positions = mine.get("caa_positions", "answer")
        if positions not in STEER_POSITIONS:
            raise error("positions", f"{positions!r}: use one of {', '.join(STEER_POSITIONS)}")
        scale = mine.get("caa_scale", "raw")
        if scale not in SCALES:
            raise error("scale", f"{scale!r}: use one of {', '.join(SCALES)}")
        row = self._row[(behavior, layer)]
        coefficient = multiplier
        if scale == "residual":
            residual = self.residual[row]
            if residual is None:
                raise error(
                    "scale", f"the vector of '{behavior}' at layer {layer} has no mean residual norm: use raw"
                )
            coefficient = multiplier * residual / float(np.linalg.norm(self.values[row].astype(np.float64)))
        if abs(coefficient) * float(self._peak[row]) > float(torch.finfo(dtype).max) ** 0.5:
            raise error("multiplier", f"{multiplier:g} times this vector overflows {dtype}")
        return Steer(behavior, layer, multiplier, str(positions), str(scale), row, coefficient)


def _positive(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _new_vector(item: Any, at: str, width: int, steerable: Sequence[int]) -> NewVector:
    """One vector of a POST body, checked: a visible behavior name, a steerable layer, ``width``
    finite numbers, and an optional positive ``mean_residual_norm``."""
    if not isinstance(item, Mapping):
        raise SteeringRequestError(at.rstrip(".") or "body", "an object with behavior, layer, vector")
    for key in item:
        if key not in ("behavior", "layer", "vector", "mean_residual_norm"):
            raise SteeringRequestError(
                f"{at}{key}", "unknown key; use behavior, layer, vector, mean_residual_norm"
            )
    raw = item.get("behavior")
    name = behavior_name(raw) if isinstance(raw, str) and text_problem(raw) is None else None
    if name is None:
        raise SteeringRequestError(f"{at}behavior", "a visible behavior name (text) is required")
    layer = item.get("layer")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise SteeringRequestError(f"{at}layer", f"{layer!r} is not an integer")
    if layer not in steerable:
        raise SteeringRequestError(
            f"{at}layer",
            f"layer {layer} is not steerable on this server; it steers {_ints(sorted(steerable))} "
            "(caa serve --steerable-layers)",
        )
    vector = item.get("vector")
    if not isinstance(vector, list) or not all(
        isinstance(x, int | float) and not isinstance(x, bool) for x in vector
    ):
        raise SteeringRequestError(f"{at}vector", "a list of numbers is required")
    if len(vector) != width:
        raise SteeringRequestError(f"{at}vector", f"has {len(vector)} numbers; the model's width is {width}")
    values = np.asarray(vector, dtype=np.float64)
    if not np.isfinite(values).all() or np.abs(values).max() > np.finfo(np.float32).max:
        raise SteeringRequestError(f"{at}vector", "holds a number that is not finite in float32")
    residual = item.get("mean_residual_norm")
    if residual is not None and _positive(residual) is None:
        raise SteeringRequestError(f"{at}mean_residual_norm", f"{residual!r} is not a positive number")
    return NewVector(name, layer, values.astype(np.float32), _positive(residual))


def _ints(values: Sequence[int]) -> str:
    return ", ".join(map(str, values))


class Tables:
    """The persistent buffers the steered layers read: ``bank`` [capacity, d_model], ``rows`` [tokens]
    (the vector row of each token of the batch) and ``scale`` [steered layers, tokens] (its coefficient
    at each steered layer, 0 where unsteered). Filled in place before each forward pass, outside any
    compiled region; the compiled graph reads them as inputs, so it steers whatever they hold."""

    def __init__(
        self,
        bank: VectorBank,
        max_tokens: int,
        dtype: torch.dtype,
        device: torch.device | str,
        layers: Sequence[int] | None = None,
    ):
        self.layers = sorted(set(bank.layers()) | set(layers or ()))  # blocks that get a steered wrapper
        self.slot = {layer: i for i, layer in enumerate(self.layers)}
        self.bank = bank.tensor(dtype).to(device)
        self.rows = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.scale = torch.zeros(len(self.layers), max_tokens, dtype=dtype, device=device)
        self.max_tokens = max_tokens
        self.steered_tokens = 0  # how many tokens the last fill steered (for tests and logs)
        self._filled = 0  # the tokens the last fill wrote into scale: beyond them it is all zero

    def put(self, rows: Sequence[int], values: np.ndarray) -> None:
        """Write vectors added while serving into their rows of the bank."""
        self.bank[list(rows)] = torch.from_numpy(values).to(self.bank.device, self.bank.dtype)

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
        live = [r for r, s in enumerate(steers) if s is not None and s.coefficient != 0.0]
        if not live:
            return
        total = int(query_start[len(steers)])
        if total > min(self.max_tokens, positions.shape[0]):
            raise CaaError(f"steering tables hold {self.max_tokens} tokens; the batch has {total}")
        picked = [s for s in steers if s is not None and s.coefficient != 0.0]
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
        scale[slot[which], tokens] = np.array([s.coefficient for s in picked])[which]
        self.rows[:span].copy_(torch.from_numpy(rows))
        self.scale[:, :span].copy_(torch.from_numpy(scale))  # float64 to the model's dtype: one rounding
        self._filled = span
