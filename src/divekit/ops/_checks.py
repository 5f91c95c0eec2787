"""Argument checks shared by the ops: lists of numbers with a one-line error per bad entry."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from divekit.errors import DivekitError


def number_list(values: float | Sequence[float], name: str, ok: Callable[[float], bool],
                expected: str) -> list[float]:
    """``values`` (one number or a non-empty sequence) as floats, each passing ``ok``; else a
    ``DivekitError`` naming the entry: ``sizes[1] = -2; expected a positive number``."""
    if isinstance(values, int | float):
        values = [values]
    values = list(values)
    if not values:
        raise DivekitError(f"{name} must hold at least one number")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int | float) or not ok(v):
            raise DivekitError(f"{name}[{i}] = {v!r}; expected {expected}")
    return [float(v) for v in values]
