"""Tests for the experiment evaluator."""

import math

import pytest
import torch
import torch.nn as nn
from matplotlib.figure import Figure
from toy_models import TinyConvNet

from codeq.errors import ConfigError
from codeq.evaluator import (
    EvalResult,
    Evaluator,
    plot_channel_liveness,
    plot_layer_bitwidths,
    plot_layer_sparsity_bars,
    plot_sparsity_map,
)
from codeq.quant import UniformSymmetric, attach_weight_quantizers

# ----------------------------------------------------------------------------- the public Evaluator API


def test_evaluator_dense_baseline():
    """Dense model: structured and unstructured ratios should both be 1.0."""
    model = TinyConvNet()
    nn.init.ones_(model.conv1.weight)
    nn.init.ones_(model.conv2.weight)

    evaluator = Evaluator(model, input_size=(3, 4, 4))
    result = evaluator.evaluate(model)

    assert isinstance(result, EvalResult)
    assert abs(result.structured_bops_ratio - 1.0) < 1e-6
    assert abs(result.unstructured_bops_ratio - 1.0) < 1e-6


def test_evaluator_scattered_zeros():
    """Scattered zeros: unstructured ratio > structured ratio.

    Zero half the weights in each filter (no full channels die).
    Structured sees no savings; unstructured sees ~2x. (Zeroing the first half of the whole flattened
    tensor instead would kill whole filters, and structured counting would rightly see savings too.)
    """
    model = TinyConvNet()
    nn.init.ones_(model.conv1.weight)
    nn.init.ones_(model.conv2.weight)

    evaluator = Evaluator(model, input_size=(3, 4, 4))

    # Zero half weights scattered
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                for i in range(m.weight.shape[0]):
                    flat = m.weight[i].flatten()
                    flat[: flat.numel() // 2] = 0.0

    result = evaluator.evaluate(model)

    # Structured: channels still alive → ratio close to 1
    # Unstructured: half weights zero → ratio close to 2
    assert result.unstructured_bops_ratio > result.structured_bops_ratio


def test_evaluator_full_channel_prune():
    """Full channel pruning: structured and unstructured both see savings."""
    model = TinyConvNet()
    nn.init.ones_(model.conv1.weight)
    nn.init.ones_(model.conv2.weight)

    evaluator = Evaluator(model, input_size=(3, 4, 4))

    with torch.no_grad():
        model.conv1.weight[2:, :, :, :] = 0.0  # kill channels 2,3

    result = evaluator.evaluate(model)

    assert result.structured_bops_ratio > 1.0
    assert result.unstructured_bops_ratio > 1.0


# ----------------------------------------------------------------------------- a hand-computed evaluation


def _pruned_tiny_net():
    """TinyConvNet of ones on 3x4x4: conv1 filters 2, 3 zero (32-bit); conv2 filter 7 zero, 4-bit uniform.

    Dense: conv1 3·4·9·16 = 1728, conv2 4·8·9·16 = 4608 -> 6336 MACs, 6336·32·32 BOPs.
    Structured: conv1 3·2·9·16 = 864; conv2 sees null inputs {2, 3}: 2·7·9·16 = 2016.
    Unstructured: conv1 nnz 54 -> 864; conv2 nnz 288 − 36 = 252 -> 4032.
    Zeros: 54 of 108 (conv1), 36 of 288 (conv2).
    """
    model = TinyConvNet()
    nn.init.ones_(model.conv1.weight)
    nn.init.ones_(model.conv2.weight)
    evaluator = Evaluator(model, input_size=(3, 4, 4))
    with torch.no_grad():
        model.conv1.weight[2:] = 0.0
        model.conv2.weight[7] = 0.0
    attach_weight_quantizers(model, ["conv1"], UniformSymmetric, {"bitwidth": 4})
    return model, evaluator


def test_evaluate_hand_computed_ratios_sparsity_and_bits():
    model, evaluator = _pruned_tiny_net()
    result = evaluator.evaluate(model)
    base_bops = 6336 * 32 * 32
    structured_bops = 864 * 32 * 32 + 2016 * 4 * 32
    unstructured_bops = 864 * 32 * 32 + 4032 * 4 * 32
    assert result.structured_stats.total_macs == 2880
    assert result.structured_mac_ratio == pytest.approx(6336 / 2880)
    assert result.structured_bops_ratio == pytest.approx(base_bops / structured_bops)
    assert result.structured_rel_bops_pct == pytest.approx(100 * structured_bops / base_bops)
    assert result.unstructured_stats.total_macs == 4896
    assert result.unstructured_mac_ratio == pytest.approx(6336 / 4896)
    assert result.unstructured_bops_ratio == pytest.approx(base_bops / unstructured_bops)
    assert result.unstructured_rel_bops_pct == pytest.approx(100 * unstructured_bops / base_bops)
    assert result.unstructured_sparsity == pytest.approx(90 / 396)
    assert result.mean_bits == 4.0


def test_as_metrics_keys_and_values():
    model, evaluator = _pruned_tiny_net()
    result = evaluator.evaluate(model)
    metrics = result.as_metrics()
    assert metrics == pytest.approx(
        {
            "compression/structured_bops_ratio": result.structured_bops_ratio,
            "compression/structured_mac_ratio": 6336 / 2880,
            "compression/unstructured_bops_ratio": result.unstructured_bops_ratio,
            "compression/unstructured_mac_ratio": 6336 / 4896,
            "compression/structured_rel_bops_pct": result.structured_rel_bops_pct,
            "compression/unstructured_rel_bops_pct": result.unstructured_rel_bops_pct,
            # no attention: counting the activation matmuls too changes nothing
            "compression/structured_total_rel_bops_pct": result.structured_rel_bops_pct,
            "compression/unstructured_total_rel_bops_pct": result.unstructured_rel_bops_pct,
            "compression/structured_macs": 2880.0,
            "sparsity/unstructured": 90 / 396,
            "bits/mean": 4.0,
            "layers/conv1/bitwidth": 32.0,
            "layers/conv1/structured_pruning": 1 - 864 / 1728,
            "layers/conv1/structured_macs": 864.0,
            "layers/conv1/unstructured_pruning": 54 / 108,
            "layers/conv2/bitwidth": 4.0,
            "layers/conv2/structured_pruning": 1 - 2016 / 4608,
            "layers/conv2/structured_macs": 2016.0,
            "layers/conv2/unstructured_pruning": 36 / 288,
            "layers/conv1/dead_channels": 2.0,  # filters 2, 3
            "layers/conv1/channels": 4.0,
            "layers/conv2/dead_channels": 1.0,  # filter 7
            "layers/conv2/channels": 8.0,
        }
    )
    assert all(isinstance(v, float) for v in metrics.values())


def test_mean_bits_is_32_without_quantizers_and_dead_model_is_inf():
    model = TinyConvNet()
    evaluator = Evaluator(model, input_size=(3, 4, 4))
    assert evaluator.evaluate(model).mean_bits == 32.0
    nn.init.zeros_(model.conv1.weight)
    nn.init.zeros_(model.conv2.weight)
    result = evaluator.evaluate(model)
    assert result.structured_bops_ratio == math.inf
    assert result.unstructured_bops_ratio == math.inf
    assert result.structured_rel_bops_pct == 0.0
    assert result.unstructured_sparsity == 1.0


# ----------------------------------------------------------------------------- plots


def test_channel_liveness_rows_are_layers_and_null_channels_are_black():
    """conv2 filter 7 zero; conv1 filters 2, 3 zero. Row width 8 (conv2); conv1 padded with gray."""
    model, evaluator = _pruned_tiny_net()
    fig = evaluator.plot_channel_liveness(model)
    assert isinstance(fig, Figure)
    grid = fig.axes[0].images[0].get_array()
    assert grid.shape == (2, 8)
    assert grid[0].tolist() == [1, 1, 0, 0, 0.5, 0.5, 0.5, 0.5]
    assert grid[1].tolist() == [1] * 7 + [0]
    same = plot_channel_liveness(evaluator.evaluate(model)).axes[0].images[0].get_array()
    assert (same == grid).all()


def test_channel_liveness_marks_channels_fed_only_by_null_inputs():
    """conv2 filter 0 reads only conv1's dead channels 2, 3: null by propagation, not by its own zeros."""
    model = TinyConvNet()
    nn.init.ones_(model.conv1.weight)
    nn.init.ones_(model.conv2.weight)
    evaluator = Evaluator(model, input_size=(3, 4, 4))
    with torch.no_grad():
        model.conv1.weight[2:] = 0.0
        model.conv2.weight[0, :2] = 0.0
    grid = evaluator.plot_channel_liveness(model).axes[0].images[0].get_array()
    assert grid[1].tolist() == [0] + [1] * 7


def test_sparsity_map_grid_shows_each_kernel():
    """conv1 (4, 3, 3, 3): grid (4·4 + 1) x (3·4 + 1); kernel (o=2, i=1) zero except its centre."""
    model = TinyConvNet()
    nn.init.ones_(model.conv1.weight)
    with torch.no_grad():
        model.conv1.weight[2, 1] = 0.0
        model.conv1.weight[2, 1, 1, 1] = 1.0
    fig = plot_sparsity_map(model, "conv1")
    grid = fig.axes[0].images[0].get_array()
    assert grid.shape == (17, 13)
    assert (grid[0] == 0.5).all() and (grid[:, 0] == 0.5).all()
    kernel = grid[1 + 2 * 4 : 4 + 2 * 4, 1 + 1 * 4 : 4 + 1 * 4]
    assert kernel.tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert grid[1:4, 1:4].tolist() == [[1] * 3] * 3
    assert int((grid == 0).sum()) == 8


def test_sparsity_map_uses_the_quantized_weight_and_handles_linear():
    """UniformSymmetric(2 bits) zeroes |w| < max/2: 0.1 -> 0, 1.0 stays; Linear cells are 1x1."""
    model = nn.Sequential(nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.1, 0.9], [0.1, 0.1, 1.0]]))
    attach_weight_quantizers(model, [], UniformSymmetric, {"bitwidth": 2})
    grid = plot_sparsity_map(model, "0").axes[0].images[0].get_array()
    assert grid.shape == (5, 7)
    assert grid[1::2, 1::2].tolist() == [[1, 0, 1], [0, 0, 1]]


