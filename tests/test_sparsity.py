"""Tests for structured sparsity loss functions."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.nn.utils import parametrize
from toy_models import TinyConvNet

from codeq.errors import ConfigError
from codeq.models import resnet20
from codeq.quant import DeadZoneLDZCompander, attach_weight_quantizers, quantized_layers
from codeq.schema import check_values, schema_of
from codeq.sparsity import (
    group_lasso_blocks,
    group_lasso_channels,
    l1_kernel_sparsity,
    no_sparsity,
    row_l2_norms,
)

SPARSITY_CONF = Path(__file__).resolve().parents[1] / "conf" / "sparsity"


# --- the public losses' contract ---


def test_group_lasso_channels_zero_model():
    """All weights zero → loss = 0."""
    model = TinyConvNet()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.zeros_(m.weight)
    loss = group_lasso_channels(model)
    assert loss.item() == 0.0


def test_group_lasso_channels_positive():
    """Non-zero weights → positive loss."""
    model = TinyConvNet()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.ones_(m.weight)
    loss = group_lasso_channels(model)
    assert loss.item() > 0.0


def test_group_lasso_channels_gradient_flows():
    """Loss should have gradients w.r.t. weights."""
    model = TinyConvNet()
    loss = group_lasso_channels(model)
    loss.backward()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            assert m.weight.grad is not None


def test_group_lasso_channels_value():
    """Verify exact value: L1 of L2 filter norms.

    conv1: (4, 3, 3, 3) all ones → each filter norm = sqrt(3*3*3) = sqrt(27)
    4 filters → sum = 4*sqrt(27)
    conv2: (8, 4, 3, 3) all ones → each filter norm = sqrt(4*3*3) = sqrt(36) = 6
    8 filters → sum = 8*6 = 48
    Total = 4*sqrt(27) + 48
    """
    model = TinyConvNet()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.ones_(m.weight)
    loss = group_lasso_channels(model)
    expected = 4 * (27**0.5) + 48.0
    assert abs(loss.item() - expected) < 1e-4


def test_group_lasso_blocks_zero_model():
    model = TinyConvNet()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.zeros_(m.weight)
    fn = group_lasso_blocks(block_size=2)
    loss = fn(model)
    assert loss.item() == 0.0


def test_group_lasso_blocks_gradient_flows():
    model = TinyConvNet()
    fn = group_lasso_blocks(block_size=2)
    loss = fn(model)
    loss.backward()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            assert m.weight.grad is not None


def test_l1_kernel_sparsity_zero_model():
    model = TinyConvNet()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.zeros_(m.weight)
    loss = l1_kernel_sparsity(model)
    assert loss.item() == 0.0


def test_l1_kernel_sparsity_gradient_flows():
    model = TinyConvNet()
    loss = l1_kernel_sparsity(model)
    loss.backward()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            assert m.weight.grad is not None


def test_l1_kernel_sparsity_value():
    """Verify exact value: sum of L1 norms of each kernel.

    conv1: (4, 3, 3, 3) all ones → each kernel L1 = 9, 4*3=12 kernels → 108
    conv2: (8, 4, 3, 3) all ones → each kernel L1 = 9, 8*4=32 kernels → 288
    Total = 396
    """
    model = TinyConvNet()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.ones_(m.weight)
    loss = l1_kernel_sparsity(model)
    assert abs(loss.item() - 396.0) < 1e-4


# --- against reference loops, devices, validation ---


def _ones(model):
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.ones_(m.weight)
    return model


class OddChannelNet(nn.Module):
    """Conv layers whose channel counts (7, 10, 5) are not multiples of the usual block sizes."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 7, 3, bias=False)
        self.conv2 = nn.Conv2d(7, 10, 1, bias=False)
        self.conv3 = nn.Conv2d(10, 5, 3, groups=5, bias=False)
        self.linear = nn.Linear(5, 3)


def _loop_group_lasso_blocks(model, block_size):
    """A reference loop over blocks, for comparison."""
    loss = torch.tensor(0.0, dtype=torch.float64)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            w = m.weight
            for i in range(0, w.shape[0], block_size):
                loss = loss + w[i : i + block_size].norm(p=2)
    return loss


def _loop_group_lasso_channels(model):
    """A reference loop: L2 norm per output filter, summed."""
    loss = torch.tensor(0.0, dtype=torch.float64)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            loss = loss + m.weight.flatten(1).norm(p=2, dim=1).sum()
    return loss


def _value_and_grads(model, fn):
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    loss = fn(model)
    return loss, torch.autograd.grad(loss, weights)


