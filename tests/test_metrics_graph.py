"""Structured counting through whole graphs: hand-computed toy residual nets, a measurement oracle on
real architectures, the dense ResNet-20 count against FlopCounterMode, and the per-model trace cache."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from codeq.cost import liveness
from codeq.metrics import NullChannels, QuantizationComparison
from codeq.models import BasicBlock, resnet20, resnet56
from codeq.quant import DeadZoneLDZCompander, attach_weight_quantizers


def _ones(model):
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.ones_(m.weight)
    return model


def _stats(model, input_size):
    qc = QuantizationComparison(input_size=input_size)
    qc.set_baseline(model)
    return qc, qc.calculate_stats(model)


class ToyResidual(nn.Module):
    """stem 3x3 (2->4), branch 3x3 (4->4), out = relu(branch(relu(stem)) + stem), head 1x1 (4->2); 4x4 input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.branch = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.head = nn.Conv2d(4, 2, 1, bias=False)

    def forward(self, x):
        s = self.stem(x)
        return self.head(F.relu(self.branch(F.relu(s)) + s))


def test_scattered_89_percent_zeros_are_invisible_to_structured_counting():
    """Only the centre tap of every 3x3 kernel survives (8/9 = 89 % zeros); the 1x1 head stays dense.

    Structured = dense: 2·4·9·16 + 4·4·9·16 + 4·2·16 = 1152 + 2304 + 128 = 3584.
    Unstructured: 8·16 + 16·16 + 8·16 = 512 -> ratio 7.
    """
    model = _ones(ToyResidual())
    with torch.no_grad():
        for conv in (model.stem, model.branch):
            centre = conv.weight[:, :, 1, 1].clone()
            conv.weight.zero_()
            conv.weight[:, :, 1, 1] = centre
    qc, stats = _stats(model, (2, 4, 4))
    assert stats.total_macs == 3584
    assert qc.mac_compression_ratio(stats) == 1.0
    unstructured = qc.calculate_unstructured_stats(model)
    assert unstructured.total_macs == 512
    assert qc.unstructured_mac_compression_ratio(unstructured) == 7.0


def test_dead_branch_channel_is_restored_by_identity_shortcut():
    """Branch filter 1 dead: branch 4·3·9·16 = 1728, but the add revives channel 1, so the head is dense.

    Total 1152 + 1728 + 128 = 3008.
    """
    model = _ones(ToyResidual())
    with torch.no_grad():
        model.branch.weight[1] = 0.0
    _, stats = _stats(model, (2, 4, 4))
    layers = stats.by_name()
    assert layers["branch"].null_out == NullChannels({1}, 4)
    assert layers["head"].null_in == NullChannels.none(4)
    assert stats.total_macs == 3008


def test_channel_dead_on_both_residual_paths_stays_dead():
    """Stem and branch filter 1 dead: stem 2·3·9·16 = 864, branch 3·3·9·16 = 1296, head 3·2·16 = 96."""
    model = _ones(ToyResidual())
    with torch.no_grad():
        model.stem.weight[1] = 0.0
        model.branch.weight[1] = 0.0
    _, stats = _stats(model, (2, 4, 4))
    layers = stats.by_name()
    assert layers["branch"].null_in == NullChannels({1}, 4)
    assert layers["head"].null_in == NullChannels({1}, 4)
    assert stats.total_macs == 864 + 1296 + 96


class ToyOptionA(nn.Module):
    """stem 3x3 (2->2) on 4x4, codeq BasicBlock(2 -> 4, stride 2) with the option-A pad shortcut, head 1x1."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.block = BasicBlock(2, 4, stride=2)
        self.head = nn.Conv2d(4, 2, 1, bias=False)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def test_option_a_padding_channels_are_null_and_others_inherit_the_block_input():
    """Shortcut channels = [pad, x0, x1, pad] (pad 1 each side). Stem filter 0 dead (x0 null); conv2
    filters 0 and 1 dead. After the add: ch0 = pad & dead -> null, ch1 = x0 & dead -> null, ch2 live,
    ch3 = pad but conv2 live -> live.

    stem 2·1·9·16 = 288; conv1 (2x2 out) 1·4·9·4 = 144; conv2 4·2·9·4 = 288; head 2·2·1·4 = 16.
    """
    model = _ones(ToyOptionA())
    with torch.no_grad():
        model.stem.weight[0] = 0.0
        model.block.conv2.weight[:2] = 0.0
    _, stats = _stats(model, (2, 4, 4))
    layers = stats.by_name()
    assert layers["block.conv1"].null_in == NullChannels({0}, 2)
    assert layers["block.conv2"].null_out == NullChannels({0, 1}, 4)
    assert layers["head"].null_in == NullChannels({0, 1}, 4)
    assert stats.total_macs == 288 + 144 + 288 + 16


class FlattenCNN(nn.Module):
    """conv-BN-ReLU-maxpool, conv-ReLU, flatten, linear-ReLU-dropout-linear on 3x8x8."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 4, 3, padding=1, bias=False),
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def test_flatten_maps_a_dead_channel_to_its_features():
    """Conv filter 1 dead -> features 16..31 of the flattened 4x4x4 map are null: linear 48·16 = 768."""
    model = FlattenCNN()
    with torch.no_grad():
        model.features[4].weight[1] = 0.0
    _, stats = _stats(model, (3, 8, 8))
    linear = stats.by_name()["classifier.1"]
    assert linear.null_in == NullChannels(set(range(16, 32)), 64)
    assert linear.macs == 48 * 16


def test_dense_resnet20_matches_flop_counter():
    """40,551,040 MACs = FlopCounterMode's FLOPs / 2 on a 3x32x32 input."""
    model = resnet20()
    _, stats = _stats(model, (3, 32, 32))
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 32, 32))
    assert stats.total_macs == 40_551_040
    assert counter.get_total_flops() == 2 * 40_551_040


