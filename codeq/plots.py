"""The run's figures: channel liveness, kernel sparsity map, per-layer sparsity and bit-widths.

Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas: no pyplot state, nothing to
close, safe in a training loop and in worker processes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from codeq.cost.layers import UNQUANTIZED_BITS, ModelStats, _get_layer_quant_info
from codeq.errors import ConfigError
from codeq.quant.parametrize import QUANTIZABLE

if TYPE_CHECKING:
    from codeq.cost.evaluator import EvalResult

MAX_FIGURE_INCHES = 16.0


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(min(width, MAX_FIGURE_INCHES), min(height, MAX_FIGURE_INCHES)))
    FigureCanvasAgg(fig)
    return fig


def _structured(source: EvalResult | ModelStats) -> ModelStats:
    """The structured stats of an EvalResult (anything with ``structured_stats``) or the ModelStats itself."""
    if isinstance(source, ModelStats):
        return source
    stats = getattr(source, "structured_stats", None)
    if isinstance(stats, ModelStats):
        return stats
    raise TypeError(
        f"plot_channel_liveness takes an EvalResult or ModelStats, got {type(source).__name__}; "
        "for a model use Evaluator.plot_channel_liveness(model)"
    )


def plot_channel_liveness(source: EvalResult | ModelStats) -> Figure:
    """Heatmap: rows = layers, cols = output channels; white = live, black = null (from the structured
    analysis, so a channel fed only by null inputs is black too), gray = padding."""
    layers = _structured(source).layers
    width = max((layer.null_out.total for layer in layers), default=0)
    grid = np.full((len(layers), width), 0.5)
    for row, layer in enumerate(layers):
        grid[row, : layer.null_out.total] = 1.0
        grid[row, sorted(layer.null_out.indices)] = 0.0

    fig = _figure(max(8.0, width * 0.15), max(4.0, len(layers) * 0.3))
    ax = fig.subplots()
    ax.imshow(grid, cmap="gray", interpolation="nearest", vmin=0, vmax=1, aspect="auto")
    ax.set_yticks(range(len(layers)))
    labels = [f"{layer.name} ({layer.null_out.count}/{layer.null_out.total} dead)" for layer in layers]
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlabel("Output channel")
    ax.set_title("Channel liveness (white = live, black = null, gray = padding)")
    fig.tight_layout()
    return fig


def _sparsity_grid(weight: torch.Tensor) -> np.ndarray:
    """Kernels as cells of a (c_out, c_in) grid, 1 = non-zero, 0 = zero, 0.5 = one-pixel separators."""
    c_out, c_in = weight.shape[:2]
    last = weight.shape[-1] if weight.dim() > 2 else 1
    kernels = weight.reshape(c_out, c_in, -1, last)
    k_h, k_w = kernels.shape[2:]
    cells = F.pad(kernels.ne(0).float(), (1, 0, 1, 0), value=0.5)
    grid = cells.permute(0, 2, 1, 3).reshape(c_out * (k_h + 1), c_in * (k_w + 1))
    return F.pad(grid, (0, 1, 0, 1), value=0.5).cpu().numpy()


def plot_sparsity_map(model: nn.Module, layer_name: str) -> Figure:
    """Zero/non-zero map of one layer's effective (quantized) weight: rows = output channels, cols = input
    channels, each cell a k_h x k_w kernel (white = non-zero, black = zero)."""
    modules = dict(model.named_modules())
    layer = modules.get(layer_name)
    if not isinstance(layer, QUANTIZABLE):
        choices = [name for name, m in modules.items() if isinstance(m, QUANTIZABLE)]
        raise ConfigError(f"sparsity map layer_name {layer_name!r} is not a Conv/Linear layer; choose one of {choices}")
    with torch.no_grad():
        weight = _get_layer_quant_info(layer).weight
    grid = _sparsity_grid(weight)
    c_out, c_in = weight.shape[:2]

    fig = _figure(max(6.0, c_in * 0.25), max(6.0, c_out * 0.25))
    ax = fig.subplots()
    ax.imshow(grid, cmap="gray", interpolation="nearest", vmin=0, vmax=1)
    ax.set_title(f"Sparsity map: {layer_name}\n(rows = out channels, cols = in channels, black = zero)")
    ax.axis("off")
    fig.tight_layout()
    return fig


def plot_layer_sparsity_bars(result: EvalResult) -> Figure:
    """Per layer: structured pruning (1 − MACs/dense MACs) beside unstructured (fraction of zero weights)."""
    layers = result.structured_stats.layers
    unstructured = result.unstructured_stats.by_name()
    x = np.arange(len(layers))
    width = 0.35

    fig = _figure(max(8.0, len(layers) * 0.6), 5.0)
    ax = fig.subplots()
    ax.bar(
        x - width / 2, [layer.pruning_ratio for layer in layers], width, label="Structured (channel)", color="steelblue"
    )
    ax.bar(
        x + width / 2,
        [unstructured[layer.name].pruning_ratio for layer in layers],
        width,
        label="Unstructured (weight)",
        color="coral",
    )
    ax.set_ylabel("Pruning ratio")
    ax.set_title("Per-layer sparsity: structured vs unstructured")
    ax.set_xticks(x)
    ax.set_xticklabels([layer.name for layer in layers], rotation=45, ha="right", fontsize=7)
    ax.legend()
    ax.set_ylim(0, 1)
    fig.tight_layout()
    return fig


def plot_layer_bitwidths(result: EvalResult) -> Figure:
    """Per-layer weight bit-width (log2 axis); unquantized 32-bit layers in gray."""
    layers = result.structured_stats.layers
    bits = [layer.bitwidth for layer in layers]
    colors = ["lightgray" if b == UNQUANTIZED_BITS else "steelblue" for b in bits]

    fig = _figure(max(8.0, len(layers) * 0.4), 4.0)
    ax = fig.subplots()
    ax.bar(np.arange(len(layers)), bits, color=colors)
    ax.set_yscale("log", base=2)
    ax.set_ylabel("Weight bits")
    ax.set_title(f"Per-layer bit-width (mean over quantized layers: {result.mean_bits:.2f})")
    ax.set_xticks(np.arange(len(layers)))
    ax.set_xticklabels([layer.name for layer in layers], rotation=45, ha="right", fontsize=7)
    fig.tight_layout()
    return fig


def compression_figures(model: nn.Module, result: EvalResult, sparsity_layer: str) -> dict[str, Figure]:
    """The four figures of a logged epoch: channel liveness, kernel sparsity map, per-layer sparsity, bits."""
    return {
        "channel_liveness": plot_channel_liveness(result),
        "sparsity_map": plot_sparsity_map(model, sparsity_layer),
        "layer_sparsity": plot_layer_sparsity_bars(result),
        "layer_bitwidths": plot_layer_bitwidths(result),
    }
