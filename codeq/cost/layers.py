"""Per-layer cost: the data types of a cost count and the MAC formulas of one Conv/Linear layer.

Structured: ``MACs_l = (c_in − null_in)(c_out − null_out)·k_h·k_w·m_h·m_w`` (per group for grouped
convs); an output channel is null when all its weights to non-null inputs are zero and it has no
non-zero bias. Unstructured: ``MACs_l = nnz(W_l)·m_h·m_w`` (the CoDeQ paper's count).
Both: ``BOPs_l = MACs_l·b_w·b_a``, b_w = the layer's learned bit-width (32 when not quantized), b_a = 32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from codeq.quant.parametrize import QUANTIZABLE, StackedFakeQuant, fake_quant_of

UNQUANTIZED_BITS = 32.0


# --------------------------------------------------------------------------- public data types


@dataclass(frozen=True)
class NullChannels:
    """The set of channel indices (out of ``total``) that are always zero."""

    indices: frozenset[int]
    total: int

    def __post_init__(self) -> None:
        indices = frozenset(int(i) for i in self.indices)
        if any(not 0 <= i < self.total for i in indices):
            raise ValueError(f"null channel indices must lie in [0, {self.total}), got {sorted(indices)}")
        object.__setattr__(self, "indices", indices)

    @classmethod
    def none(cls, total: int) -> NullChannels:
        """No channel is null."""
        return cls(frozenset(), total)

    @classmethod
    def all(cls, total: int) -> NullChannels:
        """Every channel is null."""
        return cls(frozenset(range(total)), total)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> NullChannels:
        """From a boolean mask, True = null."""
        return cls(frozenset(mask.nonzero().flatten().tolist()), mask.numel())

    @property
    def count(self) -> int:
        return len(self.indices)

    @property
    def ratio(self) -> float:
        """Fraction of channels that are null (0 for an empty layer)."""
        return self.count / self.total if self.total else 0.0

    def intersect(self, other: NullChannels) -> NullChannels:
        """Channels null in both (a residual add keeps a channel null only if null on every input)."""
        if other.total != self.total:
            raise ValueError(f"cannot intersect null channels of {self.total} and {other.total} channels")
        return NullChannels(self.indices & other.indices, self.total)

    def mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Boolean mask of length ``total``, True = null."""
        mask = torch.zeros(self.total, dtype=torch.bool, device=device)
        if self.indices:
            mask[sorted(self.indices)] = True
        return mask


@dataclass(frozen=True)
class LayerQuantInfo:
    """A layer's effective (quantized when a quantizer is attached and enabled) weight and its bit-width."""

    bitwidth: float
    weight: torch.Tensor
    bias: torch.Tensor | None = None


@dataclass(frozen=True)
class LayerStats:
    """Cost of one Conv/Linear layer; ``spatial`` = (m_h, m_w), the output positions of its (first) call."""

    name: str
    macs: int
    bops: float
    bitwidth: float
    pruning_ratio: float
    null_out: NullChannels
    null_in: NullChannels
    spatial: tuple[int, int]
    kernel_size: tuple[int, ...]


@dataclass(frozen=True)
class ModelStats:
    """Per-layer costs (in execution order) and their totals."""

    layers: list[LayerStats]
    total_macs: int
    total_bops: float

    def by_name(self) -> dict[str, LayerStats]:
        return {layer.name: layer for layer in self.layers}


# --------------------------------------------------------------------------- per-layer helpers


def _get_layer_quant_info(module: nn.Module) -> LayerQuantInfo:
    """Effective weight (``module.weight``: quantized when a FakeQuantParametrization is attached and
    enabled) and bit-width (the quantizer's ``get_bitwidth()`` then, else 32)."""
    fq = fake_quant_of(module)
    bitwidth = UNQUANTIZED_BITS
    if fq is not None and fq.enabled:
        get_bitwidth = getattr(fq.quantizer, "get_bitwidth", None)
        if get_bitwidth is None:
            raise TypeError(f"quantizer {type(fq.quantizer).__name__} has no get_bitwidth(); BOPs need it")
        bitwidth = float(get_bitwidth())
    bias = getattr(module, "bias", None)
    return LayerQuantInfo(
        bitwidth=bitwidth,
        weight=module.weight.detach(),
        bias=bias.detach() if isinstance(bias, torch.Tensor) else None,
    )


def collect_layer_quant_info(model: nn.Module) -> dict[str, LayerQuantInfo]:
    """``_get_layer_quant_info`` of every Conv/Linear layer, the quantized weights computed once, stacked."""
    with torch.no_grad(), StackedFakeQuant(model).cached():
        return {name: _get_layer_quant_info(m) for name, m in model.named_modules() if isinstance(m, QUANTIZABLE)}


def _groups(weight: torch.Tensor, c_in: int) -> int:
    """Number of conv groups: the weight holds ``c_in / groups`` input channels per filter."""
    return c_in // weight.shape[1]


def _null_output_mask(weight: torch.Tensor, null_in: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """True for output channels whose weights to every non-null input are zero (and whose bias is zero)."""
    c_out, c_in_per_group = weight.shape[0], weight.shape[1]
    groups = _groups(weight, null_in.numel())
    connected = weight.reshape(c_out, c_in_per_group, -1).ne(0).any(-1)
    live_in = (~null_in).view(groups, c_in_per_group).repeat_interleave(c_out // groups, dim=0)
    live_out = (connected & live_in).any(1)
    if bias is not None:
        live_out = live_out | bias.ne(0)
    return ~live_out


def _effective_macs(
    weight: torch.Tensor, null_in: torch.Tensor, null_out: torch.Tensor, positions: int
) -> torch.Tensor:
    """Σ_groups (c_in − null_in)(c_out − null_out) · k · positions, as a 0-d tensor."""
    groups = _groups(weight, null_in.numel())
    live_in = (~null_in).view(groups, -1).sum(1)
    live_out = (~null_out).view(groups, -1).sum(1)
    return (live_in * live_out).sum() * weight[0, 0].numel() * positions


def _compute_null_output_channels(
    weight: torch.Tensor, null_in: NullChannels, bias: torch.Tensor | None = None
) -> NullChannels:
    """Output channels that are always zero given the null input channels (see ``_null_output_mask``)."""
    return NullChannels.from_mask(_null_output_mask(weight, null_in.mask(weight.device), bias))


def _compute_effective_macs(
    weight: torch.Tensor, null_in: NullChannels, null_out: NullChannels, m_h: int, m_w: int
) -> int:
    """Structured MACs: (c_in − null_in)(c_out − null_out)·k_h·k_w·m_h·m_w (summed per group)."""
    device = weight.device
    return int(_effective_macs(weight, null_in.mask(device), null_out.mask(device), m_h * m_w))


def _compute_unstructured_macs(weight: torch.Tensor, m_h: int, m_w: int) -> int:
    """Unstructured MACs: every non-zero weight costs one MAC per output position, nnz(W)·m_h·m_w."""
    return int(weight.ne(0).sum()) * m_h * m_w


def _in_channels(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels
