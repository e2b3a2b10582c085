"""Cost accounting on torchvision/timm models and the MLP: dense MACs against torch.utils.flop_counter, attention's
activation-by-activation matmuls counted apart, null channels never claimed where hooks see non-zero values."""

import pytest
import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from codeq.metrics import QuantizationComparison
from codeq.models import mlp, timm_model, torchvision_model
from codeq.quant.parametrize import QUANTIZABLE

SMALL = (3, 32, 32)


def unfused_attention(model: nn.Module) -> nn.Module:
    """timm attention with explicit q·kᵀ and attn·v matmuls, which FlopCounterMode counts (SDPA on CPU it does not)."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model


MODELS = {
    "resnet18": lambda: torchvision_model("resnet18", 10, SMALL),
    "resnet50": lambda: torchvision_model("resnet50", 10, SMALL),
    "mobilenet_v2": lambda: torchvision_model("mobilenet_v2", 10, SMALL),
    "efficientnet_b0": lambda: torchvision_model("efficientnet_b0", 10, SMALL),
    "tiny_vit_5m_224": lambda: unfused_attention(timm_model("tiny_vit_5m_224", 10, SMALL)),
    "mlp": lambda: mlp(10, SMALL, [64, 32]),
}


@pytest.mark.parametrize("name", MODELS)
def test_dense_macs_equal_the_flop_counters(name):
    """Σ dense Conv/Linear MACs + activation matmul MACs = FlopCounterMode's FLOPs / 2 (a MAC is 2 FLOPs)."""
    model = MODELS[name]().eval()
    qc = QuantizationComparison(SMALL)
    baseline = qc.set_baseline(model)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *SMALL))
    assert baseline.total_macs + qc.attention_macs == counter.get_total_flops() // 2
    layers = {n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)}
    assert {layer.name for layer in baseline.layers} == layers
    assert (qc.attention_macs > 0) == (name == "tiny_vit_5m_224")


class TwoAttentions(nn.Module):
    """q, k, v of N tokens and H heads of d dims: one fused (SDPA) and one explicit attention, both 2·H·N²·d MACs."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        fused = nn.functional.scaled_dot_product_attention(q, k, v)
        explicit = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.proj((fused + explicit).transpose(1, 2).reshape(b, n, c))


def test_attention_matmuls_by_hand():
    qc = QuantizationComparison((5, 8))  # 5 tokens of 8 features
    baseline = qc.set_baseline(TwoAttentions())
    # per attention q·kᵀ: H·N·N·d = 2·5·5·4 = 200, attn·v the same; two attentions
    assert qc.attention_macs == 2 * (200 + 200)
    assert baseline.total_macs == 5 * 8 * 24 + 5 * 8 * 8
    # counted at 32 x 32 bits, beside the weight layers: the total convention
    assert qc.attention_bops == 800 * 32 * 32
    assert qc.total_compression_ratio(baseline) == 1.0


def kill_channels(model: nn.Module, fraction: float = 0.5) -> None:
    """Zero the weights (and bias) of the first ``fraction`` of output channels of every other Conv/Linear."""
    layers = [m for m in model.modules() if isinstance(m, QUANTIZABLE)]
    with torch.no_grad():
        for module in layers[1:-1:2]:
            dead = int(module.weight.shape[0] * fraction)
            module.weight[:dead] = 0
            if module.bias is not None:
                module.bias[:dead] = 0


def zero_channels_seen_by_hooks(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per Conv/Linear: (input channels, output channels) that are exactly zero on every call and position."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def channel_zero(t: torch.Tensor, linear: bool) -> torch.Tensor:
        t = t.movedim(-1 if linear else 1, 0)
        return t.reshape(t.shape[0], -1).eq(0).all(1)

    def hook(name, linear):
        def record(module, inputs, output):
            zero_in, zero_out = channel_zero(inputs[0], linear), channel_zero(output, linear)
            if name in seen:
                zero_in, zero_out = zero_in & seen[name][0], zero_out & seen[name][1]
            seen[name] = (zero_in, zero_out)

        return record

    handles = [
        m.register_forward_hook(hook(n, isinstance(m, nn.Linear)))
        for n, m in model.named_modules()
        if isinstance(m, QUANTIZABLE)
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("name", ["vit", "tiny_vit_5m_224", "mobilenet_v2"])
def test_null_channels_are_never_optimistic(name):
    """Every channel the structured count calls null is exactly zero in the hooks' view on random inputs."""
    if name == "vit":  # a small timm ViT: attention, LayerNorm, softmax and reshapes on the traced graph
        model = timm.models.vision_transformer.VisionTransformer(
            img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10
        )
        size = (3, 16, 16)
    else:
        model, size = MODELS[name](), SMALL
    model.eval()
    kill_channels(model)
    qc = QuantizationComparison(size)
    qc.set_baseline(model)
    stats = qc.calculate_stats(model)
    seen = zero_channels_seen_by_hooks(model, torch.randn(4, *size))
    claimed_some = False
    for layer in stats.layers:
        zero_in, zero_out = seen[layer.name]
        assert all(zero_out[i] for i in layer.null_out.indices), layer.name
        assert all(zero_in[i] for i in layer.null_in.indices), layer.name
        claimed_some |= layer.null_out.count > 0
    assert claimed_some


def test_evaluator_reports_both_conventions_for_attention_models():
    """Weight layers only (the paper's) and weight layers + activation matmuls: apart with attention, equal without."""
    from codeq.cost import Evaluator
    from codeq.quant import DeadZoneLDZCompander, attach_weight_quantizers

    for model, size, has_attention in [(TwoAttentions(), (5, 8), True), (mlp(10, (1, 4, 4), [8]), (1, 4, 4), False)]:
        evaluator = Evaluator(model, size)
        attach_weight_quantizers(model, [], DeadZoneLDZCompander, {"fixed_bit_val": 4, "learnable_bit": False})
        result = evaluator.evaluate(model)
        metrics = result.as_metrics()
        for kind in ("structured", "unstructured"):
            paper, total = (
                metrics[f"compression/{kind}_rel_bops_pct"],
                metrics[f"compression/{kind}_total_rel_bops_pct"],
            )
            if has_attention:  # the 32-bit attention matmuls are a floor: the total shrinks less
                assert paper < total < 100
                attention, baseline = evaluator.qc.attention_bops, evaluator.baseline_stats.total_bops
                model_bops = paper / 100 * baseline
                assert total == pytest.approx(100 * (model_bops + attention) / (baseline + attention))
            else:
                assert total == paper
