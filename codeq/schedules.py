"""Coefficient schedules for the sparsity loss: factories returning ``(epoch, total_epochs) -> float``.

Epochs count from 0. ``linear_warmup`` and ``cosine_anneal`` return plain floats in [0, 1] that never
decrease with the epoch; ``constant`` returns its value (1.0 unless told otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from codeq.schema import allowed, check_values, configured_by

Schedule = Callable[[int, int], float]


@dataclass
class ConstantKeys:
    value: float = allowed(minimum=0)


@dataclass
class LinearWarmupKeys:
    delay: float = allowed(minimum=0)
    ramp: float = allowed(minimum=0)


@dataclass
class CosineAnnealKeys:
    delay: float = allowed(minimum=0)


@configured_by(ConstantKeys)
def constant(value: float = 1.0) -> Schedule:
    """Always ``value`` (>= 0)."""
    check_values(ConstantKeys, "schedule.", {"value": value})
    value = float(value)

    def schedule(epoch: int, total_epochs: int) -> float:
        return value

    return schedule


@configured_by(LinearWarmupKeys)
def linear_warmup(delay: float, ramp: float) -> Schedule:
    """0 for ``delay`` epochs, then a linear ramp from 0 to 1 over ``ramp`` epochs, then 1.

    c(e) = clip((e − delay) / ramp, 0, 1); ``ramp = 0`` is a step from 0 to 1 at ``delay``.
    """
    check_values(LinearWarmupKeys, "schedule.", {"delay": delay, "ramp": ramp})
    delay, ramp = float(delay), float(ramp)

    def schedule(epoch: int, total_epochs: int) -> float:
        if epoch < delay:
            return 0.0
        elapsed = epoch - delay
        if elapsed >= ramp:
            return 1.0
        return elapsed / ramp

    return schedule


@configured_by(CosineAnnealKeys)
def cosine_anneal(delay: float = 0) -> Schedule:
    """0 for ``delay`` epochs, then a cosine ramp from 0 to 1 over the remaining epochs.

    c(e) = ½·(1 − cos(π·t)), t = clip((e − delay) / (total − delay), 0, 1). When ``delay`` >= total
    epochs the ramp never starts and c stays 0.
    """
    check_values(CosineAnnealKeys, "schedule.", {"delay": delay})
    delay = float(delay)

    def schedule(epoch: int, total_epochs: int) -> float:
        remaining = total_epochs - delay
        if epoch < delay or remaining <= 0:
            return 0.0
        t = min((epoch - delay) / remaining, 1.0)
        return 0.5 * (1.0 - math.cos(math.pi * t))

    return schedule
