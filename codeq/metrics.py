"""Stable import path for the cost-accounting names (user code and tests import them); the code is ``codeq.cost``."""

from codeq.cost.counting import QuantizationComparison
from codeq.cost.layers import (
    UNQUANTIZED_BITS,
    LayerQuantInfo,
    LayerStats,
    ModelStats,
    NullChannels,
    _compute_effective_macs,
    _compute_null_output_channels,
    _compute_unstructured_macs,
    _get_layer_quant_info,
    collect_layer_quant_info,
)
from codeq.cost.liveness import _get_spatial_dims

__all__ = [
    "UNQUANTIZED_BITS",
    "LayerQuantInfo",
    "LayerStats",
    "ModelStats",
    "NullChannels",
    "QuantizationComparison",
    "_compute_effective_macs",
    "_compute_null_output_channels",
    "_compute_unstructured_macs",
    "_get_layer_quant_info",
    "_get_spatial_dims",
    "collect_layer_quant_info",
]
