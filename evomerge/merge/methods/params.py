"""Checks of method parameters at merge time, shared by the method modules.

The recipe validates parameters against each method's declared ranges before a merge; these
checks guard the building blocks when they are called directly (tests, other methods).
"""

from __future__ import annotations

import math
from typing import Sequence

from evomerge.errors import EvomergeError


def check_density(density: float) -> float:
    """``density`` as a float in (0, 1], else an error naming the parameter."""
    density = float(density)
    if not (0.0 < density <= 1.0) or math.isnan(density):
        raise EvomergeError(f"parameter 'density' must be in (0, 1], got {density}")
    return density


def fraction(name: str, value: float, *, lo_open: bool = False) -> float:
    """``value`` as a float in [0, 1] (or (0, 1] with ``lo_open``), else an error naming ``name``."""
    v = float(value)
    if math.isnan(v) or v < 0.0 or v > 1.0 or (lo_open and v == 0.0):
        rng = "(0, 1]" if lo_open else "[0, 1]"
        raise EvomergeError(f"parameter {name!r} must be in {rng}, got {value}")
    return v


def per_model(name: str, values: Sequence[float], n: int) -> list[float]:
    """A per-model parameter as ``n`` floats, else an error naming it."""
    if len(values) != n:
        raise EvomergeError(f"parameter {name!r}: got {len(values)} values for {n} models")
    return [float(v) for v in values]


def check_one_model(name: str, tensors: Sequence) -> None:
    """Refuse a merge of ``name`` (a one-model method) with other than one model besides the base."""
    if len(tensors) != 1:
        raise EvomergeError(f"merge_method {name!r} takes exactly one model besides the base, got {len(tensors)}")
