"""CoDeQ quantizers against an independent implementation of the paper's equations."""

import logging

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode

from codeq.models import resnet20
from codeq.optim import parameter_groups
from codeq.quant import (
    DeadZoneLDZCompander,
    FakeQuantParametrization,
    StackedFakeQuant,
    UniformSymmetric,
    WeightQuantizer,
    attach_weight_quantizers,
    quantized_layers,
    toggle_quantization,
)
from codeq.quant import quantizer as quantizer_module
from codeq.quant.quantizer import _quantile_of_rows


class _IdentityBackward(torch.autograd.Function):
    """fn(x) forward, identity backward (to x only)."""

    @staticmethod
    def forward(ctx, x, fn):
        return fn(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def reference_deadzone(w, logit_dz, logit_bit, learned_bits=True, fixed_bits=4, max_bits=8):
    """The paper's equations, written independently of codeq.quant."""
    absmax = torch.quantile(w.detach().abs().flatten(), 0.99)
    if learned_bits:
        b_cont = torch.tanh(logit_bit).abs() * (max_bits - 2) + 2
        b = _IdentityBackward.apply(b_cont, torch.round)
    else:
        b = torch.tensor(float(fixed_bits))
    q = 2 ** (b - 1) - 1
    d = 2 * absmax * (1 - torch.tanh(logit_dz).abs())
    s = (absmax - d / 2) / (q - 0.5) + 1e-8
    delta = d / 2 - s / 2
    mag = _IdentityBackward.apply(w.abs() - delta, torch.relu)
    scaled = _IdentityBackward.apply(torch.sign(w) * mag / s, torch.round)
    qd = q.detach()
    w_bar = _IdentityBackward.apply(scaled, lambda t: torch.clamp(t, -qd, qd))
    return s * w_bar + delta * torch.sign(w_bar)


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (10, 64), (7,)])
@pytest.mark.parametrize("logit_dz,logit_bit", [(3.0, 3.0), (0.4, 0.4), (1.0, -0.2), (0.05, 0.9)])
@pytest.mark.parametrize("learned_bits", [True, False])
def test_deadzone_matches_reference_values_and_gradients(shape, logit_dz, logit_bit, learned_bits):
    torch.manual_seed(0)
    w0 = torch.randn(shape)
    quant = DeadZoneLDZCompander(init_deadzone_logit=logit_dz, init_bit_logit=logit_bit, learnable_bit=learned_bits)
    w = w0.clone().requires_grad_()
    out = quant(w)
    upstream = torch.randn(shape)
    (out * upstream).sum().backward()

    w_ref = w0.clone().requires_grad_()
    dz_ref = torch.tensor(logit_dz, requires_grad=True)
    bit_ref = torch.tensor(logit_bit, requires_grad=True)
    ref = reference_deadzone(w_ref, dz_ref, bit_ref, learned_bits=learned_bits)
    (ref * upstream).sum().backward()

    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(quant.logit_dz.grad, dz_ref.grad, rtol=1e-3, atol=1e-5)
    if learned_bits:
        torch.testing.assert_close(quant.logit_bit.grad, bit_ref.grad, rtol=1e-3, atol=1e-5)
    else:
        assert quant.logit_bit.grad is None


@pytest.mark.parametrize("logit_dz", [3.0, 1.0, 0.3, 0.0])
@pytest.mark.parametrize("logit_bit", [3.0, 0.4, 0.0])
def test_dead_zone_is_magnitude_pruning_with_few_levels(logit_dz, logit_bit):
    torch.manual_seed(1)
    w = torch.randn(32, 16, 3, 3)
    quant = DeadZoneLDZCompander(init_deadzone_logit=logit_dz, init_bit_logit=logit_bit)
    with torch.no_grad():
        out = quant(w)
        d = quant.get_deadzone_width(w)
        b = int(quant.get_bitwidth())
    assert torch.all(out[w.abs() <= d / 2] == 0)
    assert len(out[out != 0].abs().unique()) <= 2 ** (b - 1) - 1


def test_bitwidth_is_integral_and_in_range():
    for logit in torch.linspace(-4, 4, 41):
        b = DeadZoneLDZCompander(init_bit_logit=float(logit), max_bits=8).get_bitwidth()
        assert b.device.type == "cpu"
        assert b == torch.round(b) and 2 <= b <= 8
    assert DeadZoneLDZCompander(init_bit_logit=0.4).get_bitwidth() == 4  # tanh(0.4)*6+2 = 4.28
    assert DeadZoneLDZCompander(learnable_bit=False, fixed_bit_val=3).get_bitwidth() == 3


