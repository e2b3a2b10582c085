"""Optimizers and LR schedules over three parameter groups: weights, dead-zone logits, bit logits.

Each quantizer names the group of each of its parameters (``param_groups()``, see codeq.quant.base);
every other parameter is a weight. An optimizer factory takes the model (Hydra ``_partial_``) and
gives each group its own learning rate and weight decay; an LR-scheduler factory takes the optimizer
and is stepped once per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from codeq.errors import ConfigError
from codeq.quant import quantized_layers
from codeq.schema import allowed, configured_by

QUANTIZER_GROUPS = ("deadzone", "bits")


def parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """{"weights", "deadzone", "bits"} -> parameters. Frozen quantizer parameters (requires_grad=False) are left out."""
    groups: dict[str, list[nn.Parameter]] = {"weights": [], **{name: [] for name in QUANTIZER_GROUPS}}
    claimed: set[int] = set()
    for layer, _, fq in quantized_layers(model):
        own = list(fq.quantizer.parameters())
        named = fq.quantizer.param_groups() if hasattr(fq.quantizer, "param_groups") else {}
        unknown = set(named) - set(QUANTIZER_GROUPS)
        if unknown:
            raise ValueError(f"{layer}: quantizer groups must be among {QUANTIZER_GROUPS}, got {sorted(unknown)}")
        listed = {id(p) for params in named.values() for p in params}
        if {id(p) for p in own} - listed:
            raise TypeError(
                f"{type(fq.quantizer).__name__} has parameters that its param_groups() does not name "
                f"(each must be in one of {QUANTIZER_GROUPS})"
            )
        for name, params in named.items():
            groups[name] += [p for p in params if p.requires_grad and id(p) not in claimed]
        claimed |= listed
    groups["weights"] = [p for p in model.parameters() if id(p) not in claimed]
    return groups


def _check_settings(settings: dict[str, float]) -> None:
    for key, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ConfigError(f"optimizer.{key} must be a finite number >= 0, got {value!r}")


def _groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    lr_dz: float,
    weight_decay_dz: float,
    lr_bit: float,
    weight_decay_bit: float,
) -> list[dict]:
    """The optimizer's param_groups, each with its lr and weight_decay; empty groups are left out."""
    _check_settings(
        {
            "lr": lr,
            "weight_decay": weight_decay,
            "lr_dz": lr_dz,
            "weight_decay_dz": weight_decay_dz,
            "lr_bit": lr_bit,
            "weight_decay_bit": weight_decay_bit,
        }
    )
    params = parameter_groups(model)
    settings = {"weights": (lr, weight_decay), "deadzone": (lr_dz, weight_decay_dz), "bits": (lr_bit, weight_decay_bit)}
    return [
        {"name": name, "params": params[name], "lr": group_lr, "weight_decay": decay}
        for name, (group_lr, decay) in settings.items()
        if params[name]
    ]


@dataclass
class OptimizerKeys:
    """The keys every optimizer option has: a learning rate and a weight decay per parameter group."""

    lr: float = allowed(minimum=0)
    weight_decay: float = allowed(minimum=0)
    lr_dz: float = allowed(minimum=0)
    weight_decay_dz: float = allowed(minimum=0)
    lr_bit: float = allowed(minimum=0)
    weight_decay_bit: float = allowed(minimum=0)


@dataclass
class AdamWKeys(OptimizerKeys):
    betas: list[float] = allowed(minimum=0, below=1, length=2)


@dataclass
class SgdKeys(OptimizerKeys):
    momentum: float = allowed(minimum=0)
    nesterov: bool = False


@configured_by(AdamWKeys)
def adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    lr_dz: float,
    weight_decay_dz: float,
    lr_bit: float,
    weight_decay_bit: float,
    betas: Iterable[float] = (0.9, 0.999),
) -> torch.optim.AdamW:
    """AdamW over weights (lr, weight_decay), dead-zone logits (lr_dz, …) and bit logits (lr_bit, …)."""
    betas = tuple(float(b) for b in betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), got {list(betas)}")
    groups = _groups(model, lr, weight_decay, lr_dz, weight_decay_dz, lr_bit, weight_decay_bit)
    # fused: one kernel per parameter instead of ~10 (CPU and CUDA), 3-4x cheaper on ResNet-20's 95 tensors
    return torch.optim.AdamW(groups, betas=betas, fused=True)


@configured_by(SgdKeys)
def sgd(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    lr_dz: float,
    weight_decay_dz: float,
    lr_bit: float,
    weight_decay_bit: float,
    momentum: float = 0.9,
    nesterov: bool = True,
) -> torch.optim.SGD:
    """SGD with (Nesterov) momentum over the same three groups and their learning rates and decays."""
    _check_settings({"momentum": momentum})
    groups = _groups(model, lr, weight_decay, lr_dz, weight_decay_dz, lr_bit, weight_decay_bit)
    return torch.optim.SGD(groups, momentum=momentum, nesterov=bool(nesterov))


def cosine_warmup(
    optimizer: torch.optim.Optimizer, warmup_epochs: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine to 0: factor (e+1)/(W+1) for e < W, then ½(1 + cos(π(e − W)/(E − W)))."""
    if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or not 0 <= warmup_epochs < epochs:
        raise ConfigError(f"lr_scheduler.warmup_epochs must be an integer in [0, {epochs}), got {warmup_epochs!r}")

    def factor(epoch: int) -> float:
        if epoch < warmup_epochs:
            return (epoch + 1) / (warmup_epochs + 1)
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
