"""The weight-quantizer contract: what codeq asks of a quantizer, and nothing more.

A quantizer is an ``nn.Module``; the config builds one per quantized Conv/Linear layer through a factory
(``_target_`` + ``_partial_: true``), and ``attach_weight_quantizers`` puts it on the layer's weight.

Required:
  ``forward(w) -> ŵ``           the fake-quantized weight, same shape; its gradients are the method's (STE, ...).
  ``get_bitwidth() -> tensor``  b_w of the layer now, a 0-d CPU tensor: BOPs = MACs·b_w·b_a need it.
Asked by the optimizer (default: the quantizer has no parameters):
  ``param_groups() -> {group: [parameters]}``  the optimizer group of each of its parameters, among
                                "deadzone" and "bits" (codeq.optim); a parameter it does not name is an error.
Optional, a faster path (StackedFakeQuant uses it when present):
  ``stack_key() -> hashable | None``  quantizers with equal keys may quantize their layers in one call; None: never.
  ``quantize_stacked(quantizers, stacks)``  classmethod: the layers' ŵ, weights of one shape stacked [G, ...];
                                row i of the result equals ``quantizers[i](weight i)``.
"""

from __future__ import annotations

import abc

import torch
from torch import nn


class WeightQuantizer(nn.Module, abc.ABC):
    """Base class of codeq's weight quantizers; subclass it and implement ``forward`` and ``get_bitwidth``."""

    @abc.abstractmethod
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """ŵ = Q(w), the fake-quantized weight (same shape and dtype as ``w``)."""

    @abc.abstractmethod
    def get_bitwidth(self) -> torch.Tensor:
        """The bit-width b_w used now, as a 0-d CPU tensor."""

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The optimizer group ("deadzone" or "bits") of each of this quantizer's parameters."""
        return {}
