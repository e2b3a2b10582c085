"""Cost accounting: which channels are dead (liveness), what the layers cost (MACs/BOPs), and the ratios.

- ``layers``:    data types and the per-layer MAC formulas (structured and unstructured).
- ``liveness``:  one traced forward pass and null-channel propagation through the fx graph.
- ``counting``:  QuantizationComparison: model totals against the dense 32-bit baseline, ratios.
- ``evaluator``: Evaluator/EvalResult: both views of a model in one call, for logging.
"""

from codeq.cost.counting import QuantizationComparison
from codeq.cost.evaluator import EvalResult, Evaluator
from codeq.cost.layers import (
    UNQUANTIZED_BITS,
    LayerQuantInfo,
    LayerStats,
    ModelStats,
    NullChannels,
    collect_layer_quant_info,
)

__all__ = [
    "UNQUANTIZED_BITS",
    "EvalResult",
    "Evaluator",
    "LayerQuantInfo",
    "LayerStats",
    "ModelStats",
    "NullChannels",
    "QuantizationComparison",
    "collect_layer_quant_info",
]
