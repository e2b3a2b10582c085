"""Model zoo: CIFAR ResNets."""

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

__all__ = ["BasicBlock", "LambdaLayer", "ResNet", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]