@pytest.mark.parametrize("block_size", [1, 2, 3, 4, 6, 8, 16])
def test_blocks_match_a_loop_in_value_and_gradient(block_size):
    torch.manual_seed(block_size)
    model = OddChannelNet().double()
    loss, grads = _value_and_grads(model, group_lasso_blocks(block_size))
    ref_loss, ref_grads = _value_and_grads(model, lambda m: _loop_group_lasso_blocks(m, block_size))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-15)


def test_channels_match_a_loop_in_value_and_gradient():
    torch.manual_seed(0)
    model = OddChannelNet().double()
    loss, grads = _value_and_grads(model, group_lasso_channels)
    ref_loss, ref_grads = _value_and_grads(model, _loop_group_lasso_channels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-15)


def test_blocks_value_with_a_partial_last_block():
    """Blocks of 3 on all-ones weights; a last partial block is a block of its own.

    conv1 (4 filters of 27): blocks of 3 and 1 filters → √81 + √27 = 9 + √27
    conv2 (8 filters of 36): blocks of 3, 3, 2 filters → 2·√108 + √72
    """
    loss = group_lasso_blocks(block_size=3)(_ones(TinyConvNet()))
    expected = 9 + math.sqrt(27) + 2 * math.sqrt(108) + math.sqrt(72)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_block_size_one_is_channel_group_lasso():
    torch.manual_seed(1)
    model = OddChannelNet()
    torch.testing.assert_close(group_lasso_blocks(block_size=1)(model), group_lasso_channels(model))