def test_deadzone_width_by_hand():
    """absmax = 0.99-quantile of |w| = 99.01 for w = 1..100; d = 2·absmax·(1 − tanh θ)."""
    w = torch.arange(1.0, 101.0)
    quant = DeadZoneLDZCompander(init_deadzone_logit=0.5)
    expected = 2 * 99.01 * (1 - torch.tanh(torch.tensor(0.5)))
    torch.testing.assert_close(quant.get_deadzone_width(w), expected)


def test_fully_pruned_layer_stays_finite():
    quant = DeadZoneLDZCompander(init_deadzone_logit=0.0)  # d = 2·absmax: everything in the dead zone
    w = torch.randn(8, 8, requires_grad=True)
    out = quant(w)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(w.grad).all()


def test_uniform_symmetric_by_hand():
    """2 bits: Q = 1, s = max|w| = 2; w/s = [-1, -0.2, 0.3, 1] rounds to [-1, 0, 0, 1]."""
    w = torch.tensor([-2.0, -0.4, 0.6, 2.0], requires_grad=True)
    quant = UniformSymmetric(bitwidth=2)
    out = quant(w)
    torch.testing.assert_close(out, torch.tensor([-2.0, 0.0, 0.0, 2.0]))
    out.sum().backward()
    torch.testing.assert_close(w.grad, torch.ones(4))
    assert quant.get_bitwidth() == 2
    assert len(UniformSymmetric(8)(torch.randn(1000)).unique()) <= 255


def test_paper_exclusion_list_quantizes_the_18_block_convs(caplog):
    model = resnet20()
    with caplog.at_level(logging.WARNING):
        names = attach_weight_quantizers(model, ["conv1", "bn", "linear"], DeadZoneLDZCompander, {})
    assert len(names) == 18
    assert all(n.startswith(("layer1.", "layer2.", "layer3.")) for n in names)
    assert "layer1.0.conv1" in names and "conv1" not in names and "linear" not in names
    assert "'bn' matches no module" in caplog.text


def test_glob_exclusion_and_unmatched_warning(caplog):
    model = resnet20()
    with caplog.at_level(logging.WARNING):
        names = attach_weight_quantizers(model, ["layer3.*", "nothing_here"], DeadZoneLDZCompander, {})
    assert not any(n.startswith("layer3.") for n in names)
    assert "conv1" in names and "linear" in names and len(names) == 1 + 12 + 1
    assert "'nothing_here' matches no module" in caplog.text


def test_only_conv_and_linear_get_quantizers():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 3))
    assert attach_weight_quantizers(model, [], UniformSymmetric, {"bitwidth": 4}) == ["0", "3"]
    assert not hasattr(model[1], "parametrizations")


def test_toggle_gives_back_latent_weight_exactly():
    model = resnet20()
    latent = model.layer1[0].conv1.weight.detach().clone()
    attach_weight_quantizers(model, ["conv1", "linear"], DeadZoneLDZCompander, {"init_bit_logit": 0.2})
    conv = model.layer1[0].conv1
    assert not torch.equal(conv.weight, latent)
    toggle_quantization(model, False)
    assert torch.equal(conv.weight, latent)
    assert all(not fq.enabled for _, _, fq in quantized_layers(model))
    toggle_quantization(model, True)
    assert not torch.equal(conv.weight, latent)


def test_parameter_groups():
    model = resnet20()
    attach_weight_quantizers(model, ["conv1", "linear"], DeadZoneLDZCompander, {}, enabled=False)
    groups = parameter_groups(model)
    weights, dz, bit = groups["weights"], groups["deadzone"], groups["bits"]
    assert len(dz) == len(bit) == 18
    assert sum(p.numel() for p in weights) == 269_722
    assert isinstance(model.layer2[0].conv2.parametrizations.weight[0], FakeQuantParametrization)


def test_model_trains_through_quantizers():
    torch.manual_seed(0)
    model = resnet20()
    attach_weight_quantizers(model, ["conv1", "linear"], DeadZoneLDZCompander, {})
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    conv = model.layer1[0].conv1
    assert conv.parametrizations.weight.original.grad is not None
    assert conv.parametrizations.weight[0].quantizer.logit_dz.grad is not None
    assert conv.parametrizations.weight[0].quantizer.logit_bit.grad is not None


