"""Text typed on the command line made typed values, where it is typed: layers (``4-20``),
multipliers (``-2,0,2``) and sizes (``8GiB``). Errors name the flag; the library then checks the
values themselves (against the model, for layers)."""

from __future__ import annotations

import math
import re

from caa import CaaError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_layers(spec: str, option: str = "--layers") -> list[int] | None:
    """``all`` (None: every block), ``12``, ``8,12,16``, ``4-20`` or a mix (``4-8,12``), sorted; the
    model's range is checked where the model is known."""
    if spec.strip() == "all":
        return None
    layers: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            first, last = (int(lo), int(hi)) if sep else (int(part), int(part))
        except ValueError:
            raise CaaError(
                f"{option} '{spec}': '{part}' is not a layer, a range like 4-20, or 'all'"
            ) from None
        if first > last:
            raise CaaError(f"{option} '{spec}': empty range {part}")
        layers.update(range(first, last + 1))
    return sorted(layers)


def parse_multipliers(spec: str) -> list[float]:
    """``-2,-1,0,1,2`` -> floats, in the order given (the sweep sorts them and adds 0)."""
    values = []
    for part in spec.split(","):
        try:
            value = float(part)
        except ValueError:
            raise CaaError(f"--multipliers '{spec}': '{part.strip()}' is not a number") from None
        if not math.isfinite(value):
            raise CaaError(f"--multipliers '{spec}': '{part.strip()}' is not finite")
        values.append(value)
    return values


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
