"""Coefficient schedules for the sparsity loss: factories returning ``(epoch, total_epochs) -> float``.

Epochs count from 0. ``linear_warmup`` and ``cosine_anneal`` return plain floats in [0, 1] that never
decrease with the epoch; ``constant`` returns its value (1.0 unless told otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real

from codeq.errors import ConfigError

Schedule = Callable[[int, int], float]


def _non_negative(key: str, value: object) -> float:
    """``value`` as a float, or a ConfigError naming ``schedule.<key>`` when it is not a number >= 0."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"schedule.{key} must be a finite number >= 0, got {value!r}")
    return float(value)


def constant(value: float = 1.0) -> Schedule:
    """Always ``value`` (>= 0)."""
    value = _non_negative("value", value)

    def schedule(epoch: int, total_epochs: int) -> float:
        return value

    return schedule


def linear_warmup(delay: float, ramp: float) -> Schedule:
    """0 for ``delay`` epochs, then a linear ramp from 0 to 1 over ``ramp`` epochs, then 1.

    c(e) = clip((e − delay) / ramp, 0, 1); ``ramp = 0`` is a step from 0 to 1 at ``delay``.
    """
    delay = _non_negative("delay", delay)
    ramp = _non_negative("ramp", ramp)

    def schedule(epoch: int, total_epochs: int) -> float:
        if epoch < delay:
            return 0.0
        elapsed = epoch - delay
        if elapsed >= ramp:
            return 1.0
        return elapsed / ramp

    return schedule


def cosine_anneal(delay: float = 0) -> Schedule:
    """0 for ``delay`` epochs, then a cosine ramp from 0 to 1 over the remaining epochs.

    c(e) = ½·(1 − cos(π·t)), t = clip((e − delay) / (total − delay), 0, 1). When ``delay`` >= total
    epochs the ramp never starts and c stays 0.
    """
    delay = _non_negative("delay", delay)

    def schedule(epoch: int, total_epochs: int) -> float:
        remaining = total_epochs - delay
        if epoch < delay or remaining <= 0:
            return 0.0
        t = min((epoch - delay) / remaining, 1.0)
        return 0.5 * (1.0 - math.cos(math.pi * t))

    return schedule
