"""Weight quantizers: the CoDeQ dead-zone compander and a plain uniform baseline.

Straight-through estimators (the paper's: identity backward) are either written as
``x + (f(x) - x).detach()`` or, for the dead-zone quantizer's hot path, fused into one autograd node.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def clamp_ste(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """clamp(x, lo, hi) forward, identity backward to x only (no clip mask, no grad to bounds)."""
    return x + (torch.clamp(x, lo.detach(), hi.detach()) - x).detach()


def robust_absmax(w: torch.Tensor, q: float = 0.99) -> torch.Tensor:
    """The q-quantile of |w| (linear interpolation, as torch.quantile), without gradient.

    Reads the two order statistics it needs from a top-k of the largest |w| (k ≈ (1−q)·n): faster
    than torch.quantile's full sort and free of its 2**24-element limit.
    """
    with torch.no_grad():
        flat = w.detach().abs().flatten()
        pos = q * (flat.numel() - 1)
        low = math.floor(pos)
        largest = torch.topk(flat, flat.numel() - low, sorted=True).values  # descending; [-1] is rank `low`
        lo_val = largest[-1]
        hi_val = largest[-2] if largest.numel() > 1 else lo_val
        return lo_val + (hi_val - lo_val) * (pos - low)


class _DeadZoneQuantize(torch.autograd.Function):
    """ŵ = s·w̄ + δ·sign(w̄), w̄ = clip(round(sign(w)·relu(|w| − δ)/s), −Q, Q), fused into one node.

    Backward is the paper's STE chain written out (round, relu, clip as identity; sign without grad):
    ∂ŵ/∂w = sign(w)²,  ∂ŵ/∂s = w̄ − u/s with u = sign(w)·relu(|w| − δ),  ∂ŵ/∂δ = sign(w̄) − sign(w).
    One autograd node instead of ~15 keeps the per-layer overhead of a training step small.
    """

    @staticmethod
    def forward(ctx, w, step, shift, levels):
        sign_w = torch.sign(w)
        companded = sign_w * torch.relu(w.abs() - shift)
        w_bar = torch.clamp(torch.round(companded / step), -levels, levels)
        ctx.save_for_backward(sign_w, companded, w_bar, step)
        return step * w_bar + shift * torch.sign(w_bar)

    @staticmethod
    def backward(ctx, grad):
        sign_w, companded, w_bar, step = ctx.saved_tensors
        grad_w = grad * sign_w.square() if ctx.needs_input_grad[0] else None
        grad_step = (grad * (w_bar - companded / step)).sum() if ctx.needs_input_grad[1] else None
        grad_shift = (grad * (torch.sign(w_bar) - sign_w)).sum() if ctx.needs_input_grad[2] else None
        return grad_w, grad_step, grad_shift, None


class DeadZoneLDZCompander(nn.Module):
    """CoDeQ dead-zone quantizer with learnable dead-zone width and bit-width (layer-wise).

    d = 2·absmax·(1 − |tanh θ_dz|),  Q_b = 2^(b−1) − 1,  s = (absmax − d/2)/(Q_b − ½) + 1e-8,
    δ = d/2 − s/2,  w̄ = clip(round(sign(w)·relu(|w| − δ)/s), −Q_b, Q_b),  ŵ = s·w̄ + δ·sign(w̄),
    b = round(tanh|θ_bit|·(max_bits − 2) + 2) when learned, else ``fixed_bit_val``.
    Every |w| ≤ d/2 maps to exactly 0: the dead zone is magnitude pruning.
    """

    min_bits = 2

    def __init__(
        self,
        fixed_bit_val: int = 4,
        max_bits: int = 8,
        init_bit_logit: float = 3.0,
        init_deadzone_logit: float = 3.0,
        learnable_bit: bool = True,
        learnable_deadzone: bool = True,
    ):
        super().__init__()
        if not self.min_bits <= max_bits:
            raise ValueError(f"max_bits must be >= {self.min_bits}, got {max_bits}")
        if fixed_bit_val < self.min_bits:
            raise ValueError(f"fixed_bit_val must be >= {self.min_bits}, got {fixed_bit_val}")
        self.fixed_bit_val = int(fixed_bit_val)
        self.max_bits = int(max_bits)
        self.learnable_bit = bool(learnable_bit)
        self.learnable_deadzone = bool(learnable_deadzone)
        self.logit_dz = nn.Parameter(torch.tensor(float(init_deadzone_logit)), requires_grad=learnable_deadzone)
        self.logit_bit = nn.Parameter(torch.tensor(float(init_bit_logit)), requires_grad=learnable_bit)

    def bitwidth(self) -> torch.Tensor:
        """Current bit-width b as a tensor (differentiable w.r.t. θ_bit through the round STE)."""
        if not self.learnable_bit:
            return torch.tensor(float(self.fixed_bit_val), device=self.logit_bit.device)
        span = self.max_bits - self.min_bits
        return round_ste(torch.tanh(self.logit_bit).abs() * span + self.min_bits)

    def deadzone_width(self, w: torch.Tensor) -> torch.Tensor:
        """Dead-zone width d for weight ``w``: every |w| <= d/2 is quantized to 0."""
        return 2.0 * robust_absmax(w) * (1.0 - torch.tanh(self.logit_dz).abs())

    @torch.no_grad()
    def get_bitwidth(self) -> torch.Tensor:
        """Current bit-width as a CPU tensor."""
        return self.bitwidth().detach().cpu()

    @torch.no_grad()
    def get_deadzone_width(self, w: torch.Tensor) -> torch.Tensor:
        """Current dead-zone width for ``w`` as a CPU tensor."""
        return self.deadzone_width(w).detach().cpu()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        absmax = robust_absmax(w)
        b = self.bitwidth().to(w.dtype)
        levels = torch.pow(2.0, b - 1.0) - 1.0
        d = 2.0 * absmax * (1.0 - torch.tanh(self.logit_dz).abs())
        step = (absmax - d / 2.0) / (levels - 0.5) + 1e-8
        shift = d / 2.0 - step / 2.0
        return _DeadZoneQuantize.apply(w, step, shift, levels.detach())


class UniformSymmetric(nn.Module):
    """Plain symmetric uniform quantizer for baselines: s = max|w| / Q_b, ŵ = s·clip(round(w/s), −Q_b, Q_b)."""

    def __init__(self, bitwidth: int = 8):
        super().__init__()
        if bitwidth < 2:
            raise ValueError(f"bitwidth must be >= 2, got {bitwidth}")
        self.bits = int(bitwidth)

    @torch.no_grad()
    def get_bitwidth(self) -> torch.Tensor:
        """Bit-width as a CPU tensor (fixed)."""
        return torch.tensor(float(self.bits))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        levels = 2.0 ** (self.bits - 1) - 1.0
        step = w.detach().abs().max().clamp_min(1e-12) / levels
        bound = torch.tensor(levels, device=w.device, dtype=w.dtype)
        return step * clamp_ste(round_ste(w / step), -bound, bound)
