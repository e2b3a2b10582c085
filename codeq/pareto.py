"""Accuracy against compute as a two-objective problem: what a sweep job returns, and which results no other beats.

A result is a point (cost, accuracy): cost is a Rel. BOPs % to minimise, accuracy is to maximise. Point a
dominates b when cost_a <= cost_b and acc_a >= acc_b with at least one strict; the points nothing dominates
are the Pareto front. `hydra/sweeper=pareto` (Optuna's NSGA-II) searches for it; codeq.report marks it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from codeq.errors import ConfigError

COSTS = ("structured", "unstructured")
# The order a job returns its objectives in, and the sweeper's directions for them: accuracy up, Rel. BOPs % down.
DIRECTIONS = ("maximize", "minimize")


def check_cost(cost: Any) -> str:
    """`pareto.cost`, checked: which Rel. BOPs % a two-objective sweep minimises."""
    if cost not in COSTS:
        raise ConfigError(f"pareto.cost must be one of {', '.join(COSTS)}, got {cost!r}")
    return cost


def is_two_objective(directions: Any) -> bool:
    """Whether a sweeper with these directions (None, one direction or a list) wants both objectives.

    A list of two directions must be `DIRECTIONS`, the order `job_objectives` returns its values in.
    """
    if isinstance(directions, str) or not isinstance(directions, Sequence) or len(directions) != 2:
        return False
    if tuple(getattr(d, "name", str(d)) for d in directions) != DIRECTIONS:  # str or optuna sweeper's enum
        raise ConfigError(
            f"hydra.sweeper.direction must be [{', '.join(DIRECTIONS)}] (accuracy, Rel. BOPs %) for a "
            f"two-objective sweep, got {list(directions)}"
        )
    return True


def job_objectives(final: dict, cost: str) -> tuple[float, float]:
    """(accuracy, Rel. BOPs % of `cost`) of a run's final epoch: one point, both values from the same model."""
    return float(final["eval/accuracy"]), float(final[f"compression/{cost}_rel_bops_pct"])


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, accuracy) points no other point dominates, sorted by increasing cost.

    Equal points do not dominate each other, so all of them are kept; points with a non-finite coordinate
    are ignored. After sorting by (cost, -accuracy) a point is on the front exactly when its accuracy beats
    every cheaper point's, or equals the point just kept at the same cost and accuracy.
    """
    candidates = [i for i, (cost, acc) in enumerate(points) if math.isfinite(cost) and math.isfinite(acc)]
    candidates.sort(key=lambda i: (points[i][0], -points[i][1], i))
    front: list[int] = []
    for i in candidates:
        if not front or points[i][1] > points[front[-1]][1] or tuple(points[i]) == tuple(points[front[-1]]):
            front.append(i)
    return front
