"""CIFAR ResNets: output shapes, parameter counts, MACs, module names."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from codeq.models import LambdaLayer, resnet20, resnet32, resnet44, resnet56, resnet110

# He et al. 2016, Table 6 (CIFAR-10): 0.27M, 0.46M, 0.66M, 0.85M, 1.7M
PARAMS = {resnet20: 269_722, resnet32: 464_154, resnet44: 658_586, resnet56: 853_018, resnet110: 1_727_962}


@pytest.mark.parametrize("factory,params", PARAMS.items(), ids=lambda v: getattr(v, "__name__", str(v)))
def test_parameter_count_and_output_shape(factory, params):
    model = factory()
    assert sum(p.numel() for p in model.parameters()) == params
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_classes_and_channels():
    model = resnet20(num_classes=100, in_channels=1)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 100)
    assert model.conv1.in_channels == 1 and model.linear.out_features == 100


def test_dense_resnet20_macs():
    with FlopCounterMode(display=False) as counter:
        resnet20()(torch.randn(1, 3, 32, 32))
    assert counter.get_total_flops() // 2 == 40_551_040


def test_classic_module_names_and_option_a_shortcut():
    model = resnet20()
    names = dict(model.named_modules())
    for name in ["conv1", "bn1", "layer1.0.conv1", "layer2.2.bn2", "layer3.0.shortcut", "linear"]:
        assert name in names
    assert isinstance(model.layer2[0].shortcut, LambdaLayer)
    assert not list(model.layer2[0].shortcut.parameters())
    x = torch.randn(1, 16, 32, 32)
    padded = model.layer2[0].shortcut(x)
    assert padded.shape == (1, 32, 16, 16)
    assert torch.equal(padded[:, 8:24], x[:, :, ::2, ::2])
    assert padded[:, :8].abs().sum() == 0 and padded[:, 24:].abs().sum() == 0
