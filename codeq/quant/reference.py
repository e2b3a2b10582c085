"""The CoDeQ dead-zone quantizer as the paper writes it: plain PyTorch, differentiated by autograd.

This is the specification (``quantizer.fused=false`` trains with it); the default fused path in
codeq.quant.quantizer computes the same values and gradients by hand, stacked over layers, and a test
holds the two equal. Change the parameterisation here first, then re-derive the fused backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class _StraightThrough(torch.autograd.Function):
    """fn(x) forward, identity backward: the paper's straight-through estimator."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return fn(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def round_st(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return _StraightThrough.apply(x, torch.round)


def relu_st(x: torch.Tensor) -> torch.Tensor:
    """relu(x) forward, identity backward."""
    return _StraightThrough.apply(x, torch.relu)


def clip_st(x: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """clip(x, −bound, bound) forward, identity backward (no gradient to the bound)."""
    bound = bound.detach()
    return _StraightThrough.apply(x, lambda t: torch.clamp(t, -bound, bound))


def deadzone_reference(
    w: torch.Tensor,
    logit_dz: torch.Tensor,
    logit_bit: torch.Tensor,
    absmax: torch.Tensor,
    max_bits: int,
    min_bits: int = 2,
    fixed_bits: int | None = None,
) -> torch.Tensor:
    """ŵ(w, θ_dz, θ_bit); ``absmax`` is the 0.99-quantile of |w| (no gradient); ``fixed_bits`` None = learned b."""
    d = 2 * absmax * (1 - torch.tanh(logit_dz).abs())  # dead-zone width: |w| <= d/2 maps to 0
    if fixed_bits is None:
        b = round_st(torch.tanh(logit_bit).abs() * (max_bits - min_bits) + min_bits)
    else:
        b = torch.tensor(float(fixed_bits), dtype=w.dtype, device=w.device)
    q = 2 ** (b - 1) - 1  # largest level Q_b
    s = (absmax - d / 2) / (q - 0.5) + 1e-8  # step between levels
    delta = d / 2 - s / 2  # shift: level 1 sits at d/2 + s/2
    w_bar = clip_st(round_st(torch.sign(w) * relu_st(w.abs() - delta) / s), q)
    return s * w_bar + delta * torch.sign(w_bar)
