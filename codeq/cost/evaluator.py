"""Evaluator: structured and unstructured compression of a model against its dense 32-bit baseline.

It counts cost only (accuracy is the trainer's); its figure methods are codeq.plots' functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from matplotlib.figure import Figure
from torch import nn

from codeq.cost.counting import QuantizationComparison
from codeq.cost.layers import UNQUANTIZED_BITS, ModelStats, collect_layer_quant_info
from codeq.plots import plot_channel_liveness, plot_layer_bitwidths, plot_layer_sparsity_bars, plot_sparsity_map
from codeq.quant import quantized_layers


@dataclass(frozen=True)
class EvalResult:
    """Both cost views of one model; ratios are baseline / model, Rel. BOPs % = 100 / ratio."""

    # Structured (channel-level null tracking)
    structured_stats: ModelStats
    structured_bops_ratio: float
    structured_mac_ratio: float
    # Unstructured (individual zero weights)
    unstructured_stats: ModelStats
    unstructured_bops_ratio: float
    unstructured_mac_ratio: float
    structured_rel_bops_pct: float
    unstructured_rel_bops_pct: float
    unstructured_sparsity: float
    mean_bits: float
    # Counting the activation-by-activation matmuls too (attention; 32 x 32 bits, never shrunk): weight layers +
    # those. The ratios above are the paper's convention (weight layers only); the two are equal without attention.
    structured_total_rel_bops_pct: float
    unstructured_total_rel_bops_pct: float

    def as_metrics(self) -> dict[str, float]:
        """Flat scalars for logging: compression/*, sparsity/unstructured, bits/mean, layers/<name>/* (bits, pruning
        ratios, dead output channels and channels)."""
        metrics = {
            "compression/structured_bops_ratio": self.structured_bops_ratio,
            "compression/structured_mac_ratio": self.structured_mac_ratio,
            "compression/unstructured_bops_ratio": self.unstructured_bops_ratio,
            "compression/unstructured_mac_ratio": self.unstructured_mac_ratio,
            "compression/structured_rel_bops_pct": self.structured_rel_bops_pct,
            "compression/unstructured_rel_bops_pct": self.unstructured_rel_bops_pct,
            "compression/structured_macs": float(self.structured_stats.total_macs),
            "sparsity/unstructured": self.unstructured_sparsity,
            "bits/mean": self.mean_bits,
            "compression/structured_total_rel_bops_pct": self.structured_total_rel_bops_pct,
            "compression/unstructured_total_rel_bops_pct": self.unstructured_total_rel_bops_pct,
        }
        unstructured = self.unstructured_stats.by_name()
        for layer in self.structured_stats.layers:
            metrics[f"layers/{layer.name}/bitwidth"] = layer.bitwidth
            metrics[f"layers/{layer.name}/structured_pruning"] = layer.pruning_ratio
            metrics[f"layers/{layer.name}/structured_macs"] = float(layer.macs)
            metrics[f"layers/{layer.name}/unstructured_pruning"] = unstructured[layer.name].pruning_ratio
            metrics[f"layers/{layer.name}/dead_channels"] = float(layer.null_out.count)
            metrics[f"layers/{layer.name}/channels"] = float(layer.null_out.total)
        return metrics


def _rel_bops_pct(ratio: float) -> float:
    """100 / ratio: the paper's Rel. BOPs (%); 0 for a fully dead model (ratio = inf)."""
    return 0.0 if math.isinf(ratio) else 100.0 / ratio


def _rel_bops_pct(ratio: float) -> float:
    """100 / ratio: the paper's Rel. BOPs (%); 0 for a fully dead model (ratio = inf)."""
    return 0.0 if math.isinf(ratio) else 100.0 / ratio


class Evaluator:
    """Evaluates a model for both structured and unstructured compression.

    Usage:
        evaluator = Evaluator(baseline_model, input_size=(3, 32, 32))
        result = evaluator.evaluate(compressed_model)
    The baseline is counted dense and 32-bit when the Evaluator is built (before quantizers are attached).
    """

    def __init__(self, baseline_model: nn.Module, input_size: tuple[int, ...] = (3, 32, 32)):
        self.qc = QuantizationComparison(input_size=input_size)
        self.baseline_stats = self.qc.set_baseline(baseline_model)

    def evaluate(self, model: nn.Module) -> EvalResult:
        """Compute structured and unstructured ratios; every quantized weight is computed once."""
        infos = collect_layer_quant_info(model)
        structured = self.qc.calculate_stats(model, infos)
        unstructured = self.qc.calculate_unstructured_stats(model, infos)
        structured_bops_ratio = self.qc.compression_ratio(structured)
        unstructured_bops_ratio = self.qc.unstructured_compression_ratio(unstructured)

        counted = [infos[layer.name].weight for layer in unstructured.layers]
        with torch.no_grad():
            zeros = int(torch.stack([w.eq(0).sum() for w in counted]).sum())
        total = sum(w.numel() for w in counted)

        enabled = {name for name, _, fq in quantized_layers(model) if fq.enabled}
        bits = [layer.bitwidth for layer in structured.layers if layer.name in enabled]
        return EvalResult(
            structured_stats=structured,
            structured_bops_ratio=structured_bops_ratio,
            structured_mac_ratio=self.qc.mac_compression_ratio(structured),
            unstructured_stats=unstructured,
            unstructured_bops_ratio=unstructured_bops_ratio,
            unstructured_mac_ratio=self.qc.unstructured_mac_compression_ratio(unstructured),
            structured_rel_bops_pct=_rel_bops_pct(structured_bops_ratio),
            unstructured_rel_bops_pct=_rel_bops_pct(unstructured_bops_ratio),
            unstructured_sparsity=zeros / total if total else 0.0,
            mean_bits=sum(bits) / len(bits) if bits else UNQUANTIZED_BITS,
            structured_total_rel_bops_pct=_rel_bops_pct(self.qc.total_compression_ratio(structured)),
            unstructured_total_rel_bops_pct=_rel_bops_pct(self.qc.total_compression_ratio(unstructured)),
        )

    def plot_channel_liveness(self, model: nn.Module) -> Figure:
        """Channel liveness of ``model`` from its structured analysis (see ``plot_channel_liveness``)."""
        return plot_channel_liveness(self.qc.calculate_stats(model))

    plot_sparsity_map = staticmethod(plot_sparsity_map)
    plot_layer_sparsity_bars = staticmethod(plot_layer_sparsity_bars)
    plot_layer_bitwidths = staticmethod(plot_layer_bitwidths)
