"""MACs/BOPs of single layers and small models: the public helpers' contract plus the structured rules."""

import logging
import math

import pytest
import torch
import torch.nn as nn

from codeq.metrics import (
    LayerQuantInfo,
    NullChannels,
    QuantizationComparison,
    _compute_effective_macs,
    _compute_null_output_channels,
    _compute_unstructured_macs,
    _get_layer_quant_info,
    _get_spatial_dims,
)
from codeq.models import resnet20, resnet32
from codeq.quant import DeadZoneLDZCompander, UniformSymmetric, attach_weight_quantizers, toggle_quantization


class SingleConv(nn.Module):
    """Conv2d(2 -> 4, 3x3, padding 1, no bias) on a 2x4x4 input: m = 4x4."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv(x)


class SingleLinear(nn.Module):
    """Linear(4 -> 8, no bias): m = 1x1."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8, bias=False)

    def forward(self, x):
        return self.fc(x)


# ----------------------------------------------------------------------------- NullChannels


def test_null_channels_none_all_count_ratio():
    assert NullChannels.none(total=4).count == 0
    assert NullChannels.all(total=4).count == 4
    assert NullChannels.all(total=4).ratio == 1.0
    assert NullChannels({1, 3}, 8).ratio == 0.25
    assert NullChannels.none(total=0).ratio == 0.0


def test_null_channels_intersect_keeps_common_indices():
    assert NullChannels({0, 1, 2}, 4).intersect(NullChannels({1, 2, 3}, 4)) == NullChannels({1, 2}, 4)


def test_null_channels_intersect_rejects_other_total():
    with pytest.raises(ValueError, match="4 and 5"):
        NullChannels({0}, 4).intersect(NullChannels({0}, 5))


def test_null_channels_rejects_out_of_range_index():
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        NullChannels({2}, 2)


def test_null_channels_mask_round_trip():
    null = NullChannels({0, 2}, 4)
    assert null.mask().tolist() == [True, False, True, False]
    assert NullChannels.from_mask(null.mask()) == null


# ----------------------------------------------------------------------------- structured, one layer


def test_structured_macs_dense():
    """Nothing null: (2)(4)·3·3·4·4 = 1152."""
    model = SingleConv()
    nn.init.ones_(model.conv.weight)
    info = _get_layer_quant_info(model.conv)
    null_in = NullChannels.none(total=2)
    null_out = _compute_null_output_channels(info.weight, null_in)
    assert null_out == NullChannels.none(total=4)
    assert _compute_effective_macs(info.weight, null_in, null_out, 4, 4) == 1152


def test_structured_macs_half_output_channels_zeroed():
    """Filters 2, 3 zero -> null_out {2, 3}: (2)(4 − 2)·9·16 = 576."""
    model = SingleConv()
    nn.init.ones_(model.conv.weight)
    with torch.no_grad():
        model.conv.weight[2:] = 0.0
    info = _get_layer_quant_info(model.conv)
    null_in = NullChannels.none(total=2)
    null_out = _compute_null_output_channels(info.weight, null_in)
    assert null_out == NullChannels({2, 3}, 4)
    assert _compute_effective_macs(info.weight, null_in, null_out, 4, 4) == 576


def test_structured_macs_all_zero():
    model = SingleConv()
    nn.init.zeros_(model.conv.weight)
    info = _get_layer_quant_info(model.conv)
    null_in = NullChannels.none(total=2)
    null_out = _compute_null_output_channels(info.weight, null_in)
    assert null_out == NullChannels.all(total=4)
    assert _compute_effective_macs(info.weight, null_in, null_out, 4, 4) == 0


def test_structured_macs_dead_input_channel():
    """Input 1 null: (2 − 1)(4)·9·16 = 576."""
    model = SingleConv()
    nn.init.ones_(model.conv.weight)
    info = _get_layer_quant_info(model.conv)
    null_in = NullChannels({1}, 2)
    null_out = _compute_null_output_channels(info.weight, null_in)
    assert null_out == NullChannels.none(total=4)
    assert _compute_effective_macs(info.weight, null_in, null_out, 4, 4) == 576


def test_structured_output_dead_through_dead_inputs():
    """Filter 0 only reads input 1, which is null -> filter 0 is null too: (1)(3)·9·16 = 432."""
    model = SingleConv()
    nn.init.ones_(model.conv.weight)
    with torch.no_grad():
        model.conv.weight[0, 0] = 0.0
    info = _get_layer_quant_info(model.conv)
    null_in = NullChannels({1}, 2)
    null_out = _compute_null_output_channels(info.weight, null_in)
    assert null_out == NullChannels({0}, 4)
    assert _compute_effective_macs(info.weight, null_in, null_out, 4, 4) == 432


