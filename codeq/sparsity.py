"""Structured sparsity: losses ``model -> scalar tensor`` and proximal steps after the optimizer step.

A sparsity option (one function + one YAML in conf/sparsity) is either a loss, added to the objective as
λ·schedule·loss, or a ``Proximal`` step, applied to the latent weights after every optimizer step with
step size η = λ·schedule·lr (lr: the weights' current learning rate). Both take their λ from
``sparsity.weight`` and their schedule from the ``schedule`` group, so they are configured the same way.
A proximal step zeroes whole filters *exactly*; the dead-zone quantizer maps a zero row to zero whatever
its width, so those channels are dead in the cost analysis. Gradient steps on a loss only shrink them.

Each loss reads ``module.weight`` of every Conv (and, with ``include_linear``, Linear) layer. With
quantizers attached that is the effective (quantized) weight, so gradients reach the latent weights
and the dead-zone logits; evaluate the loss inside the forward pass's ``StackedFakeQuant(model).cached()``
(as the trainer does) or ``parametrize.cached()``, and the quantizers run once per step instead of twice.

Every loss is vectorised (no Python loop over channels or blocks, one norm per row length rather than
per layer) and has a finite subgradient, 0, at an all-zero group: dead channels are what these losses are for.
"""

from __future__ import annotations

import fnmatch
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from codeq.errors import ConfigError
from codeq.models import first_and_last_layers
from codeq.schema import allowed, check_values, configured_by

SparsityLoss = Callable[[nn.Module], torch.Tensor]


@dataclass(frozen=True)
class Proximal:
    """A sparsity option acting after each optimizer step: ``step(model, η)`` applies prox_{η·R} to the weights.

    η = λ·schedule(epoch)·lr; R is the regulariser the option names (e.g. a group lasso).
    """

    step: Callable[[nn.Module, float], None]


PENALISED_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _check_include_linear(include_linear: object) -> None:
    if not isinstance(include_linear, bool):
        raise ConfigError(f"sparsity.include_linear must be true or false, got {include_linear!r}")


@dataclass
class SparsityKeys:
    """The keys of a sparsity option: λ (``weight``, read by codeq.main) and the loss's own arguments."""

    weight: float = allowed(minimum=0)
    include_linear: bool = False


@dataclass
class BlockSparsityKeys(SparsityKeys):
    block_size: int = allowed(minimum=1)


def _penalised_weights(model: nn.Module, include_linear: bool) -> Iterator[torch.Tensor]:
    """The weight of every Conv layer (output channels first), plus every Linear when asked."""
    kinds = PENALISED_CONVS + (nn.Linear,) if include_linear else PENALISED_CONVS
    for module in model.modules():
        if isinstance(module, kinds):
            yield module.weight


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _sum_of_row_norms(model: nn.Module, row_sets: Iterable[torch.Tensor]) -> torch.Tensor:
    """Σ ‖row‖₂ over the rows of every [N, n] tensor in ``row_sets``; zero on the model's device when empty.

    Row sets of equal row length are concatenated first: one norm per row length, not one per layer.
    """
    by_length: dict[int, list[torch.Tensor]] = defaultdict(list)
    for rows in row_sets:
        by_length[rows.shape[1]].append(rows)
    if not by_length:
        return torch.zeros((), device=_device_of(model))
    return torch.stack([row_l2_norms(torch.cat(rows)).sum() for rows in by_length.values()]).sum()


def row_l2_norms(rows: torch.Tensor) -> torch.Tensor:
    """‖row‖₂ for each row of a 2-D tensor, with gradient 0 (not NaN) at an all-zero row.

    PyTorch's norm backward, x·g/‖x‖, is defined as 0 where ‖x‖ = 0: the subgradient that lets a
    dead group stay dead.
    """
    return torch.linalg.vector_norm(rows, dim=1)


@configured_by(SparsityKeys)
def no_sparsity(model: nn.Module) -> torch.Tensor:
    """No sparsity loss: a zero scalar on the model's device."""
    return torch.zeros((), device=_device_of(model))


@configured_by(SparsityKeys)
def group_lasso_channels(model: nn.Module, include_linear: bool = False) -> torch.Tensor:
    """Group lasso on output channels: Σ_layers Σ_c ‖W[c, ...]‖₂ (L1 of the L2 filter norms).

    Drives whole output filters to zero (channel pruning); with ``include_linear`` also Linear rows.
    """
    return _sum_of_row_norms(model, (w.flatten(1) for w in _penalised_weights(model, include_linear)))