def test_sparsity_map_unknown_layer_names_the_choices():
    with pytest.raises(ConfigError, match=r"'conv9'.*\['conv1', 'conv2'\]"):
        plot_sparsity_map(TinyConvNet(), "conv9")


def test_layer_bars_and_bitwidths_have_one_bar_per_layer_and_kind():
    model, evaluator = _pruned_tiny_net()
    result = evaluator.evaluate(model)
    bars = evaluator.plot_layer_sparsity_bars(result).axes[0].patches
    assert [round(p.get_height(), 4) for p in bars] == [0.5, 0.5625, 0.5, 0.125]
    bits = plot_layer_bitwidths(result).axes[0].patches
    assert [p.get_height() for p in bits] == [32.0, 4.0]
    assert evaluator.plot_layer_bitwidths is plot_layer_bitwidths
    assert plot_layer_sparsity_bars(result).axes[0].get_xticklabels()[1].get_text() == "conv2"


def test_figures_render_to_png(tmp_path):
    model, evaluator = _pruned_tiny_net()
    result = evaluator.evaluate(model)
    for i, fig in enumerate(
        [
            evaluator.plot_channel_liveness(model),
            plot_sparsity_map(model, "conv2"),
            plot_layer_sparsity_bars(result),
            plot_layer_bitwidths(result),
        ]
    ):
        path = tmp_path / f"{i}.png"
        fig.savefig(path)
        assert path.read_bytes()[:4] == b"\x89PNG"


def test_module_level_channel_liveness_points_a_model_to_the_evaluator_method():
    with pytest.raises(TypeError, match="Evaluator.plot_channel_liveness"):
        plot_channel_liveness(TinyConvNet())