# ----------------------------------------------------------------------------- measurement oracle


def _make_measurable(model, generator, zero_channels, zero_layers):
    """BatchNorm = exact identity, every weight and bias >= 0 (each filter summing to 1, so deep nets do
    not overflow); then zero random filters, input slices and whole layers. With no negative numbers no
    sum can cancel, so an activation is zero on a real forward pass exactly when no live path reaches it."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                m.weight.fill_(1.0)
                m.bias.zero_()
                m.eps = 0.0
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.abs_()
                m.weight /= m.weight.flatten(1).sum(1).view(-1, *[1] * (m.weight.dim() - 1))
                if m.bias is not None:
                    m.bias.copy_(m.bias.abs() * (torch.rand(m.bias.shape, generator=generator) < 0.3))
        for m in layers:
            out_dead = torch.rand(m.weight.shape[0], generator=generator) < zero_channels
            in_dead = torch.rand(m.weight.shape[1], generator=generator) < zero_channels / 2
            m.weight[out_dead] = 0.0
            m.weight[:, in_dead] = 0.0
        for index in torch.randperm(len(layers), generator=generator)[:zero_layers].tolist():
            layers[index].weight.zero_()
    model.eval()
    return model


def _measured_null_channels(model, input_size):
    """Per layer: (input channels, output channels) that are zero everywhere on a real forward pass."""
    seen = {}

    def record(name, dim):
        def hook(module, inputs, output):
            def dead(t):
                live = t.movedim(dim, 0).reshape(t.shape[dim], -1).ne(0).any(1)
                return frozenset((~live).nonzero().flatten().tolist())

            seen[name] = (dead(inputs[0]), dead(output))

        return hook

    handles = [
        m.register_forward_hook(record(n, -1 if isinstance(m, nn.Linear) else 1))
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad():
        model(torch.rand(2, *input_size) + 0.1)
    for handle in handles:
        handle.remove()
    return seen


ORACLE_MODELS = {
    "resnet20": (lambda: resnet20(), (3, 32, 32)),
    "resnet56": (lambda: resnet56(), (3, 8, 8)),
    "torchvision_resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 16, 16)),
    "flatten_cnn": (FlattenCNN, (3, 8, 8)),
}


@pytest.mark.parametrize("name", sorted(ORACLE_MODELS))
@pytest.mark.parametrize("zero_channels, zero_layers, seed", [(0.5, 0, 0), (0.3, 2, 1), (0.6, 1, 2)])
def test_reported_null_channels_are_exactly_the_measured_zero_activations(name, zero_channels, zero_layers, seed):
    build, input_size = ORACLE_MODELS[name]
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _make_measurable(build(), generator, zero_channels, zero_layers)
    _, stats = _stats(model, input_size)
    measured = _measured_null_channels(model, input_size)
    assert set(measured) == {layer.name for layer in stats.layers}
    for layer in stats.layers:
        assert (layer.null_in.indices, layer.null_out.indices) == measured[layer.name], layer.name
    assert sum(layer.null_in.count for layer in stats.layers) > 0


# ----------------------------------------------------------------------------- trace cache


def test_trace_runs_once_per_model_across_evaluations_and_quantizer_attachment(monkeypatch):
    """The baseline object is later parametrized: same layer names/shapes, so no new trace."""
    calls = []
    real_trace = liveness.trace_model
    monkeypatch.setattr(liveness, "trace_model", lambda *a: calls.append(1) or real_trace(*a))
    model = resnet20()
    qc = QuantizationComparison(input_size=(3, 8, 8))
    baseline = qc.set_baseline(model)
    attach_weight_quantizers(model, ["conv1", "linear"], DeadZoneLDZCompander)
    for _ in range(2):
        stats = qc.calculate_stats(model)
        qc.calculate_unstructured_stats(model)
    assert len(calls) == 1
    assert stats.total_macs == baseline.total_macs


def test_trace_is_redone_when_a_layer_changes(monkeypatch):
    calls = []
    real_trace = liveness.trace_model
    monkeypatch.setattr(liveness, "trace_model", lambda *a: calls.append(1) or real_trace(*a))
    model = _ones(ToyResidual())
    qc = QuantizationComparison(input_size=(2, 4, 4))
    qc.set_baseline(model)
    model.head = nn.Conv2d(4, 3, 1, bias=False)
    with pytest.raises(ValueError, match=r"changed \['head'\]"):
        qc.mac_compression_ratio(qc.calculate_stats(model))
    assert len(calls) == 2


def test_counting_leaves_training_mode_and_batchnorm_statistics_untouched():
    model = resnet20().train()
    before = model.bn1.running_mean.clone()
    qc = QuantizationComparison(input_size=(3, 32, 32))
    qc.set_baseline(model)
    qc.calculate_stats(model)
    assert model.training and model.layer1[0].bn1.training
    assert torch.equal(model.bn1.running_mean, before)


def test_stochastic_depth_passes_null_channels_like_dropout(caplog):
    """torchvision's stochastic_depth (EfficientNet) drops whole samples: a null channel stays null."""
    from torchvision.ops import stochastic_depth

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 4, 1, bias=False)
            self.b = nn.Conv2d(4, 2, 1, bias=False)

        def forward(self, x):
            return self.b(stochastic_depth(self.a(x), 0.2, "row", self.training))

    model = _ones(Net())
    with torch.no_grad():
        model.a.weight[3] = 0.0
    _, stats = _stats(model, (2, 4, 4))
    assert stats.by_name()["b"].null_in == NullChannels({3}, 4)
    assert not caplog.records
