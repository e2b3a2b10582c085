"""Model zoo: CIFAR ResNets, torchvision and timm models by name, an MLP."""

from codeq.models.adapters import timm_model, torchvision_model
from codeq.models.exclusions import first_and_last_layers
from codeq.models.mlp import MLP, mlp
from codeq.models.resnet import (
    BasicBlock,
    LambdaLayer,
    ResNet,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
)

__all__ = [
    "BasicBlock",
    "LambdaLayer",
    "MLP",
    "ResNet",
    "first_and_last_layers",
    "mlp",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "timm_model",
    "torchvision_model",
]