def test_structured_nonzero_bias_keeps_a_zero_filter_alive():
    weight = torch.zeros(3, 2, 1, 1)
    bias = torch.tensor([0.0, 0.5, 0.0])
    assert _compute_null_output_channels(weight, NullChannels.none(2), bias) == NullChannels({0, 2}, 3)


# ----------------------------------------------------------------------------- unstructured


def test_unstructured_macs_dense():
    """All weights = 1 → nnz = c_out * c_in * k * k.

    SingleConv: (4, 2, 3, 3) all ones, m=4x4
    nnz = 4 * 2 * 3 * 3 = 72
    MACs = 72 * 4 * 4 = 1152 (same as structured when nothing is pruned)
    """
    model = SingleConv()
    nn.init.ones_(model.conv.weight)
    info = _get_layer_quant_info(model.conv)
    macs = _compute_unstructured_macs(info.weight, 4, 4)
    assert macs == 72 * 16  # 1152


def test_unstructured_macs_half_weights_zeroed():
    """Half the individual weights zeroed (scattered, not full channels).

    weight shape (4, 2, 3, 3) = 72 elements, zero out 36 → nnz=36
    MACs = 36 * 4 * 4 = 576
    """
    model = SingleConv()
    nn.init.ones_(model.conv.weight)
    with torch.no_grad():
        flat = model.conv.weight.flatten()
        flat[:36] = 0.0
    info = _get_layer_quant_info(model.conv)
    macs = _compute_unstructured_macs(info.weight, 4, 4)
    assert macs == 36 * 16  # 576


def test_unstructured_macs_all_zero():
    """All weights zero → 0 MACs."""
    model = SingleConv()
    nn.init.zeros_(model.conv.weight)
    info = _get_layer_quant_info(model.conv)
    macs = _compute_unstructured_macs(info.weight, 4, 4)
    assert macs == 0


