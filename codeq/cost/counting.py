"""Model-level cost: structured and unstructured MACs/BOPs against a dense 32-bit baseline, and their ratios.

A compression ratio is baseline / model (inf when nothing is left); the paper's Rel. BOPs % is 100 / ratio.
"""

from __future__ import annotations

import logging
import math
import weakref

import torch
from torch import nn

from codeq.cost import liveness
from codeq.cost.attention import activation_matmul_macs
from codeq.cost.layers import (
    UNQUANTIZED_BITS,
    LayerQuantInfo,
    LayerStats,
    ModelStats,
    NullChannels,
    _effective_macs,
    _in_channels,
    _null_output_mask,
    collect_layer_quant_info,
)

log = logging.getLogger(__name__)


class QuantizationComparison:
    """Structured and unstructured MACs/BOPs of models against a dense 32-bit baseline.

    Usage: ``qc = QuantizationComparison((3, 32, 32)); qc.set_baseline(model);
    qc.compression_ratio(qc.calculate_stats(model))``. The traced forward pass is cached per model
    object and re-done only when its module names, classes or weight shapes change.
    """

    def __init__(self, input_size: tuple[int, ...], b_a: int = 32):
        self.input_size = tuple(input_size)
        self.b_a = b_a
        self.baseline_stats: ModelStats | None = None
        self.attention_macs = 0  # activation-by-activation matmul MACs of the baseline's forward pass
        self._traces: weakref.WeakKeyDictionary[nn.Module, liveness.TracedModel] = weakref.WeakKeyDictionary()

    def _traced(self, model: nn.Module) -> liveness.TracedModel:
        traced = self._traces.get(model)
        if traced is None or traced.signature != liveness.model_signature(model):
            traced = liveness.trace_model(model, self.input_size)
            self._traces[model] = traced
        return traced

    def set_baseline(self, model: nn.Module) -> ModelStats:
        """Dense 32-bit cost of ``model``'s layers: every weight counted, b_w = 32. Returns the stats."""
        traced = self._traced(model)
        if not traced.calls:
            raise ValueError(f"{type(model).__name__} has no Conv/Linear layer reached by a forward pass")
        latent_shapes = {name: shape for name, _, shape in traced.signature if shape is not None}
        layers = []
        for name, calls in _calls_by_layer(traced.calls).items():
            shape = latent_shapes[name]
            macs = math.prod(shape) * _positions(calls)
            layers.append(
                LayerStats(
                    name=name,
                    macs=macs,
                    bops=float(macs * UNQUANTIZED_BITS * self.b_a),
                    bitwidth=UNQUANTIZED_BITS,
                    pruning_ratio=0.0,
                    null_out=NullChannels.none(shape[0]),
                    null_in=NullChannels.none(_in_channels(model.get_submodule(name))),
                    spatial=calls[0].spatial,
                    kernel_size=tuple(shape[2:]) or (1, 1),
                )
            )
        self.baseline_stats = _model_stats(layers)
        self.attention_macs = activation_matmul_macs(model, liveness._probe_input(model, self.input_size))
        return self.baseline_stats

    def calculate_stats(self, model: nn.Module, layer_info: dict[str, LayerQuantInfo] | None = None) -> ModelStats:
        """Structured cost: null channels propagated through the graph, then the structured MAC formula."""
        traced = self._traced(model)
        infos = layer_info if layer_info is not None else collect_layer_quant_info(model)
        by_layer = _calls_by_layer(traced.calls)
        with torch.no_grad():
            nulls = self._propagate(model, traced, infos)
            per_layer = {}
            for name, calls in by_layer.items():
                info, c_in = infos[name], _in_channels(model.get_submodule(name))
                call_nulls = [nulls.get(call.node) or _alone(info, c_in) for call in calls]
                macs = sum(
                    _effective_macs(info.weight, n_in, n_out, call.spatial[0] * call.spatial[1])
                    for (n_in, n_out), call in zip(call_nulls, calls)
                )
                null_in = torch.stack([n_in for n_in, _ in call_nulls]).all(0)
                null_out = torch.stack([n_out for _, n_out in call_nulls]).all(0)
                per_layer[name] = (macs, null_in, null_out)
            counts = torch.stack([macs for macs, _, _ in per_layer.values()]).tolist() if per_layer else []
        layers = []
        for (name, (_, null_in, null_out)), macs in zip(per_layer.items(), counts):
            info, calls = infos[name], by_layer[name]
            dense = info.weight.numel() * _positions(calls)
            layers.append(
                LayerStats(
                    name=name,
                    macs=macs,
                    bops=float(macs * info.bitwidth * self.b_a),
                    bitwidth=info.bitwidth,
                    pruning_ratio=1.0 - macs / dense if dense else 0.0,
                    null_out=NullChannels.from_mask(null_out),
                    null_in=NullChannels.from_mask(null_in),
                    spatial=calls[0].spatial,
                    kernel_size=_kernel_size(info.weight),
                )
            )
        return _model_stats(layers)

    def calculate_unstructured_stats(
        self, model: nn.Module, layer_info: dict[str, LayerQuantInfo] | None = None
    ) -> ModelStats:
        """Unstructured cost: nnz(W)·m_h·m_w per layer; pruning_ratio = fraction of zero weights."""
        traced = self._traced(model)
        infos = layer_info if layer_info is not None else collect_layer_quant_info(model)
        by_layer = _calls_by_layer(traced.calls)
        with torch.no_grad():
            nnz = torch.stack([infos[name].weight.ne(0).sum() for name in by_layer]).tolist() if by_layer else []
        layers = []
        for (name, calls), nonzero in zip(by_layer.items(), nnz):
            info = infos[name]
            macs = nonzero * _positions(calls)
            numel = info.weight.numel()
            layers.append(
                LayerStats(
                    name=name,
                    macs=macs,
                    bops=float(macs * info.bitwidth * self.b_a),
                    bitwidth=info.bitwidth,
                    pruning_ratio=1.0 - nonzero / numel if numel else 0.0,
                    null_out=NullChannels.none(info.weight.shape[0]),
                    null_in=NullChannels.none(_in_channels(model.get_submodule(name))),
                    spatial=calls[0].spatial,
                    kernel_size=_kernel_size(info.weight),
                )
            )
        return _model_stats(layers)

    def compression_ratio(self, stats: ModelStats) -> float:
        """BOPs compression of ``stats`` (structured or unstructured): baseline BOPs / BOPs (inf if none left)."""
        return _ratio(self._baseline(stats).total_bops, stats.total_bops)

    def mac_compression_ratio(self, stats: ModelStats) -> float:
        """MAC compression of ``stats`` (structured or unstructured): baseline MACs / MACs (inf if none left)."""
        return _ratio(self._baseline(stats).total_macs, stats.total_macs)

    # the ratio does not depend on how ``stats`` was counted: the unstructured names are the same functions
    unstructured_compression_ratio = compression_ratio
    unstructured_mac_compression_ratio = mac_compression_ratio

    @property
    def attention_bops(self) -> float:
        """BOPs of the activation-by-activation matmuls (q·kᵀ, attn·v): MACs · b_a · b_a, 32 x 32 bits. Weight
        quantization and pruning cannot shrink them, so they are the same for the baseline and every model."""
        return float(self.attention_macs * self.b_a * self.b_a)

    def total_compression_ratio(self, stats: ModelStats) -> float:
        """BOPs compression counting the activation matmuls too: (baseline + attention) / (model + attention).
        Equals ``compression_ratio`` for a model without them (CNNs, MLPs)."""
        attention = self.attention_bops
        return _ratio(self._baseline(stats).total_bops + attention, stats.total_bops + attention)

    def _baseline(self, stats: ModelStats) -> ModelStats:
        """The baseline stats, after checking that ``stats`` describes the same layers."""
        if self.baseline_stats is None:
            raise RuntimeError("QuantizationComparison: call set_baseline(model) before asking for a ratio")
        _check_same_layers(self.baseline_stats, stats)
        return self.baseline_stats

    def _propagate(
        self, model: nn.Module, traced: liveness.TracedModel, infos: dict[str, LayerQuantInfo]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if traced.graph is None or not infos:
            return {}
        propagation = liveness.NullPropagation(model, traced, infos)
        nulls = propagation.run()
        new_unknown = propagation.unknown - traced.warned_ops
        if new_unknown:
            log.warning(
                "Structured MACs: outputs of ops with no null-channel rule are treated as all-live (conservative): %s",
                ", ".join(sorted(new_unknown)),
            )
            traced.warned_ops |= new_unknown
        return nulls


def _alone(info: LayerQuantInfo, c_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Untraced layer: no input known null; outputs null only by the layer's own zero filters."""
    null_in = torch.zeros(c_in, dtype=torch.bool, device=info.weight.device)
    return null_in, _null_output_mask(info.weight, null_in, info.bias)


def _calls_by_layer(calls: list[liveness.LayerCall]) -> dict[str, list[liveness.LayerCall]]:
    grouped: dict[str, list[liveness.LayerCall]] = {}
    for call in calls:
        grouped.setdefault(call.name, []).append(call)
    return grouped


def _positions(calls: list[liveness.LayerCall]) -> int:
    """Output positions m_h·m_w summed over a layer's calls."""
    return sum(call.spatial[0] * call.spatial[1] for call in calls)


def _kernel_size(weight: torch.Tensor) -> tuple[int, ...]:
    return tuple(weight.shape[2:]) or (1, 1)


def _model_stats(layers: list[LayerStats]) -> ModelStats:
    return ModelStats(
        layers=layers, total_macs=sum(layer.macs for layer in layers), total_bops=sum(layer.bops for layer in layers)
    )


def _ratio(baseline: float, value: float) -> float:
    return baseline / value if value else math.inf


def _check_same_layers(baseline: ModelStats, stats: ModelStats) -> None:
    """One clear error when the compared model's layers are not the baseline's."""

    def shapes(s: ModelStats) -> dict[str, tuple]:
        return {x.name: (x.null_in.total, x.null_out.total, x.kernel_size, x.spatial) for x in s.layers}

    base, other = shapes(baseline), shapes(stats)
    if base == other:
        return
    missing = sorted(set(base) - set(other))
    extra = sorted(set(other) - set(base))
    changed = sorted(n for n in set(base) & set(other) if base[n] != other[n])
    raise ValueError(
        "model layers differ from the baseline's (in/out channels, kernel, output size): "
        f"missing {missing}, extra {extra}, changed {changed}"
    )
