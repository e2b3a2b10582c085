"""CoDeQ weight quantizers (the contract: codeq.quant.base) and the helpers that attach them to a model."""

from codeq.quant.base import WeightQuantizer
from codeq.quant.parametrize import (
    FakeQuantParametrization,
    StackedFakeQuant,
    attach_weight_quantizers,
    fake_quant_of,
    no_quantizer,
    quantized_layers,
    toggle_quantization,
)
from codeq.quant.quantizer import DeadZoneLDZCompander, UniformSymmetric
from codeq.quant.reference import deadzone_reference

__all__ = [
    "DeadZoneLDZCompander",
    "UniformSymmetric",
    "FakeQuantParametrization",
    "StackedFakeQuant",
    "attach_weight_quantizers",
    "fake_quant_of",
    "no_quantizer",
    "quantized_layers",
    "toggle_quantization",
    "WeightQuantizer",
    "deadzone_reference",
]
