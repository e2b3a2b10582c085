"""Packed weights: each quantized layer as b-bit integer codes, its step and shift, and a sparse index of its zeros.

A fake-quantized weight is ŵ = s·w̄ + δ·sign(w̄) with integer w̄ ∈ [−Q, Q], Q = 2^(b−1) − 1 (δ = 0 for the
uniform quantizer). Only the non-zero codes are stored, as w̄ + Q in b bits each, bit-packed; where they sit
is a bitmask (one bit per weight) or a run-length list (the zeros before each non-zero, r bits each),
whichever is smaller. ``unpack_state_dict`` rebuilds ŵ with the quantizer's own float32 ops, bit for bit.
Every other tensor (biases, BatchNorm, layers left in 32 bits) is stored as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from codeq.quant import DeadZoneLDZCompander, UniformSymmetric
from codeq.quant.quantizer import _constants, _quantile_of_rows

PACKED_FORMAT = "codeq-packed-1"


class PackingError(ValueError):
    """A quantizer without a known integer grid, or codes that do not rebuild the weight exactly."""


@dataclass(frozen=True)
class Grid:
    """A layer's quantization grid: ŵ = step·w̄ + shift·sign(w̄), |w̄| ≤ levels, ``bits`` per code."""

    step: torch.Tensor
    shift: torch.Tensor
    levels: int
    bits: int


def quantizer_grid(quantizer: nn.Module, latent: torch.Tensor) -> Grid:
    """The grid ``quantizer`` puts ``latent`` (the layer's full latent weight) on, with the quantizer's own ops."""
    with torch.no_grad():
        if isinstance(quantizer, DeadZoneLDZCompander):
            one, half, eps = _constants(latent.dtype, latent.device)
            absmax = _quantile_of_rows(latent.abs().reshape(1, -1))
            half_d = absmax * (one - torch.tanh(quantizer.logit_dz.reshape(1)).to(latent.dtype).abs())
            if quantizer.learnable_bit:
                tanh_bit = torch.tanh(quantizer.logit_bit.reshape(1)).to(latent.dtype)
                bits = torch.round(tanh_bit.abs() * (quantizer.max_bits - quantizer.min_bits) + quantizer.min_bits)
            else:
                bits = torch.full_like(absmax, float(quantizer.fixed_bit_val))
            levels = torch.exp2(bits - one) - one
            step = (absmax - half_d) / (levels - half) + eps
            return Grid(step, half_d - step * half, int(levels), int(bits))
        if isinstance(quantizer, UniformSymmetric):
            levels = 2 ** (quantizer.bits - 1) - 1
            step = (latent.abs().max().clamp_min(1e-12) / float(levels)).reshape(1)
            return Grid(step, torch.zeros_like(step), levels, quantizer.bits)
    raise PackingError(f"packing: no integer grid known for quantizer {type(quantizer).__name__}")


def _pack_bits(values: np.ndarray, width: int) -> np.ndarray:
    """Unsigned integers < 2**width, ``width`` bits each, little-endian, as bytes."""
    bits = (values.astype(np.uint64)[:, None] >> np.arange(width, dtype=np.uint64)) & 1
    return np.packbits(bits.astype(np.uint8).ravel(), bitorder="little")


def _unpack_bits(data: np.ndarray, count: int, width: int) -> np.ndarray:
    bits = np.unpackbits(data, bitorder="little")[: count * width].reshape(count, width).astype(np.int64)
    return bits @ (1 << np.arange(width, dtype=np.int64))


def _zero_index(nonzero: np.ndarray) -> tuple[str, int, np.ndarray]:
    """(kind, width, bytes) of the smaller of a bitmask and a run-length list of the zeros before each non-zero."""
    bitmask = np.packbits(nonzero.astype(np.uint8), bitorder="little")
    positions = np.flatnonzero(nonzero)
    gaps = np.diff(positions, prepend=-1) - 1
    width = max(1, int(gaps.max()).bit_length()) if gaps.size else 1
    runs = _pack_bits(gaps, width)
    return ("runlength", width, runs) if runs.size < bitmask.size else ("bitmask", 1, bitmask)


