"""Proximal sparsity steps: exact group soft-thresholding of filters, and the channel target of the trimmed version."""

import math

import pytest
import torch
from torch import nn
from toy_models import TinyConvNet

from codeq.errors import ConfigError
from codeq.evaluator import Evaluator
from codeq.models import resnet20
from codeq.quant import DeadZoneLDZCompander, attach_weight_quantizers
from codeq.sparsity import Proximal, group_lasso_proximal, trimmed_group_lasso


def _rows_with_norms(conv: nn.Conv2d, norms: list[float]) -> None:
    """Filter c of ``conv`` = norms[c] · a unit vector (all entries equal)."""
    n = conv.weight[0].numel()
    with torch.no_grad():
        for c, norm in enumerate(norms):
            conv.weight[c].fill_(norm / math.sqrt(n))


def _row_norms(weight: torch.Tensor) -> list[float]:
    return weight.detach().flatten(1).norm(dim=1).tolist()


def test_group_lasso_proximal_is_group_soft_thresholding():
    """conv2's rows have n = 36 entries: threshold η√n = 0.05·6 = 0.3; a row of norm r becomes max(0, r − 0.3)."""
    model = TinyConvNet()
    _rows_with_norms(model.conv2, [0.1, 0.3, 0.5, 1.0, 2.0, 0.0, 0.29, 0.31])
    _rows_with_norms(model.conv1, [1.0, 0.2, 0.5, 0.1])  # n = 27: threshold 0.05·√27 ≈ 0.2598
    directions = model.conv2.weight.detach().flatten(1).clone()
    group_lasso_proximal().step(model, 0.05)
    after = _row_norms(model.conv2.weight)
    assert after == pytest.approx([0.0, 0.0, 0.2, 0.7, 1.7, 0.0, 0.0, 0.01], abs=1e-6)
    assert _row_norms(model.conv1.weight) == pytest.approx([1 - 0.05 * math.sqrt(27), 0, 0.5 - 0.05 * math.sqrt(27), 0])
    live = torch.tensor(after) > 0
    rows = model.conv2.weight.detach().flatten(1)
    assert torch.allclose(
        torch.nn.functional.cosine_similarity(rows[live], directions[live]), torch.ones(int(live.sum()))
    )
    assert (rows[~live] == 0).all()  # exactly zero, not merely small


def test_trimmed_group_lasso_shrinks_only_the_smallest_fraction_and_stops_there():
    """dead_fraction 0.5 of conv2's 8 filters: the 4 smallest shrink until zero, the 4 largest are never touched."""
    model = TinyConvNet()
    conv1 = model.conv1.weight.detach().clone()
    norms = [0.9, 0.1, 1.5, 0.4, 2.0, 0.3, 1.2, 0.6]
    _rows_with_norms(model.conv2, norms)
    kept = model.conv2.weight.detach()[[0, 2, 4, 6]].clone()
    step = trimmed_group_lasso(dead_fraction=0.5, exclude_layers=["conv1"]).step
    step(model, 0.05)  # threshold 0.3: rows 0.1 and 0.3 die, 0.4 → 0.1, 0.6 → 0.3
    assert _row_norms(model.conv2.weight) == pytest.approx([0.9, 0, 1.5, 0.1, 2.0, 0, 1.2, 0.3], abs=1e-6)
    for _ in range(5):
        step(model, 0.05)
    after = model.conv2.weight.detach()
    assert (after[[1, 3, 5, 7]] == 0).all()
    assert torch.equal(after[[0, 2, 4, 6]], kept)
    assert torch.equal(model.conv1.weight, conv1)  # excluded


def test_exclude_layers_and_include_linear_choose_the_layers():
    class ConvLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1, bias=False)
            self.head = nn.Linear(2, 2, bias=False)

    for include_linear, exclude, changed in [
        (False, [], {"conv"}),
        (True, [], {"conv", "head"}),
        (True, ["h*"], {"conv"}),
        (True, ["conv", "head"], set()),
        (True, "auto", set()),  # the first and the last layer
    ]:
        model = ConvLinear()
        before = {name: m.weight.detach().clone() for name, m in model.named_children()}
        group_lasso_proximal(include_linear=include_linear, exclude_layers=exclude).step(model, 10.0)
        assert {name for name, m in model.named_children() if not torch.equal(m.weight, before[name])} == changed


def test_on_a_quantized_model_the_latent_filters_die_and_the_cost_analysis_counts_them():
    """The step writes the latent weights under the quantizer; a zero latent row quantizes to zero, so the
    structured analysis finds exactly those output channels null (trimmed: half of each quantized conv)."""
    torch.manual_seed(0)
    model = resnet20(in_channels=1)
    evaluator = Evaluator(model, input_size=(1, 28, 28))
    attach_weight_quantizers(model, ["conv1", "linear"], DeadZoneLDZCompander)
    step = trimmed_group_lasso(dead_fraction=0.5, exclude_layers="auto").step  # auto: not the stem (conv1)
    for _ in range(20):
        step(model, 0.1)
    result = evaluator.evaluate(model)
    dead = {layer.name: (layer.null_out.count, layer.null_out.total) for layer in result.structured_stats.layers}
    assert dead["conv1"] == (0, 16) and dead["linear"] == (0, 10)
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and name != "conv1":
            latent = module.parametrizations.weight.original
            zero_rows = int((latent.flatten(1) == 0).all(dim=1).sum())
            assert zero_rows == latent.shape[0] // 2
            assert dead[name][0] >= zero_rows  # option-A padding can add null channels after the residual add
    assert result.structured_mac_ratio > 2.5


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, "0.5", True, None])
def test_bad_dead_fraction_is_a_config_error_naming_it(fraction):
    with pytest.raises(ConfigError, match="sparsity.dead_fraction must be a number in \\[0, 1\\)"):
        trimmed_group_lasso(dead_fraction=fraction)


@pytest.mark.parametrize("factory", [group_lasso_proximal, trimmed_group_lasso])
def test_bad_exclude_layers_and_include_linear_are_config_errors(factory):
    with pytest.raises(ConfigError, match="sparsity.exclude_layers"):
        factory(exclude_layers="conv1")
    with pytest.raises(ConfigError, match="sparsity.include_linear"):
        factory(include_linear="yes")


def test_proximal_options_are_proximal_steps():
    assert isinstance(group_lasso_proximal(), Proximal) and isinstance(trimmed_group_lasso(), Proximal)