@pytest.mark.parametrize("n", [7, 100, 8191, 8192, 36864, 36867, 100_003])
@pytest.mark.parametrize("kind", ["normal", "ties", "mostly zeros", "sorted"])
def test_quantile_of_rows_is_torch_quantile(n, kind, monkeypatch):
    """Long rows (n >= 8192) take the chunk pre-selection; it must not change a single bit."""
    torch.manual_seed(n)
    rows = torch.randn(3, n).abs()
    if kind == "ties":
        rows = torch.randint(0, 4, (3, n)).float()
    elif kind == "mostly zeros":
        rows[:, 5:] = 0
    elif kind == "sorted":
        rows = rows.sort(dim=1).values
    quantile = _quantile_of_rows(rows)
    torch.testing.assert_close(quantile, torch.quantile(rows, 0.99, dim=1), rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(quantizer_module, "_PRESELECT_FROM", 10**12)  # every row by one full top-k
    assert torch.equal(quantile, _quantile_of_rows(rows))


def _stack_case(learned_bits=True):
    """Seven layers in three shapes with different logits each, as three stacks in row order."""
    torch.manual_seed(3)
    shapes = [(16, 8, 3, 3)] * 3 + [(10, 64)] * 2 + [(128, 64, 3, 3)] * 2  # the last: 73,728 (pre-selected)
    weights = [torch.randn(shape) * (i + 1) for i, shape in enumerate(shapes)]
    logits = [(0.2 + 0.4 * i, 2.5 - 0.35 * i) for i in range(len(shapes))]
    quantizers = [
        DeadZoneLDZCompander(init_deadzone_logit=dz, init_bit_logit=bit, learnable_bit=learned_bits)
        for dz, bit in logits
    ]
    return weights, logits, quantizers


@pytest.mark.parametrize("learned_bits", [True, False])
def test_stacked_quantization_matches_the_reference_layer_by_layer(learned_bits):
    weights, logits, quantizers = _stack_case(learned_bits)
    latents = [w.clone().requires_grad_() for w in weights]
    stacks = [torch.stack(latents[0:3]), torch.stack(latents[3:5]), torch.stack(latents[5:7])]
    outs = DeadZoneLDZCompander.quantize_stacked(quantizers, stacks)
    rows = [row for out in outs for row in out.unbind(0)]
    upstream = [torch.randn(w.shape) for w in weights]
    sum((row * g).sum() for row, g in zip(rows, upstream)).backward()

    for i, (w0, (dz, bit), g) in enumerate(zip(weights, logits, upstream)):
        w_ref = w0.clone().requires_grad_()
        dz_ref = torch.tensor(dz, requires_grad=True)
        bit_ref = torch.tensor(bit, requires_grad=True)
        ref = reference_deadzone(w_ref, dz_ref, bit_ref, learned_bits=learned_bits)
        (ref * g).sum().backward()
        torch.testing.assert_close(rows[i], ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(latents[i].grad, w_ref.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(quantizers[i].logit_dz.grad, dz_ref.grad, rtol=1e-3, atol=1e-5)
        if learned_bits:
            torch.testing.assert_close(quantizers[i].logit_bit.grad, bit_ref.grad, rtol=1e-3, atol=1e-5)
        else:
            assert quantizers[i].logit_bit.grad is None


def test_stacked_quantization_equals_one_layer_at_a_time_exactly():
    weights, _, quantizers = _stack_case()
    stacks = [torch.stack(weights[0:3]), torch.stack(weights[3:5]), torch.stack(weights[5:7])]
    with torch.no_grad():
        rows = [row for out in DeadZoneLDZCompander.quantize_stacked(quantizers, stacks) for row in out]
        for row, quantizer, w in zip(rows, quantizers, weights):
            assert torch.equal(row, quantizer(w))


def _mixed_model():
    """ResNet-20 with three kinds of quantized layers: learned bits (layer1, layer3.1-2), fixed 3 bits (layer2),
    uniform 4 bits (layer3.0)."""
    torch.manual_seed(0)
    model = resnet20()
    attach_weight_quantizers(
        model,
        ["conv1", "linear", "layer2.*", "layer3.0.*"],
        DeadZoneLDZCompander,
        {"init_bit_logit": 0.5, "init_deadzone_logit": 1.0},
    )
    attach_weight_quantizers(
        model,
        ["conv1", "linear", "layer1.*", "layer3.*"],
        DeadZoneLDZCompander,
        {"learnable_bit": False, "fixed_bit_val": 3},
    )
    attach_weight_quantizers(
        model,
        ["conv1", "linear", "layer1.*", "layer2.*", "layer3.1.*", "layer3.2.*"],
        UniformSymmetric,
        {"bitwidth": 4},
    )
    for i, (_, _, fq) in enumerate(quantized_layers(model)):
        if isinstance(fq.quantizer, DeadZoneLDZCompander):
            fq.quantizer.logit_dz.data.fill_(0.3 + 0.1 * i)
    return model


def _step_grads(model, context):
    model.zero_grad(set_to_none=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with context():
        weights = {name: module.weight.detach().clone() for name, module, _ in quantized_layers(model)}
        loss = model(x).square().mean() + sum(module.weight.abs().sum() for _, module, _ in quantized_layers(model))
    loss.backward()
    return weights, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_stacked_fake_quant_gives_the_weights_and_gradients_of_parametrize_cached(caplog):
    model = _mixed_model()
    model.train()
    stacked = StackedFakeQuant(model)
    toggle_quantization(model, True)
    model.layer1[1].conv2.parametrizations.weight[0].enabled = False  # a disabled layer keeps its latent weight
    weights, grads = _step_grads(model, stacked.cached)
    ref_weights, ref_grads = _step_grads(model, parametrize.cached)
    assert weights.keys() == ref_weights.keys() and len(weights) == 18
    for name in weights:
        torch.testing.assert_close(weights[name], ref_weights[name], rtol=0, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6)
    assert torch.equal(weights["layer1.1.conv2"], model.layer1[1].conv2.parametrizations.weight.original)
    assert all(fq.precomputed is None for _, _, fq in quantized_layers(model))


def test_stacked_fake_quant_quantizes_once_per_kind_and_forgets_on_exit():
    model = _mixed_model()
    stacked = StackedFakeQuant(model)
    calls = []
    original = DeadZoneLDZCompander.quantize_stacked.__func__

    def counting(cls, quantizers, stacks):
        calls.append(([tuple(s.shape) for s in stacks], quantizers[0].learnable_bit))
        return original(cls, quantizers, stacks)

    DeadZoneLDZCompander.quantize_stacked = classmethod(counting)
    try:
        with pytest.raises(RuntimeError, match="boom"), stacked.cached():
            model(torch.randn(1, 3, 32, 32))
            raise RuntimeError("boom")
    finally:
        DeadZoneLDZCompander.quantize_stacked = classmethod(original)
    # one call per kind: learned bits (layer1 and layer3.1-2: 2 shapes), fixed bits (layer2: 2 shapes), stacks
    # in model order; layer3.0's uniform quantizers are not stackable and run one by one
    assert sorted(calls, key=lambda c: c[1]) == [
        ([(1, 32, 16, 3, 3), (5, 32, 32, 3, 3)], False),
        ([(6, 16, 16, 3, 3), (4, 64, 64, 3, 3)], True),
    ]
    assert all(fq.precomputed is None for _, _, fq in quantized_layers(model))


def test_stacked_fake_quant_handles_channels_last_weights():
    model = _mixed_model().to(memory_format=torch.channels_last)
    with torch.no_grad():
        with StackedFakeQuant(model).cached():
            stacked = {name: module.weight.clone() for name, module, _ in quantized_layers(model)}
        with parametrize.cached():
            for name, module, _ in quantized_layers(model):
                assert torch.equal(stacked[name], module.weight)


def test_frozen_weights_still_train_the_logits():
    quantizer = DeadZoneLDZCompander(init_deadzone_logit=0.5, init_bit_logit=0.3)
    quantizer(torch.randn(8, 8, 3, 3)).square().sum().backward()
    assert torch.isfinite(quantizer.logit_dz.grad) and quantizer.logit_dz.grad != 0
    assert torch.isfinite(quantizer.logit_bit.grad)


class _CountOps(TorchDispatchMode):
    """Counts the aten ops that compute (kernels on a GPU; views are free) dispatched while active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def _ops_for_one_step(layers_per_shape, shapes=((16, 16, 3, 3), (32, 16, 3, 3))):
    """Aten ops of forward + backward of ``layers_per_shape`` layers of each shape, quantized stacked."""
    quantizers = [DeadZoneLDZCompander() for _ in range(layers_per_shape * len(shapes))]
    weights = [torch.randn(shape, requires_grad=True) for shape in shapes for _ in range(layers_per_shape)]
    with _CountOps() as counter:
        stacks = [torch.stack(weights[i * layers_per_shape : (i + 1) * layers_per_shape]) for i in range(len(shapes))]
        outs = DeadZoneLDZCompander.quantize_stacked(quantizers, stacks)
        torch.stack([out.sum() for out in outs]).sum().backward()
    return counter.count


def test_stacked_quantization_costs_the_same_ops_for_more_layers_of_a_shape():
    """The point of stacking: the op (kernel) count grows with the number of shapes, not of layers."""
    assert _ops_for_one_step(12) == _ops_for_one_step(2)
    with _CountOps() as one_by_one:
        for _ in range(12):
            DeadZoneLDZCompander()(torch.randn(16, 16, 3, 3, requires_grad=True)).sum().backward()
    assert one_by_one.count > 6 * _ops_for_one_step(12, shapes=((16, 16, 3, 3),))


# ----------------------------------------------------------------------------- fused vs plain, the contract


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (10, 64)])
@pytest.mark.parametrize("logit_dz,logit_bit", [(3.0, 3.0), (0.4, 0.4), (1.0, -0.2)])
@pytest.mark.parametrize("learned_bits", [True, False])
def test_fused_and_plain_deadzone_agree_in_values_and_gradients(shape, logit_dz, logit_bit, learned_bits):
    torch.manual_seed(0)
    w0, upstream = torch.randn(shape), torch.randn(shape)
    results = []
    for fused in (True, False):
        quant = DeadZoneLDZCompander(
            init_deadzone_logit=logit_dz, init_bit_logit=logit_bit, learnable_bit=learned_bits, fused=fused
        )
        w = w0.clone().requires_grad_()
        out = quant(w)
        (out * upstream).sum().backward()
        results.append((out.detach(), w.grad, quant.logit_dz.grad, quant.logit_bit.grad))
    (fused_out, fused_w, fused_dz, fused_bit), (plain_out, plain_w, plain_dz, plain_bit) = results
    torch.testing.assert_close(fused_out, plain_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_w, plain_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_dz, plain_dz, rtol=1e-3, atol=1e-5)
    if learned_bits:
        torch.testing.assert_close(fused_bit, plain_bit, rtol=1e-3, atol=1e-5)
    else:
        assert fused_bit is None and plain_bit is None


def test_plain_deadzone_is_not_stacked_and_trains_the_same_step():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    grads = []
    for fused in (True, False):
        torch.manual_seed(1)
        model = resnet20()
        attach_weight_quantizers(model, ["conv1", "linear"], DeadZoneLDZCompander, {"fused": fused})
        with StackedFakeQuant(model).cached():
            model(x).square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    assert DeadZoneLDZCompander(fused=False).stack_key() is None
    for fused_grad, plain_grad in zip(*grads):
        torch.testing.assert_close(fused_grad, plain_grad, rtol=1e-4, atol=1e-6)


class HalvingQuantizer(WeightQuantizer):
    """A toy quantizer through the documented interface only: ŵ = sign(w)·α·|w|/2 with a learned gain α."""

    def __init__(self, bits: int = 3):
        super().__init__()
        self.bits = bits
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, w):
        return self.gain * w / 2

    def get_bitwidth(self):
        return torch.tensor(float(self.bits))

    def param_groups(self):
        return {"bits": [self.gain]}


def test_a_new_quantizer_through_the_documented_interface(tmp_path):
    from codeq.cost import Evaluator

    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    evaluator = Evaluator(model, input_size=(3, 8, 8))
    assert attach_weight_quantizers(model, ["2"], HalvingQuantizer, {"bits": 3}) == ["0"]
    latent = model[0].parametrizations.weight.original
    torch.testing.assert_close(model[0].weight, latent / 2)
    groups = parameter_groups(model)
    assert [len(groups[name]) for name in ("weights", "deadzone", "bits")] == [3, 0, 1]
    result = evaluator.evaluate(model)
    conv = result.structured_stats.by_name()["0"]
    assert conv.bitwidth == 3 and conv.bops == conv.macs * 3 * 32
    with pytest.raises(TypeError, match="abstract"):
        type("Incomplete", (WeightQuantizer,), {"forward": lambda self, w: w})()