def test_unstructured_vs_structured_gap():
    """Scattered zeros give more unstructured savings than structured.

    Zero out half the weights in each filter (no full channel dies).
    Structured: all channels alive → MACs = dense = 1152
    Unstructured: nnz=36 → MACs = 576
    """
    model = SingleConv()
    nn.init.ones_(model.conv.weight)
    with torch.no_grad():
        # Zero half of each filter's weights (scattered)
        for i in range(4):
            flat = model.conv.weight[i].flatten()
            flat[: flat.numel() // 2] = 0.0

    info = _get_layer_quant_info(model.conv)
    null_in = NullChannels.none(total=2)
    null_out = _compute_null_output_channels(info.weight, null_in)

    structured_macs = _compute_effective_macs(info.weight, null_in, null_out, 4, 4)
    unstructured_macs = _compute_unstructured_macs(info.weight, 4, 4)

    assert structured_macs == 1152  # no channels fully dead
    assert unstructured_macs == 576  # half the individual weights are zero
    assert unstructured_macs < structured_macs


def test_unstructured_macs_linear():
    """Linear(4->8), half weights zeroed.

    nnz = 16, m=1x1 → MACs = 16
    """
    model = SingleLinear()
    nn.init.ones_(model.fc.weight)
    with torch.no_grad():
        flat = model.fc.weight.flatten()
        flat[:16] = 0.0
    info = _get_layer_quant_info(model.fc)
    macs = _compute_unstructured_macs(info.weight, 1, 1)
    assert macs == 16


# ----------------------------------------------------------------------------- layer quant info


def test_layer_quant_info_unquantized_is_32_bit_latent_weight():
    model = SingleConv()
    info = _get_layer_quant_info(model.conv)
    assert isinstance(info, LayerQuantInfo)
    assert info.bitwidth == 32
    assert torch.equal(info.weight, model.conv.weight)


def test_layer_quant_info_uses_quantized_weight_and_bitwidth():
    """UniformSymmetric(2 bits): levels {-1, 0, 1}·max|w|; weights 0.1 and 0.9 of max 1 -> 0 and 1."""
    model = SingleLinear()
    with torch.no_grad():
        model.fc.weight.fill_(0.1)
        model.fc.weight[0, 0] = 1.0
        model.fc.weight[1, 0] = 0.9
    attach_weight_quantizers(model, [], UniformSymmetric, {"bitwidth": 2})
    info = _get_layer_quant_info(model.fc)
    assert info.bitwidth == 2
    assert int(info.weight.ne(0).sum()) == 2
    toggle_quantization(model, False)
    disabled = _get_layer_quant_info(model.fc)
    assert disabled.bitwidth == 32
    assert int(disabled.weight.ne(0).sum()) == 32


def test_spatial_dims_conv_and_linear():
    assert _get_spatial_dims(SingleConv(), (2, 4, 4)) == {"conv": (4, 4)}
    assert _get_spatial_dims(SingleLinear(), (4,)) == {"fc": (1, 1)}


# ----------------------------------------------------------------------------- model level


def _comparison(model, input_size):
    qc = QuantizationComparison(input_size=input_size)
    qc.set_baseline(model)
    return qc


def test_baseline_is_dense_32_bit():
    """set_baseline returns the dense cost: 1152 MACs, 1152·32·32 BOPs."""
    model = SingleConv()
    baseline = QuantizationComparison(input_size=(2, 4, 4)).set_baseline(model)
    assert baseline.total_macs == 1152
    assert baseline.total_bops == 1152 * 32 * 32
    assert baseline.layers[0].spatial == (4, 4)
    assert baseline.layers[0].kernel_size == (3, 3)


def test_model_ratios_for_dead_filters_and_scattered_zeros():
    """Filter 3 dead, plus 6 scattered zeros in filter 0 (nnz = 72 − 18 − 6 = 48).

    Structured: 2·3·9·16 = 864 -> ratio 1152/864; unstructured: 48·16 = 768 -> 1152/768 = 1.5.
    """
    model = SingleConv()
    nn.init.ones_(model.conv.weight)
    qc = _comparison(model, (2, 4, 4))
    with torch.no_grad():
        model.conv.weight[3] = 0.0
        model.conv.weight[0].flatten()[:6] = 0.0
    structured = qc.calculate_stats(model)
    unstructured = qc.calculate_unstructured_stats(model)
    assert structured.total_macs == 864
    assert structured.layers[0].null_out == NullChannels({3}, 4)
    assert structured.layers[0].pruning_ratio == pytest.approx(0.25)
    assert qc.mac_compression_ratio(structured) == pytest.approx(1152 / 864)
    assert qc.compression_ratio(structured) == pytest.approx(1152 / 864)
    assert unstructured.total_macs == 768
    assert unstructured.layers[0].pruning_ratio == pytest.approx(24 / 72)
    assert qc.unstructured_mac_compression_ratio(unstructured) == pytest.approx(1.5)
    assert qc.unstructured_compression_ratio(unstructured) == pytest.approx(1.5)


def test_fully_dead_model_ratio_is_inf():
    model = SingleConv()
    qc = _comparison(model, (2, 4, 4))
    nn.init.zeros_(model.conv.weight)
    structured = qc.calculate_stats(model)
    unstructured = qc.calculate_unstructured_stats(model)
    assert structured.total_bops == 0
    assert qc.compression_ratio(structured) == math.inf
    assert qc.mac_compression_ratio(structured) == math.inf
    assert qc.unstructured_compression_ratio(unstructured) == math.inf
    assert qc.unstructured_mac_compression_ratio(unstructured) == math.inf


def test_ratio_before_baseline_is_a_clear_error():
    qc = QuantizationComparison(input_size=(2, 4, 4))
    with pytest.raises(RuntimeError, match="set_baseline"):
        qc.compression_ratio(qc.calculate_stats(SingleConv()))


def test_layers_differing_from_baseline_is_one_clear_error():
    qc = _comparison(resnet20(), (3, 32, 32))
    with pytest.raises(ValueError, match=r"differ from the baseline.*extra \['layer1.3.conv1'"):
        qc.compression_ratio(qc.calculate_stats(resnet32()))


def test_model_without_layers_is_rejected_as_baseline():
    with pytest.raises(ValueError, match="no Conv/Linear layer"):
        QuantizationComparison(input_size=(4,)).set_baseline(nn.ReLU())


def test_learned_bitwidths_set_bops_and_excluded_layers_stay_32_bit():
    """θ_bit = 0.4 -> b = round(tanh(0.4)·6 + 2) = round(4.28) = 4 on every quantized layer.

    ResNet-20 MACs: conv1 3·16·9·32·32 = 442,368 and linear 64·10 = 640 stay 32-bit, the other
    40,108,032 are 4-bit; a dead zone of ~0 prunes no whole filter, so structured MACs stay dense.
    """
    model = resnet20()
    qc = _comparison(model, (3, 32, 32))
    attach_weight_quantizers(
        model, ["conv1", "linear"], DeadZoneLDZCompander, {"init_bit_logit": 0.4, "init_deadzone_logit": 10.0}
    )
    stats = qc.calculate_stats(model)
    bits = {layer.name: layer.bitwidth for layer in stats.layers}
    assert bits["conv1"] == 32 and bits["linear"] == 32
    assert {b for name, b in bits.items() if name not in ("conv1", "linear")} == {4}
    assert stats.total_macs == 40_551_040
    assert stats.total_bops == (442_368 + 640) * 32 * 32 + 40_108_032 * 4 * 32
    for layer in stats.layers:
        assert layer.bops == layer.macs * layer.bitwidth * 32
    toggle_quantization(model, False)
    assert qc.compression_ratio(qc.calculate_stats(model)) == pytest.approx(1.0)


def test_layer_info_is_shared_between_structured_and_unstructured():
    """Passing one collected layer_info gives the same stats as letting each method collect its own."""
    from codeq.metrics import collect_layer_quant_info

    model = resnet20()
    attach_weight_quantizers(model, ["conv1", "linear"], DeadZoneLDZCompander, {"init_deadzone_logit": 0.5})
    qc = _comparison(model, (3, 32, 32))
    info = collect_layer_quant_info(model)
    assert qc.calculate_stats(model, info) == qc.calculate_stats(model)
    assert qc.calculate_unstructured_stats(model, info) == qc.calculate_unstructured_stats(model)


def test_unstructured_sparsity_from_the_dead_zone():
    """A wide dead zone (θ_dz = 0.1: d/2 ≈ 0.9·absmax) zeroes most weights of every quantized layer."""
    model = resnet20()
    qc = _comparison(model, (3, 32, 32))
    attach_weight_quantizers(model, ["conv1", "linear"], DeadZoneLDZCompander, {"init_deadzone_logit": 0.1})
    stats = qc.calculate_unstructured_stats(model)
    pruned = {layer.name: layer.pruning_ratio for layer in stats.layers}
    assert pruned["conv1"] == 0.0
    assert min(r for n, r in pruned.items() if n not in ("conv1", "linear")) > 0.5
    assert qc.unstructured_mac_compression_ratio(stats) > 2.0


def test_unknown_op_is_conservative_and_warned_once(caplog):
    """torch.sin has no rule: the next conv sees no null input although sin(0) = 0."""

    class SinNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 4, 1, bias=False)
            self.b = nn.Conv2d(4, 2, 1, bias=False)

        def forward(self, x):
            return self.b(torch.sin(self.a(x)))

    model = SinNet()
    nn.init.ones_(model.a.weight)
    nn.init.ones_(model.b.weight)
    with torch.no_grad():
        model.a.weight[0] = 0.0
    qc = _comparison(model, (2, 4, 4))
    with caplog.at_level(logging.WARNING, logger="codeq.metrics"):
        first = qc.calculate_stats(model)
        qc.calculate_stats(model)
    by_name = first.by_name()
    assert by_name["a"].null_out == NullChannels({0}, 4)
    assert by_name["b"].null_in == NullChannels.none(4)
    assert first.total_macs == 2 * 3 * 16 + 4 * 2 * 16
    warnings = [r for r in caplog.records if "sin" in r.getMessage()]
    assert len(warnings) == 1


