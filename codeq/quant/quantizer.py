"""Weight quantizers: the CoDeQ dead-zone compander and a plain uniform baseline.

Straight-through estimators (the paper's: identity backward) are either written as
``x + (f(x) - x).detach()`` or, for the dead-zone quantizer's hot path, fused into one autograd node.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from codeq.quant.base import WeightQuantizer
from codeq.quant.reference import deadzone_reference
from codeq.schema import allowed, configured_by


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def clamp_ste(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """clamp(x, lo, hi) forward, identity backward to x only (no clip mask, no grad to bounds)."""
    return x + (torch.clamp(x, lo.detach(), hi.detach()) - x).detach()


def robust_absmax(w: torch.Tensor, q: float = 0.99) -> torch.Tensor:
    """The q-quantile of |w| (linear interpolation, as torch.quantile), without gradient."""
    with torch.no_grad():
        return _quantile_of_rows(w.detach().abs().reshape(1, -1), q)[0]


_CHUNK = 8  # values per chunk in _quantile_of_rows' pre-selection
_PRESELECT_FROM = 8192  # row length from which pre-selecting is faster (measured on CPU)


def _quantile_of_rows(magnitudes: torch.Tensor, q: float = 0.99) -> torch.Tensor:
    """The q-quantile of each row of a non-negative [G, n] tensor, as torch.quantile computes it.

    It needs two order statistics, both among the k = n − ⌊q·(n−1)⌋ largest values, read off a top-k
    (faster than torch.quantile's full sort, and free of its 2**24-element limit). Long rows pre-select:
    split a row into n/8 chunks; every one of its k largest values lies in one of the k chunks with the
    largest maxima (a value outside them has k larger-or-equal chunk maxima above it), so the top-k of
    those 8·k candidates has the same values. Padding zeros cannot change a top-k of values ≥ 0.
    """
    rows, n = magnitudes.shape
    pos = q * (n - 1)
    low = math.floor(pos)
    k = n - low
    candidates = magnitudes
    if n >= _PRESELECT_FROM and 4 * _CHUNK * k <= n:
        padded = F.pad(magnitudes, (0, -n % _CHUNK))
        chunks = padded.view(rows, _CHUNK, -1)  # chunk j = entries j, j + n/8, ...: max over contiguous slabs
        top_chunks = chunks.amax(dim=1).topk(k, dim=1, sorted=False).indices
        candidates = chunks.gather(2, top_chunks.unsqueeze(1).expand(rows, _CHUNK, k)).view(rows, -1)
    # descending, so the last two are ranks low+1 and low (one value when low is the maximum's rank)
    pair = torch.topk(candidates, k, dim=1, sorted=True).values[:, -2:]
    return torch.lerp(pair[:, -1], pair[:, 0], pos - low)


_CONSTANTS = (1.0, 0.5, 1e-8)


@functools.cache
def _constant_tensors(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(v, dtype=dtype, device=device) for v in _CONSTANTS)


def _constants(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor | float, ...]:
    """1, ½ and 1e-8 as cached 0-dim tensors: eager scalar math against them skips wrapping a Python float
    per op (~1 µs each). Plain floats under torch.compile, which fuses the scalar math anyway."""
    if torch.compiler.is_compiling():
        return _CONSTANTS
    return _constant_tensors(dtype, device)


class _DeadZoneLDZ(torch.autograd.Function):
    """The dead-zone quantizer ŵ(w, θ_dz, θ_bit) of L layers as one autograd node (forward without autograd).

    Inputs: logits θ_dz, θ_bit [L] and the weights as stacks, layers of one shape stacked [G, ...] (Σ G = L,
    rows in the logits' order); one output per stack. The per-layer scalar math runs once on length-L vectors
    and the elementwise math once per stack, so 18 layers in 5 shapes cost about the ops of 5 layers.
    Forward: absmax = 0.99-quantile of |w|, d = 2·absmax·(1 − |tanh θ_dz|), b = round(|tanh θ_bit|·span + 2)
    (or the fixed b), Q = 2^(b−1) − 1, s = (absmax − d/2)/(Q − ½) + 1e-8, δ = d/2 − s/2,
    u = sign(w)·relu(|w| − δ), w̄ = clip(round(u/s), −Q, Q), ŵ = s·w̄ + δ·sign(w̄).
    Backward is the paper's STE chain (round, relu, clip as identity; sign, absmax without grad):
    ∂ŵ/∂w = sign(w)², ∂ŵ/∂s = w̄ − u/s, ∂ŵ/∂δ = sign(w̄) − sign(w), then by hand through δ, s, d, Q, b to
    the logits: forward keeps x = ∂ŵ/∂s, y = ∂ŵ/∂δ and per logit the scalars (α, β) of the chain, so that
    backward is ∂L/∂θ = α·Σ g·x + β·Σ g·y. One node instead of ~30 tracked scalar ops per layer.
    """

    @staticmethod
    def forward(ctx, logit_dz, logit_bit, span, min_bits, fixed_bits, grad_enabled, *stacks):
        dtype, device = stacks[0].dtype, stacks[0].device
        one, half, eps = _constants(dtype, device)
        magnitudes = [w.abs() for w in stacks]
        absmax = torch.cat([_quantile_of_rows(m.reshape(m.shape[0], -1)) for m in magnitudes])
        tanh_dz = torch.tanh(logit_dz).to(dtype)
        half_d = absmax * (one - tanh_dz.abs())  # d/2
        if fixed_bits is None:
            tanh_bit = torch.tanh(logit_bit).to(dtype)
            b = torch.round(tanh_bit.abs() * span + min_bits)
        else:
            b = torch.full_like(absmax, float(fixed_bits))
        levels = torch.exp2(b - one) - one
        denom = levels - half
        step = (absmax - half_d) / denom + eps
        shift = half_d - step * half

        # needs_input_grad ignores no_grad mode, hence the caller's grad_enabled
        need_dz = grad_enabled and ctx.needs_input_grad[0]
        need_bit = grad_enabled and ctx.needs_input_grad[1] and fixed_bits is None
        ctx.coeffs = coeffs = {}  # θ → (α, β) with ∂L/∂θ = α·Σ g·x + β·Σ g·y
        if need_dz or need_bit:
            ds_ddhalf = -one / denom  # ∂s/∂(d/2)
        if need_dz:
            dd_dtheta = -absmax * torch.sign(tanh_dz) * (one - tanh_dz * tanh_dz)  # ∂(d/2)/∂θ_dz
            coeffs["dz"] = (ds_ddhalf * dd_dtheta, (one - half * ds_ddhalf) * dd_dtheta)
        if need_bit:
            ds_dq = (half_d - absmax) / (denom * denom)
            dq_db = (levels + one) * math.log(2.0)
            db_dtheta = torch.sign(tanh_bit) * (one - tanh_bit * tanh_bit) * span
            ds_dtheta = ds_dq * dq_db * db_dtheta
            coeffs["bit"] = (ds_dtheta, -half * ds_dtheta)

        per_layer = torch.stack((shift, step, levels), dim=1).split([w.shape[0] for w in stacks])
        outputs, saved = [], []
        for w, abs_w, scalars in zip(stacks, magnitudes, per_layer):
            # each layer's (δ, s, Q) broadcast against its [G, ...] stack
            shift_, step_, levels_ = scalars.view(scalars.shape + (1,) * (w.dim() - 1)).unbind(1)
            sign_w = torch.sign(w)
            # |u|/s ≥ 0 and round is odd, so clip(round(u/s), −Q, Q) = sign(w)·min(round(|u|/s), Q)
            magnitude = abs_w.sub_(shift_).relu_().div_(step_)
            w_bar = torch.round(magnitude).clamp_max_(levels_).mul_(sign_w)
            sign_bar = torch.sign(w_bar)
            outputs.append(torch.addcmul(w_bar * step_, sign_bar, shift_))
            if coeffs:
                # x = ∂ŵ/∂s = w̄ − u/s, y = ∂ŵ/∂δ = sign(w̄) − sign(w) (s, δ independent; δ = d/2 − s/2 is in α, β)
                saved += [sign_w, torch.addcmul(w_bar, sign_w, magnitude, value=-1.0), sign_bar.sub_(sign_w)]
            else:
                saved += [sign_w, None, None]
        ctx.save_for_backward(*saved)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        grad_ws, sums = [], []
        for i, (grad, sign_w, x, y) in enumerate(zip(grads, saved[0::3], saved[1::3], saved[2::3])):
            needed = ctx.needs_input_grad[6 + i]  # the stacks follow the six leading arguments
            grad_ws.append(grad * sign_w.abs() if needed else None)  # |sign(w)| = sign(w)²
            if ctx.coeffs:
                rows = grad.reshape(grad.shape[0], -1)
                sums.append(
                    torch.stack(
                        (
                            torch.linalg.vecdot(x.reshape(rows.shape), rows),
                            torch.linalg.vecdot(y.reshape(rows.shape), rows),
                        ),
                        dim=1,
                    )
                )
        logit_grads = {}
        if ctx.coeffs:
            grad_x, grad_y = torch.cat(sums).unbind(1)  # Σ g·x and Σ g·y of every layer
            logit_grads = {name: alpha * grad_x + beta * grad_y for name, (alpha, beta) in ctx.coeffs.items()}
        return logit_grads.get("dz"), logit_grads.get("bit"), None, None, None, None, *grad_ws


@dataclass
class DeadZoneKeys:
    """quantizer=deadzone|deadzone_fixed. Bits stop at 16: at b bits the level spacing is absmax/2^(b-1), which
    beyond 16 bits nears float32's own resolution (the paper learns 2-8)."""

    fixed_bit_val: int = allowed(minimum=2, maximum=16)
    max_bits: int = allowed(minimum=2, maximum=16)
    init_bit_logit: float = allowed()
    init_deadzone_logit: float = allowed()
    learnable_bit: bool = True
    learnable_deadzone: bool = True


@configured_by(DeadZoneKeys)
class DeadZoneLDZCompander(WeightQuantizer):
    """CoDeQ dead-zone quantizer with learnable dead-zone width and bit-width (layer-wise).

    d = 2·absmax·(1 − |tanh θ_dz|),  Q_b = 2^(b−1) − 1,  s = (absmax − d/2)/(Q_b − ½) + 1e-8,
    δ = d/2 − s/2,  w̄ = clip(round(sign(w)·relu(|w| − δ)/s), −Q_b, Q_b),  ŵ = s·w̄ + δ·sign(w̄),
    b = round(tanh|θ_bit|·(max_bits − 2) + 2) when learned, else ``fixed_bit_val``.
    Every |w| ≤ d/2 maps to exactly 0: the dead zone is magnitude pruning.
    ``fused`` (default) computes ŵ and its gradients in one hand-derived node, stacked over layers;
    ``fused=False`` runs the paper's equations as written (codeq.quant.reference), one layer at a time.
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
        fused: bool = True,
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
        self.fused = bool(fused)
        self.logit_dz = nn.Parameter(torch.tensor(float(init_deadzone_logit)), requires_grad=learnable_deadzone)
        self.logit_bit = nn.Parameter(torch.tensor(float(init_bit_logit)), requires_grad=learnable_bit)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The dead-zone logit trains in the optimizer's "deadzone" group, the bit logit in "bits"."""
        return {"deadzone": [self.logit_dz], "bits": [self.logit_bit]}

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
        if not self.fused:
            fixed_bits = None if self.learnable_bit else self.fixed_bit_val
            return deadzone_reference(
                w, self.logit_dz, self.logit_bit, robust_absmax(w), self.max_bits, self.min_bits, fixed_bits
            )
        (w_hat,) = self.quantize_stacked([self], [w.unsqueeze(0)])
        return w_hat.squeeze(0)

    def stack_key(self) -> tuple | None:
        """Quantizers with equal keys may quantize their layers together (``quantize_stacked``); None: unfused."""
        if not self.fused:
            return None
        return (self.fixed_bit_val, self.max_bits, self.learnable_bit, self.learnable_deadzone)

    @classmethod
    def quantize_stacked(
        cls, quantizers: Sequence[DeadZoneLDZCompander], stacks: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        """ŵ of many layers in one pass; ``stacks`` holds their weights, layers of one shape stacked as [G, ...].

        ``quantizers`` are the layers' quantizers in the stacks' row order, all with one ``stack_key``.
        Row i of the result equals ``quantizers[i](weight i)``; the scalar math runs once for all layers.
        """
        first = quantizers[0]
        fixed_bits = None if first.learnable_bit else first.fixed_bit_val
        logit_dz = torch.stack([q.logit_dz for q in quantizers])
        logit_bit = torch.stack([q.logit_bit for q in quantizers])
        return _DeadZoneLDZ.apply(
            logit_dz,
            logit_bit,
            first.max_bits - first.min_bits,
            first.min_bits,
            fixed_bits,
            torch.is_grad_enabled(),
            *stacks,
        )


@dataclass
class UniformKeys:
    bitwidth: int = allowed(minimum=2, maximum=16)


@configured_by(UniformKeys)
class UniformSymmetric(WeightQuantizer):
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