def test_row_l2_norms_gradient_is_finite_and_zero_at_zero_rows():
    rows = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]], dtype=torch.float64, requires_grad=True)
    norms = row_l2_norms(rows)
    (grad,) = torch.autograd.grad(norms.sum(), rows)
    torch.testing.assert_close(norms.detach(), torch.tensor([5.0, 0.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor([[0.6, 0.8], [0.0, 0.0], [0.0, -1.0]], dtype=torch.float64))


def test_row_l2_norms_passes_gradcheck_away_from_zero():
    rows = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(row_l2_norms, (rows,))


LOSSES = {
    "group_lasso_channels": group_lasso_channels,
    "group_lasso_blocks_4": group_lasso_blocks(4),
    "group_lasso_blocks_3": group_lasso_blocks(3),
    "l1_kernel_sparsity": l1_kernel_sparsity,
}


@pytest.mark.parametrize("name", LOSSES)
def test_gradient_is_finite_and_zero_at_exactly_zero_groups(name):
    """Dead channels (and a fully dead layer) give a zero subgradient, not NaN; live ones keep theirs."""
    torch.manual_seed(0)
    model = TinyConvNet()
    with torch.no_grad():
        model.conv1.weight.zero_()
        model.conv2.weight[:4] = 0  # the first block of 4 (and its channels) is dead
    loss = LOSSES[name](model)
    g1, g2 = torch.autograd.grad(loss, [model.conv1.weight, model.conv2.weight])
    assert torch.isfinite(loss)
    assert torch.isfinite(g1).all() and torch.isfinite(g2).all()
    assert (g1 == 0).all() and (g2[:4] == 0).all()
    assert (g2[4:] != 0).all()


def test_channel_gradient_is_the_unit_filter_direction():
    """∂/∂W Σ‖W_c‖ = W_c/‖W_c‖ for a live filter, 0 for a dead one."""
    model = TinyConvNet()
    with torch.no_grad():
        model.conv1.weight.zero_()
        model.conv1.weight[1] = 2.0
    (grad,) = torch.autograd.grad(group_lasso_channels(model), [model.conv1.weight])
    torch.testing.assert_close(grad[1], torch.full((3, 3, 3), 1 / math.sqrt(27)))
    assert (grad[[0, 2, 3]] == 0).all()


class ConvLinearNet(TinyConvNet):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)


def test_include_linear_adds_the_linear_rows():
    """Linear (3, 4) of ones: 3 rows of norm 2; blocks of 3 rows → √12; L1 → 12."""
    model = _ones(ConvLinearNet())
    conv_channels = 4 * math.sqrt(27) + 48.0
    assert group_lasso_channels(model).item() == pytest.approx(conv_channels, rel=1e-6)
    assert group_lasso_channels(model, include_linear=True).item() == pytest.approx(conv_channels + 6.0, rel=1e-6)
    conv_blocks = 9 + math.sqrt(27) + 2 * math.sqrt(108) + math.sqrt(72)
    blocks = group_lasso_blocks(block_size=3, include_linear=True)(model)
    assert blocks.item() == pytest.approx(conv_blocks + math.sqrt(12), rel=1e-6)
    assert l1_kernel_sparsity(model, include_linear=True).item() == pytest.approx(396.0 + 12.0, rel=1e-6)


@pytest.mark.parametrize("block_size", [0, -1, 2.5, "4", True, None])
def test_bad_block_size_raises_config_error_naming_it(block_size):
    with pytest.raises(ConfigError, match=r"sparsity\.block_size must be an integer >= 1"):
        group_lasso_blocks(block_size=block_size)


@pytest.mark.parametrize("option", ["group_lasso", "group_lasso_blocks", "l1_kernel"])
@pytest.mark.parametrize("value", ["yes", 1, None])
def test_bad_include_linear_raises_config_error_naming_it(option, value):
    """The losses run every step, so their include_linear is checked where the config is read (the schema)."""
    node = {**OmegaConf.to_container(OmegaConf.load(SPARSITY_CONF / f"{option}.yaml")), "include_linear": value}
    with pytest.raises(ConfigError, match=r"sparsity\.include_linear must be true or false"):
        check_values(schema_of(node["_target_"]), "sparsity.", node)


@pytest.mark.parametrize("fn", [no_sparsity, *LOSSES.values()])
def test_losses_are_scalars_on_the_models_device(fn):
    loss = fn(TinyConvNet())
    assert loss.dim() == 0 and loss.device == torch.device("cpu") and loss.dtype == torch.float32


@pytest.mark.parametrize("fn", [no_sparsity, *LOSSES.values()])
def test_a_model_without_penalised_layers_gives_a_zero_scalar(fn):
    loss = fn(nn.Sequential(nn.Linear(4, 2), nn.ReLU()))
    assert loss.dim() == 0 and loss.item() == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fn", [no_sparsity, *LOSSES.values()])
def test_losses_stay_on_the_gpu(fn):
    model = TinyConvNet().cuda()
    assert fn(model).device == model.conv1.weight.device


def _quantized_resnet20(**quantizer_kwargs):
    torch.manual_seed(0)
    model = resnet20()
    attach_weight_quantizers(model, [], DeadZoneLDZCompander, quantizer_kwargs)
    return model


def _quantized_convs(model):
    return [(m, fq) for _, m, fq in quantized_layers(model) if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("name", LOSSES)
def test_losses_on_quantized_resnet20_reach_latent_weights_and_deadzone_logits(name):
    model = _quantized_resnet20(init_deadzone_logit=1.0)
    convs = _quantized_convs(model)
    assert len(convs) == 19
    loss = LOSSES[name](model)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    for module, fq in convs:
        latent = module.parametrizations.weight.original
        assert latent.grad is not None and torch.isfinite(latent.grad).all() and latent.grad.abs().sum() > 0
        dz = fq.quantizer.logit_dz
        assert dz.grad is not None and torch.isfinite(dz.grad) and dz.grad != 0


def _quantizable(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("name", LOSSES)
def test_losses_act_on_the_quantized_weights(name):
    """The loss equals the same loss on a plain copy whose weights are the quantizer outputs."""
    model = _quantized_resnet20(init_deadzone_logit=1.0)
    plain = resnet20()
    with torch.no_grad():
        for (_, module, fq), (_, copy) in zip(quantized_layers(model), _quantizable(plain)):
            copy.weight.copy_(fq.quantizer(module.parametrizations.weight.original))
    quantized_loss = LOSSES[name](model)
    torch.testing.assert_close(quantized_loss, LOSSES[name](plain))
    with torch.no_grad():
        for (_, module, _), (_, copy) in zip(quantized_layers(model), _quantizable(plain)):
            copy.weight.copy_(module.parametrizations.weight.original)
    assert not torch.isclose(quantized_loss, LOSSES[name](plain))


@pytest.mark.parametrize("name", ["group_lasso_channels", "l1_kernel_sparsity"])
def test_dead_quantized_filters_get_zero_and_finite_gradients(name):
    """θ_dz = 0 stretches the dead zone to the 99th percentile of |W|: whole filters quantize to exactly 0
    (52 of the 688 with seed 0).

    Through the straight-through quantizer ∂L/∂W_latent = ∂L/∂Ŵ, so a dead filter's latent gradient is 0.
    """
    model = _quantized_resnet20(init_deadzone_logit=0.0)
    loss = LOSSES[name](model)
    loss.backward()
    assert torch.isfinite(loss)
    dead_filters = 0
    for module, fq in _quantized_convs(model):
        dead = (module.weight.detach().flatten(1) == 0).all(dim=1)
        grad = module.parametrizations.weight.original.grad
        assert torch.isfinite(grad).all() and torch.isfinite(fq.quantizer.logit_dz.grad)
        assert (grad[dead] == 0).all() and (grad[~dead].flatten(1).abs().sum(1) > 0).all()
        dead_filters += int(dead.sum())
    assert dead_filters > 0


def _count_quantizer_calls(model):
    calls = []
    for name, _, fq in quantized_layers(model):
        fq.quantizer.register_forward_hook(lambda module, args, out, name=name: calls.append(name))
    return calls


@pytest.mark.parametrize("name", LOSSES)
def test_quantizers_run_once_per_step_inside_parametrize_cached(name):
    model = _quantized_resnet20()
    calls = _count_quantizer_calls(model)
    x = torch.randn(2, 3, 32, 32)
    with parametrize.cached():
        out = model(x)
        assert len(calls) == 20  # 19 convs + the linear layer, once each
        loss = out.square().mean() + LOSSES[name](model)
        assert len(calls) == 20  # the loss reused the cached quantized weights
    loss.backward()
    assert len(calls) == 20
    assert torch.isfinite(model.conv1.parametrizations.weight.original.grad).all()


def test_outside_cached_the_loss_recomputes_each_conv_quantizer_once():
    model = _quantized_resnet20()
    calls = _count_quantizer_calls(model)
    group_lasso_channels(model)
    assert len(calls) == 19 and "linear" not in calls
    group_lasso_channels(model, include_linear=True)
    assert len(calls) == 19 + 20


def _instantiate(name, *overrides):
    """Load a sparsity YAML as main.py does: pop the strength `weight`, instantiate the rest."""
    cfg = OmegaConf.merge(OmegaConf.load(SPARSITY_CONF / f"{name}.yaml"), OmegaConf.from_dotlist(list(overrides)))
    weight = cfg.pop("weight")
    return weight, instantiate(cfg)


def test_sparsity_group_has_exactly_the_four_losses_and_two_proximal_steps():
    assert sorted(p.stem for p in SPARSITY_CONF.glob("*.yaml")) == [
        "group_lasso",
        "group_lasso_blocks",
        "group_lasso_proximal",
        "l1_kernel",
        "none",
        "trimmed_group_lasso",
    ]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("none", 0.0),
        ("group_lasso", 4 * math.sqrt(27) + 48.0),
        ("group_lasso_blocks", math.sqrt(108) + 2 * 12.0),  # blocks of 4: conv1 is one, conv2 two of √144
        ("l1_kernel", 396.0),
    ],
)
def test_sparsity_yaml_instantiates_to_the_loss(name, expected):
    weight, fn = _instantiate(name)
    assert isinstance(weight, float) and weight >= 0.0
    assert callable(fn)
    loss = fn(_ones(ConvLinearNet()))
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_none_yaml_has_zero_weight():
    assert _instantiate("none")[0] == 0.0


def test_group_lasso_blocks_yaml_block_size_is_overridable():
    """Blocks of 8: conv1's 4 filters are one block (√108), conv2's 8 filters another (√288)."""
    _, fn = _instantiate("group_lasso_blocks", "block_size=8")
    expected = math.sqrt(108) + math.sqrt(288)
    assert fn(_ones(TinyConvNet())).item() == pytest.approx(expected, rel=1e-6)


def test_group_lasso_blocks_yaml_rejects_a_bad_block_size():
    with pytest.raises(Exception, match=r"sparsity\.block_size must be an integer >= 1, got 0"):
        _instantiate("group_lasso_blocks", "block_size=0")


@pytest.mark.parametrize("name", ["group_lasso", "group_lasso_blocks", "l1_kernel"])
def test_sparsity_yaml_include_linear_is_overridable(name):
    _, without = _instantiate(name)
    _, with_linear = _instantiate(name, "include_linear=true")
    model = _ones(ConvLinearNet())
    assert with_linear(model).item() > without(model).item()


@pytest.mark.parametrize("name", ["group_lasso", "group_lasso_blocks", "l1_kernel"])
def test_default_strength_is_a_fraction_of_the_initial_cross_entropy(name):
    """The YAML comments' claim: at init, weight·loss on a quantized ResNet-20 is 0.1–0.5 of ln 10."""
    weight, fn = _instantiate(name)
    model = _quantized_resnet20()
    ratio = weight * fn(model).item() / math.log(10)
    assert 0.1 <= ratio <= 0.5
