"""A multi-layer perceptron over flattened images, for the smallest experiments."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from codeq.errors import ConfigError


class MLP(nn.Sequential):
    """flatten -> (Linear -> ReLU) per hidden size -> Linear classifier; layers ``fc0 … fcN-1`` and ``classifier``."""

    def __init__(self, in_features: int, hidden_sizes: Sequence[int], num_classes: int):
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        width = in_features
        for i, hidden in enumerate(hidden_sizes):
            layers[f"fc{i}"] = nn.Linear(width, hidden)
            layers[f"relu{i}"] = nn.ReLU()
            width = hidden
        layers["classifier"] = nn.Linear(width, num_classes)
        super().__init__(layers)


def mlp(num_classes: int, input_size=(3, 32, 32), hidden_sizes: Sequence[int] = (512, 256)) -> MLP:
    """An MLP for ``input_size`` [C, H, W] images: C·H·W inputs, ``hidden_sizes`` widths, ``num_classes`` outputs."""
    sizes = list(hidden_sizes) if hidden_sizes is not None else None
    if sizes is None or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in sizes):
        raise ConfigError(f"model.hidden_sizes must be a list of integers >= 1, got {hidden_sizes!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"model.num_classes must be an integer >= 1, got {num_classes!r}")
    return MLP(math.prod(input_size), sizes, num_classes)
