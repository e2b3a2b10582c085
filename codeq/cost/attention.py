"""MACs of matmuls between two activations (attention's q·kᵀ and attn·v): no weight takes part, so weight
quantization and pruning cannot shrink them; they are counted apart, at 32x32 bits.

Counted on one forward pass under a TorchFunctionMode that sees ``torch.matmul``/``@``, ``bmm`` and
``F.scaled_dot_product_attention`` whose operands are all non-parameters:
``a @ b``: numel(out)·k for a contraction length k; SDPA with q ``… L x E``, k ``… S x E``, v ``… S x Ev``:
``B·L·S·E`` (q·kᵀ) + ``B·L·S·Ev`` (attn·v). Conv/Linear layers run as ``F.conv*``/``F.linear`` and are not seen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_MATMULS = {
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.Tensor.__rmatmul__,
    torch.bmm,
    torch.Tensor.bmm,
}


def _is_activation(value) -> bool:
    return isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter)


class ActivationMatmulCounter(TorchFunctionMode):
    """Adds up the MACs of activation-by-activation matmuls run inside it."""

    def __init__(self):
        super().__init__()
        self.macs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _MATMULS and len(args) >= 2 and all(_is_activation(a) for a in args[:2]):
            a, b = (args[1], args[0]) if func is torch.Tensor.__rmatmul__ else args[:2]
            self.macs += out.numel() * (a.shape[-1] if a.dim() > 0 else 1)
        elif func is F.scaled_dot_product_attention:
            q, k, v = (kwargs[n] if n in kwargs else args[i] for i, n in enumerate(("query", "key", "value")))
            if all(_is_activation(t) for t in (q, k, v)):
                batch_and_queries = out.numel() // v.shape[-1]
                self.macs += batch_and_queries * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        return out


def activation_matmul_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of the activation-by-activation matmuls of one forward pass of ``model`` on ``x`` (eval, no grad)."""
    counter = ActivationMatmulCounter()
    training = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        for m, flag in training:
            m.training = flag
    return counter.macs