def pack_weight(weight: torch.Tensor, grid: Grid) -> dict[str, Any]:
    """One layer's packed record; raises PackingError unless it unpacks to exactly ``weight``."""
    w = weight.detach().cpu()
    with torch.no_grad():
        codes = torch.round((w.abs() - grid.shift) / grid.step).clamp(0, grid.levels) * torch.sign(w)
    flat = codes.flatten().to(torch.int64).numpy()
    nonzero = flat != 0
    kind, width, index = _zero_index(nonzero)
    record = {
        "shape": list(w.shape),
        "bits": grid.bits,
        "levels": grid.levels,
        "step": grid.step.cpu().reshape(()),
        "shift": grid.shift.cpu().reshape(()),
        "nnz": int(nonzero.sum()),
        "index_kind": kind,
        "index_width": width,
        "index": torch.from_numpy(index),
        "codes": torch.from_numpy(_pack_bits(flat[nonzero] + grid.levels, grid.bits)),
    }
    if not torch.equal(unpack_weight(record), w):
        raise PackingError(f"packing: the codes do not rebuild the weight exactly (shape {list(w.shape)})")
    return record


def unpack_weight(record: dict[str, Any]) -> torch.Tensor:
    """ŵ = step·w̄ + shift·sign(w̄) from a packed record, with the quantizer's float32 ops."""
    numel = int(np.prod(record["shape"]))
    nnz = record["nnz"]
    index = record["index"].numpy()
    if record["index_kind"] == "bitmask":
        positions = np.flatnonzero(np.unpackbits(index, bitorder="little")[:numel])
    else:
        positions = np.cumsum(_unpack_bits(index, nnz, record["index_width"]) + 1) - 1
    flat = np.zeros(numel, dtype=np.float32)
    flat[positions] = _unpack_bits(record["codes"].numpy(), nnz, record["bits"]) - record["levels"]
    w_bar = torch.from_numpy(flat).reshape(record["shape"])
    return torch.addcmul(w_bar * record["step"], torch.sign(w_bar), record["shift"])


def record_bytes(record: dict[str, Any]) -> int:
    """Stored bytes of a packed layer: codes, index, step and shift (float32 each)."""
    return int(record["codes"].numel() + record["index"].numel() + 8)


def pack_state_dict(state: dict[str, torch.Tensor], grids: dict[str, Grid]) -> dict[str, Any]:
    """``state`` with the weight of every layer in ``grids`` (by module name) packed; the rest kept as is."""
    layers = {name: pack_weight(state[f"{name}.weight"], grid) for name, grid in grids.items()}
    packed_keys = {f"{name}.weight" for name in grids}
    plain = {key: value.detach().cpu() for key, value in state.items() if key not in packed_keys}
    return {"format": PACKED_FORMAT, "layers": layers, "plain": plain}


def unpack_state_dict(packed: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The full state dict back: packed layers rebuilt exactly, plain tensors as stored."""
    if packed.get("format") != PACKED_FORMAT:
        raise PackingError(f"packing: not a {PACKED_FORMAT} file (format {packed.get('format')!r})")
    state = dict(packed["plain"])
    state.update({f"{name}.weight": unpack_weight(record) for name, record in packed["layers"].items()})
    return state


def packed_sizes(packed: dict[str, Any]) -> dict[str, int]:
    """Bytes of the packed layers, of the plain tensors, and Σ nnz·b bits of the codes rounded up to bytes."""
    layers = packed["layers"].values()
    return {
        "packed_layers_bytes": sum(record_bytes(r) for r in layers),
        "plain_tensors_bytes": sum(t.numel() * t.element_size() for t in packed["plain"].values()),
        "theoretical_code_bytes": -(-sum(r["nnz"] * r["bits"] for r in layers) // 8),
    }