def test_untraceable_model_falls_back_to_each_layer_alone(caplog):
    """Data-dependent control flow defeats torch.fx: a warning, and only own dead filters are counted."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 4, 1, bias=False)
            self.b = nn.Conv2d(4, 2, 1, bias=False)

        def forward(self, x):
            y = self.a(x)
            if y.sum() > 0:
                y = y * 2
            return self.b(y)

    model = Branchy()
    nn.init.ones_(model.a.weight)
    nn.init.ones_(model.b.weight)
    with torch.no_grad():
        model.a.weight[0] = 0.0
    with caplog.at_level(logging.WARNING, logger="codeq.metrics"):
        qc = _comparison(model, (2, 4, 4))
    assert any("cannot trace" in r.getMessage() for r in caplog.records)
    stats = qc.calculate_stats(model)
    assert stats.total_macs == 2 * 3 * 16 + 4 * 2 * 16


def test_grouped_conv_counts_per_group():
    """Depthwise 3x3 after a 1x1 stem whose filter 1 is dead: group 1 has no live input.

    stem: 2·3·1·16 = 96; depthwise: Σ_g live_in·live_out·9·16 = 3·9·16 = 432.
    """
    model = nn.Sequential(nn.Conv2d(2, 4, 1, bias=False), nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False))
    for m in model:
        nn.init.ones_(m.weight)
    with torch.no_grad():
        model[0].weight[1] = 0.0
    qc = _comparison(model, (2, 4, 4))
    stats = qc.calculate_stats(model)
    assert stats.by_name()["1"].null_out == NullChannels({1}, 4)
    assert stats.total_macs == 96 + 432
    assert qc.calculate_unstructured_stats(model).total_macs == (6 + 36) * 16
