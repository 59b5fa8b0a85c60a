"""Command-line values declared once: the parsers for layers, multipliers and sizes, shared by the
command line and the Python API (errors name the option)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from caa.errors import CaaError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


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


def parse_multipliers(spec: str, include_zero: bool = True) -> list[float]:
    """``-2,-1,0,1,2`` -> sorted floats; with ``include_zero`` 0 is added (the unsteered baseline)."""
    return sweep_multipliers(spec.split(","), f"--multipliers '{spec}'", baseline=include_zero)


def sweep_multipliers(
    values: Iterable[float | str], option: str = "multipliers", *, baseline: bool = True
) -> list[float]:
    """The multipliers of a run, checked once: numbers (or their texts), finite, sorted, each once,
    with 0 (the unsteered baseline) added unless ``baseline`` is false; errors name ``option``."""
    found = set()
    for value in values:
        shown = value.strip() if isinstance(value, str) else value
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise CaaError(f"{option}: '{shown}' is not a number") from None
        if not math.isfinite(number):
            raise CaaError(f"{option}: '{shown}' is not finite")
        found.add(number)
    if baseline:
        found.add(0.0)
    return sorted(found)


def parse_size(spec: str, option: str = "--max-memory") -> int:
    """``4GiB``, ``512MB``, ``2g`` or a byte count -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", spec)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise CaaError(f"{option} '{spec}': use a size such as 4GiB, 512MB or 2G")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise CaaError(f"{option} '{spec}': must be above zero")
    return size
