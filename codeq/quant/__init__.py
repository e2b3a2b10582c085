"""CoDeQ weight quantizers and the helpers that attach them to a model."""

from codeq.quant.parametrize import (
    FakeQuantParametrization,
    StackedFakeQuant,
    attach_weight_quantizers,
    fake_quant_of,
    quantized_layers,
    toggle_quantization,
)
from codeq.quant.quantizer import DeadZoneLDZCompander, UniformSymmetric

__all__ = [
    "DeadZoneLDZCompander",
    "UniformSymmetric",
    "FakeQuantParametrization",
    "StackedFakeQuant",
    "attach_weight_quantizers",
    "fake_quant_of",
    "quantized_layers",
    "toggle_quantization",
]
