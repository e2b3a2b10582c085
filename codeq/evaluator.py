"""Stable import path for the evaluator and its figures: ``codeq.cost`` counts, ``codeq.plots`` draws."""

from codeq.cost.evaluator import EvalResult, Evaluator
from codeq.plots import (
    plot_channel_liveness,
    plot_layer_bitwidths,
    plot_layer_sparsity_bars,
    plot_sparsity_map,
)

__all__ = [
    "EvalResult",
    "Evaluator",
    "plot_channel_liveness",
    "plot_layer_bitwidths",
    "plot_layer_sparsity_bars",
    "plot_sparsity_map",
]