def _channel_blocks(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """One row per block of ``block_size`` consecutive output channels.

    The channels are zero-padded to a multiple of ``block_size``, so a last partial block is its
    own block and its norm is that of its real channels.
    """
    rows = weight.flatten(1)
    missing = -rows.shape[0] % block_size
    if missing:
        rows = F.pad(rows, (0, 0, 0, missing))
    return rows.reshape(-1, block_size * rows.shape[1])


@configured_by(BlockSparsityKeys)
def group_lasso_blocks(block_size: int = 4, include_linear: bool = False) -> SparsityLoss:
    """Factory: group lasso on blocks of consecutive output channels, Σ_layers Σ_b ‖W[b·B:(b+1)·B]‖₂.

    Args:
        block_size: B, output channels per block (an integer >= 1; 1 is ``group_lasso_channels``).
        include_linear: also penalise blocks of Linear rows.
    """
    check_values(BlockSparsityKeys, "sparsity.", {"block_size": block_size, "include_linear": include_linear})

    def loss(model: nn.Module) -> torch.Tensor:
        blocks = (_channel_blocks(w, block_size) for w in _penalised_weights(model, include_linear))
        return _sum_of_row_norms(model, blocks)

    return loss


@configured_by(SparsityKeys)
def l1_kernel_sparsity(model: nn.Module, include_linear: bool = False) -> torch.Tensor:
    """Sum of the L1 norms of the individual kernels: Σ_{o,i} ‖W[o, i, ...]‖₁ = Σ|W|.

    The finest granularity: per-kernel L1 norms add up to the elementwise L1 of the weight, so this
    is plain L1 on Conv weights (and on Linear weights, whose kernels are single entries, when asked).
    """
    flat = [w.flatten() for w in _penalised_weights(model, include_linear)]
    if not flat:
        return torch.zeros((), device=_device_of(model))
    return torch.cat(flat).abs().sum()


def _check_fraction(dead_fraction: object) -> float:
    if isinstance(dead_fraction, bool) or not isinstance(dead_fraction, (int, float)) or not 0 <= dead_fraction < 1:
        raise ConfigError(f"sparsity.dead_fraction must be a number in [0, 1), got {dead_fraction!r}")
    return float(dead_fraction)


def _check_exclude_layers(exclude_layers: object) -> list[str] | str:
    if exclude_layers is None:
        return []
    if exclude_layers == "auto":
        return "auto"
    if isinstance(exclude_layers, str) or not all(isinstance(name, str) for name in exclude_layers):
        raise ConfigError(
            f"sparsity.exclude_layers must be auto or a list of module names or globs, got {exclude_layers!r}"
        )
    return list(exclude_layers)


def _latent_weights(model: nn.Module, include_linear: bool, exclude_layers: list[str] | str) -> Iterator[torch.Tensor]:
    """The trained weight parameter of every Conv (and Linear when asked) not excluded, output channels first.

    For a quantized layer that is the latent weight under the quantizer. ``exclude_layers`` follows
    quantizer.exclude_layers: ``auto`` = the model's first and last Conv/Linear (stem and classifier), else a
    module is left out when an entry equals its dotted name or matches it as a glob.
    """
    patterns = first_and_last_layers(model) if exclude_layers == "auto" else exclude_layers
    kinds = PENALISED_CONVS + (nn.Linear,) if include_linear else PENALISED_CONVS
    for name, module in model.named_modules():
        if not isinstance(module, kinds) or any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        if parametrize.is_parametrized(module, "weight"):
            yield module.parametrizations["weight"].original
        else:
            yield module.weight


@torch.no_grad()
def _shrink_rows(weight: torch.Tensor, eta: float, smallest: int | None) -> None:
    """Group soft-thresholding of the rows (output channels) of ``weight``, in place:
    w_c ← w_c·max(0, 1 − η·√n / ‖w_c‖₂), n = the row length; only the ``smallest`` rows by norm when given."""
    rows = weight.view(weight.shape[0], -1)
    norms = torch.linalg.vector_norm(rows, dim=1)
    scale = (1.0 - eta * math.sqrt(rows.shape[1]) / norms.clamp_min(torch.finfo(norms.dtype).tiny)).clamp_min_(0.0)
    if smallest is not None:
        keep = torch.ones_like(scale)
        chosen = norms.topk(smallest, largest=False).indices
        scale = keep.index_copy_(0, chosen, scale[chosen])
    rows.mul_(scale.unsqueeze(1))


def group_lasso_proximal(include_linear: bool = False, exclude_layers: Iterable[str] | None = None) -> Proximal:
    """Factory: proximal group lasso on output channels, R = Σ_layers Σ_c √n·‖W[c]‖₂ (n = the row length).

    Its proximal operator is group soft-thresholding, w_c ← w_c·max(0, 1 − η√n/‖w_c‖₂): filters whose norm is
    below η√n become exactly zero (the √n makes η comparable across layers: an Adam step moves a row by ≈ lr·√n).
    """
    _check_include_linear(include_linear)
    exclude = _check_exclude_layers(exclude_layers)

    def step(model: nn.Module, eta: float) -> None:
        for weight in _latent_weights(model, include_linear, exclude):
            _shrink_rows(weight, eta, None)

    return Proximal(step)


def trimmed_group_lasso(
    dead_fraction: float = 0.5, include_linear: bool = False, exclude_layers: Iterable[str] | None = None
) -> Proximal:
    """Factory: proximal trimmed group lasso, R = Σ_layers Σ_{the k smallest c} √n·‖W[c]‖₂, k = round(f·c_out).

    Only each layer's k smallest filters are penalised, so R = 0 exactly when a fraction ``dead_fraction`` of
    every layer's output channels is zero: the regulariser is a channel target, not an ever-growing pressure,
    and the kept filters train unpenalised. The step soft-thresholds the current k smallest rows (by ‖·‖₂);
    a zeroed row gets no gradient through the quantizer (its STE passes sign(w)² = 0), so it stays among them.
    """
    fraction = _check_fraction(dead_fraction)
    _check_include_linear(include_linear)
    exclude = _check_exclude_layers(exclude_layers)

    def step(model: nn.Module, eta: float) -> None:
        for weight in _latent_weights(model, include_linear, exclude):
            smallest = round(fraction * weight.shape[0])
            if smallest:
                _shrink_rows(weight, eta, smallest)

    return Proximal(step)
