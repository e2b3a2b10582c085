"""The layers a model family leaves unquantized by default: its first and last Conv/Linear (the paper's practice)."""

from __future__ import annotations

from torch import nn

from codeq.quant.parametrize import QUANTIZABLE


def first_and_last_layers(model: nn.Module) -> list[str]:
    """Names of the first and the last Conv/Linear module in registration order: the stem and the classifier.

    For the families codeq builds (CIFAR ResNets, torchvision and timm CNNs and ViTs, the MLP) registration order is
    execution order, so these are the input layer and the classifier head.
    """
    layers = [name for name, module in model.named_modules() if isinstance(module, QUANTIZABLE)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Conv/Linear layer")
    return sorted({layers[0], layers[-1]}, key=layers.index)
