"""Cost accounting of Conv/Linear networks: structured and unstructured MACs and BOPs.

Structured: ``MACs_l = (c_in − null_in)(c_out − null_out)·k_h·k_w·m_h·m_w`` (per group for grouped
convs). An output channel is null when all its weights to non-null inputs are zero and it has no
non-zero bias. Null channels are propagated through the model's torch.fx graph: every activation
carries a "live" indicator tensor (non-zero = may be non-zero on some input) that is pushed through
each op, so residual adds, option-A padding, slicing, pooling, flatten and concat are handled by the
ops themselves. BatchNorm/dropout pass the indicator through (the constant offset of a dead channel
folds into the next bias, the usual structured-pruning convention). An op not known to be safe
marks its output all-live (conservative) and is named once in a warning.

Unstructured: ``MACs_l = nnz(W_l)·m_h·m_w`` (the CoDeQ paper's count).
Both: ``BOPs_l = MACs_l·b_w·b_a``, b_w = the layer's learned bit-width (32 when not quantized),
b_a = 32. The baseline is the dense 32-bit model; a compression ratio is baseline / model.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import math
import numbers
import operator
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_leaves, tree_map

from codeq.quant.parametrize import QUANTIZABLE, StackedFakeQuant, fake_quant_of

log = logging.getLogger(__name__)

UNQUANTIZED_BITS = 32.0


# --------------------------------------------------------------------------- public data types


@dataclass(frozen=True)
class NullChannels:
    """The set of channel indices (out of ``total``) that are always zero."""

    indices: frozenset[int]
    total: int

    def __post_init__(self) -> None:
        indices = frozenset(int(i) for i in self.indices)
        if any(not 0 <= i < self.total for i in indices):
            raise ValueError(f"null channel indices must lie in [0, {self.total}), got {sorted(indices)}")
        object.__setattr__(self, "indices", indices)

    @classmethod
    def none(cls, total: int) -> NullChannels:
        """No channel is null."""
        return cls(frozenset(), total)

    @classmethod
    def all(cls, total: int) -> NullChannels:
        """Every channel is null."""
        return cls(frozenset(range(total)), total)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> NullChannels:
        """From a boolean mask, True = null."""
        return cls(frozenset(mask.nonzero().flatten().tolist()), mask.numel())

    @property
    def count(self) -> int:
        return len(self.indices)

    @property
    def ratio(self) -> float:
        """Fraction of channels that are null (0 for an empty layer)."""
        return self.count / self.total if self.total else 0.0

    def intersect(self, other: NullChannels) -> NullChannels:
        """Channels null in both (a residual add keeps a channel null only if null on every input)."""
        if other.total != self.total:
            raise ValueError(f"cannot intersect null channels of {self.total} and {other.total} channels")
        return NullChannels(self.indices & other.indices, self.total)

    def mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Boolean mask of length ``total``, True = null."""
        mask = torch.zeros(self.total, dtype=torch.bool, device=device)
        if self.indices:
            mask[sorted(self.indices)] = True
        return mask


@dataclass(frozen=True)
class LayerQuantInfo:
    """A layer's effective (quantized when a quantizer is attached and enabled) weight and its bit-width."""

    bitwidth: float
    weight: torch.Tensor
    bias: torch.Tensor | None = None


@dataclass(frozen=True)
class LayerStats:
    """Cost of one Conv/Linear layer; ``spatial`` = (m_h, m_w), the output positions of its (first) call."""

    name: str
    macs: int
    bops: float
    bitwidth: float
    pruning_ratio: float
    null_out: NullChannels
    null_in: NullChannels
    spatial: tuple[int, int]
    kernel_size: tuple[int, ...]


@dataclass(frozen=True)
class ModelStats:
    """Per-layer costs (in execution order) and their totals."""

    layers: list[LayerStats]
    total_macs: int
    total_bops: float

    def by_name(self) -> dict[str, LayerStats]:
        return {layer.name: layer for layer in self.layers}


# --------------------------------------------------------------------------- per-layer helpers


def _get_layer_quant_info(module: nn.Module) -> LayerQuantInfo:
    """Effective weight (``module.weight``: quantized when a FakeQuantParametrization is attached and
    enabled) and bit-width (the quantizer's ``get_bitwidth()`` then, else 32)."""
    fq = fake_quant_of(module)
    bitwidth = UNQUANTIZED_BITS
    if fq is not None and fq.enabled:
        get_bitwidth = getattr(fq.quantizer, "get_bitwidth", None)
        if get_bitwidth is None:
            raise TypeError(f"quantizer {type(fq.quantizer).__name__} has no get_bitwidth(); BOPs need it")
        bitwidth = float(get_bitwidth())
    bias = getattr(module, "bias", None)
    return LayerQuantInfo(
        bitwidth=bitwidth,
        weight=module.weight.detach(),
        bias=bias.detach() if isinstance(bias, torch.Tensor) else None,
    )


def collect_layer_quant_info(model: nn.Module) -> dict[str, LayerQuantInfo]:
    """``_get_layer_quant_info`` of every Conv/Linear layer, the quantized weights computed once, stacked."""
    with torch.no_grad(), StackedFakeQuant(model).cached():
        return {name: _get_layer_quant_info(m) for name, m in model.named_modules() if isinstance(m, QUANTIZABLE)}


def _groups(weight: torch.Tensor, c_in: int) -> int:
    """Number of conv groups: the weight holds ``c_in / groups`` input channels per filter."""
    return c_in // weight.shape[1]


def _null_output_mask(weight: torch.Tensor, null_in: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """True for output channels whose weights to every non-null input are zero (and whose bias is zero)."""
    c_out, c_in_per_group = weight.shape[0], weight.shape[1]
    groups = _groups(weight, null_in.numel())
    connected = weight.reshape(c_out, c_in_per_group, -1).ne(0).any(-1)
    live_in = (~null_in).view(groups, c_in_per_group).repeat_interleave(c_out // groups, dim=0)
    live_out = (connected & live_in).any(1)
    if bias is not None:
        live_out = live_out | bias.ne(0)
    return ~live_out


def _effective_macs(
    weight: torch.Tensor, null_in: torch.Tensor, null_out: torch.Tensor, positions: int
) -> torch.Tensor:
    """Σ_groups (c_in − null_in)(c_out − null_out) · k · positions, as a 0-d tensor."""
    groups = _groups(weight, null_in.numel())
    live_in = (~null_in).view(groups, -1).sum(1)
    live_out = (~null_out).view(groups, -1).sum(1)
    return (live_in * live_out).sum() * weight[0, 0].numel() * positions


def _compute_null_output_channels(
    weight: torch.Tensor, null_in: NullChannels, bias: torch.Tensor | None = None
) -> NullChannels:
    """Output channels that are always zero given the null input channels (see ``_null_output_mask``)."""
    return NullChannels.from_mask(_null_output_mask(weight, null_in.mask(weight.device), bias))


def _compute_effective_macs(
    weight: torch.Tensor, null_in: NullChannels, null_out: NullChannels, m_h: int, m_w: int
) -> int:
    """Structured MACs: (c_in − null_in)(c_out − null_out)·k_h·k_w·m_h·m_w (summed per group)."""
    device = weight.device
    return int(_effective_macs(weight, null_in.mask(device), null_out.mask(device), m_h * m_w))


def _compute_unstructured_macs(weight: torch.Tensor, m_h: int, m_w: int) -> int:
    """Unstructured MACs: every non-zero weight costs one MAC per output position, nnz(W)·m_h·m_w."""
    return int(weight.ne(0).sum()) * m_h * m_w


# --------------------------------------------------------------------------- one traced forward pass


@dataclass(frozen=True)
class _TensorMeta:
    """Shape and dtype of a tensor seen on the recording forward pass."""

    shape: torch.Size
    dtype: torch.dtype


@dataclass(frozen=True)
class _LayerCall:
    """One call of a Conv/Linear layer: its fx node (None when untraced) and output positions."""

    name: str
    node: str | None
    spatial: tuple[int, int]


@dataclass
class _TracedModel:
    """What one forward pass tells about a model: its graph, every node's output shapes, the layer calls."""

    signature: tuple
    graph: fx.Graph | None
    outputs: dict[str, Any]
    calls: list[_LayerCall]
    warned_ops: set[str] = field(default_factory=set)


class _LayerLeafTracer(fx.Tracer):
    """fx tracer that keeps Conv/Linear layers (parametrized ones too) as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, QUANTIZABLE) or super().is_leaf_module(m, module_qualified_name)


class _RecordingInterpreter(fx.Interpreter):
    """Runs the traced graph once, remembering each node's output with tensors reduced to shape/dtype."""

    def __init__(self, module: fx.GraphModule):
        super().__init__(module)
        self.outputs: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.outputs[n.name] = tree_map(
            lambda v: _TensorMeta(v.shape, v.dtype) if isinstance(v, torch.Tensor) else v, result
        )
        return result


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no BatchNorm statistics updates) for the duration, then every module's flag restored."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def _signature(model: nn.Module) -> tuple:
    """Module names, their classes before parametrization and the latent weight shapes of Conv/Linear."""
    entries = []
    for name, m in model.named_modules():
        if "parametrizations" in name.split("."):
            continue
        shape = None
        if isinstance(m, QUANTIZABLE):
            latent = m.parametrizations["weight"].original if parametrize.is_parametrized(m, "weight") else m.weight
            shape = tuple(latent.shape)
        entries.append((name, parametrize.type_before_parametrizations(m), shape))
    return tuple(entries)


def _spatial(module: nn.Module, out_shape: torch.Size) -> tuple[int, int]:
    """(m_h, m_w): output positions; Linear: every leading dim but batch and features, times 1."""
    if isinstance(module, nn.Linear):
        return math.prod(out_shape[1:-1]), 1
    dims = out_shape[2:]
    return (dims[0] if dims else 1), math.prod(dims[1:])


def _probe_input(model: nn.Module, input_size: tuple[int, ...]) -> torch.Tensor:
    reference = next(iter(model.parameters()), None)
    if reference is None:
        return torch.zeros(1, *input_size)
    return torch.zeros(1, *input_size, device=reference.device, dtype=reference.dtype)


def _trace_model(model: nn.Module, input_size: tuple[int, ...]) -> _TracedModel:
    """Trace ``model`` with torch.fx and run it once on a zero batch of one to record every shape.

    An untraceable model falls back to forward hooks (spatial sizes only) with a warning: its
    structured count then sees each layer alone.
    """
    signature = _signature(model)
    x = _probe_input(model, input_size)
    with _eval_mode(model), torch.no_grad():
        try:
            graph = _LayerLeafTracer().trace(model)
            interpreter = _RecordingInterpreter(fx.GraphModule(model, graph))
            interpreter.run(x)
        except Exception as exc:  # noqa: BLE001 - any tracing failure gets the hook fallback
            log.warning(
                "torch.fx cannot trace %s (%s: %s); structured MACs count only each layer's own dead filters",
                type(model).__name__,
                type(exc).__name__,
                exc,
            )
            return _TracedModel(signature, None, {}, _hooked_layer_calls(model, x))
    calls = []
    for node in graph.nodes:
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            if isinstance(module, QUANTIZABLE):
                calls.append(_LayerCall(node.target, node.name, _spatial(module, interpreter.outputs[node.name].shape)))
    return _TracedModel(signature, graph, interpreter.outputs, calls)


def _hooked_layer_calls(model: nn.Module, x: torch.Tensor) -> list[_LayerCall]:
    """Layer calls seen by forward hooks on one plain forward pass."""
    calls: list[_LayerCall] = []

    def hook_for(name: str):
        return lambda module, inputs, output: calls.append(_LayerCall(name, None, _spatial(module, output.shape)))

    handles = [m.register_forward_hook(hook_for(n)) for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _get_spatial_dims(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, tuple[int, int]]:
    """(m_h, m_w) of every Conv/Linear layer reached by a forward pass on a ``(1, *input_size)`` input."""
    spatial: dict[str, tuple[int, int]] = {}
    for call in _trace_model(model, tuple(input_size)).calls:
        spatial.setdefault(call.name, call.spatial)
    return spatial


# --------------------------------------------------------------------------- null-channel propagation


def _existing(owner: Any, names: Iterable[str]) -> list[Any]:
    return [getattr(owner, n) for n in names if hasattr(owner, n)]


_POOL_NAMES = [
    f"{kind}{d}d" for kind in ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool") for d in (1, 2, 3)
]

# How each op transforms live indicators:
#   identity: the first argument's indicator passes unchanged (dropout, batch norm: the usual convention);
#   pass:     the op itself runs on the indicators: it moves, copies, pads, pools or sums values and
#             maps positive to positive (activations, pooling, reshapes, slicing, concat, zero padding);
#   sum:      a ± b is live where either term is live (a constant ≠ 0 makes everything live);
#   product:  the op on magnitudes (a·b is null where either factor is);
#   div:      a / b is live where a is.
_FUNCTION_RULES: dict[Any, str] = {
    **{
        f: "identity"
        for f in _existing(
            F,
            [
                "dropout",
                "dropout1d",
                "dropout2d",
                "dropout3d",
                "alpha_dropout",
                "feature_alpha_dropout",
                "batch_norm",
                "instance_norm",
            ],
        )
    },
    **{
        f: "pass"
        for f in _existing(
            F,
            [
                "relu",
                "relu6",
                "leaky_relu",
                "elu",
                "selu",
                "celu",
                "gelu",
                "silu",
                "mish",
                "hardswish",
                "hardtanh",
                "tanh",
                "sigmoid",
                "softplus",
                "pad",
                "interpolate",
                "pixel_shuffle",
                "pixel_unshuffle",
                *_POOL_NAMES,
            ],
        )
    },
    **{
        f: "pass"
        for f in _existing(
            torch,
            [
                "relu",
                "tanh",
                "sigmoid",
                "flatten",
                "cat",
                "concat",
                "concatenate",
                "stack",
                "reshape",
                "permute",
                "transpose",
                "squeeze",
                "unsqueeze",
                "chunk",
                "split",
                "unbind",
                "narrow",
                "flip",
                "roll",
                "mean",
                "sum",
                "clone",
                "max_pool1d",
                "max_pool2d",
                "avg_pool1d",
                "adaptive_avg_pool1d",
                "adaptive_max_pool1d",
            ],
        )
    },
    **{f: "pass" for f in [*_existing(torch._C._nn, ["pad"]), operator.getitem, builtins.getattr]},
    **{f: "sum" for f in [operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub]},
    **{
        f: "product"
        for f in [operator.mul, operator.imul, operator.matmul, torch.mul, torch.matmul, torch.bmm, torch.mm]
    },
    **{f: "div" for f in [operator.truediv, operator.itruediv, torch.div, torch.true_divide]},
}
# Functions of optional libraries, by qualified name (no import needed to recognise them).
_FUNCTION_RULES_BY_NAME: dict[str, str] = {
    "torchvision.ops.stochastic_depth.stochastic_depth": "identity",  # drops whole samples, like dropout
}
# Tensor methods by name (an in-place method ``x.add_`` follows the rule of ``x.add``).
_METHOD_RULES: dict[str, str] = {
    **{
        m: "pass"
        for m in [
            "view",
            "view_as",
            "reshape",
            "reshape_as",
            "flatten",
            "unflatten",
            "permute",
            "transpose",
            "t",
            "contiguous",
            "squeeze",
            "unsqueeze",
            "chunk",
            "split",
            "unbind",
            "expand",
            "expand_as",
            "repeat",
            "narrow",
            "relu",
            "tanh",
            "sigmoid",
            "mean",
            "sum",
            "flip",
            "roll",
            "to",
            "float",
            "double",
            "half",
            "type_as",
            "clone",
            "detach",
        ]
    },
    **{m: "sum" for m in ["add", "sub"]},
    **{m: "product" for m in ["mul", "matmul", "mm", "bmm"]},
    **{m: "div" for m in ["div", "true_divide"]},
}
_IDENTITY_MODULES = tuple(
    [nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.Identity]
    + _existing(nn, ["Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout"])
)
_PASS_MODULES = tuple(
    _existing(
        nn,
        [
            "ReLU",
            "ReLU6",
            "LeakyReLU",
            "ELU",
            "SELU",
            "CELU",
            "GELU",
            "SiLU",
            "Mish",
            "Hardswish",
            "Hardtanh",
            "Tanh",
            "Sigmoid",
            "Softplus",
            "Flatten",
            "Unflatten",
            "Upsample",
            "UpsamplingNearest2d",
            "UpsamplingBilinear2d",
            "PixelShuffle",
            "PixelUnshuffle",
            "ChannelShuffle",
        ],
    )
    + [
        getattr(nn, f"{kind}{d}d")
        for kind in (
            "MaxPool",
            "AvgPool",
            "AdaptiveAvgPool",
            "AdaptiveMaxPool",
            "ZeroPad",
            "ConstantPad",
            "ReflectionPad",
            "ReplicationPad",
        )
        for d in (1, 2, 3)
        if hasattr(nn, f"{kind}{d}d")
    ]
)


def _binarize(value: Any) -> Any:
    """Floating tensors -> 1.0 where non-zero (live), 0.0 elsewhere; other values unchanged."""
    return tree_map(
        lambda v: v.ne(0).to(v.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v, value
    )


def _all_live(recorded: Any, device: torch.device) -> Any:
    """The recorded output with every tensor replaced by ones (nothing known to be null)."""
    return tree_map(lambda v: torch.ones(v.shape, device=device) if isinstance(v, _TensorMeta) else v, recorded)


def _same_shapes(value: Any, recorded: Any) -> bool:
    got = [tuple(v.shape) for v in tree_leaves(value) if isinstance(v, torch.Tensor)]
    want = [tuple(v.shape) for v in tree_leaves(recorded) if isinstance(v, _TensorMeta)]
    return got == want


def _magnitude(value: Any) -> Any:
    return abs(value) if isinstance(value, (torch.Tensor, numbers.Number)) and not isinstance(value, bool) else value


def _live_sum(*terms: Any) -> torch.Tensor:
    """a ± b is live where either term is (scalar constants other than 0 make everything live)."""
    total: Any = 0
    for term in terms:
        if isinstance(term, (torch.Tensor, numbers.Number)):
            total = total + _magnitude(term)
    return total


def _live_quotient(numerator: Any, denominator: Any) -> Any:
    """a / b is live where a is (division by a null value or by 0 gives inf/nan: live)."""
    if not isinstance(numerator, torch.Tensor):
        return torch.ones_like(denominator)
    if isinstance(denominator, torch.Tensor):
        return numerator * torch.ones_like(denominator)
    return numerator / abs(denominator)


class _NullPropagation:
    """Pushes live indicators through a traced graph and records each layer call's null channels."""

    def __init__(self, model: nn.Module, traced: _TracedModel, infos: dict[str, LayerQuantInfo]):
        self.model = model
        self.traced = traced
        self.infos = infos
        self.device = next(iter(infos.values())).weight.device
        self.unknown: set[str] = set()
        self.layer_nulls: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def run(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Maps each layer-call node name to its (null_in, null_out) boolean masks."""
        env: dict[fx.Node, Any] = {}
        for node in self.traced.graph.nodes:
            if node.op == "output":
                break
            recorded = self.traced.outputs[node.name]
            if not any(isinstance(v, _TensorMeta) for v in tree_leaves(recorded)):
                env[node] = recorded  # sizes, dims, dtypes: independent of the weights
                continue
            args = fx.node.map_arg(node.args, env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
            env[node] = self._live(node, args, kwargs, recorded)
        return self.layer_nulls

    def _live(self, node: fx.Node, args: tuple, kwargs: dict, recorded: Any) -> Any:
        """The node's output indicator, by the rule for its op."""
        if node.op == "placeholder":
            return _all_live(recorded, self.device)
        if node.op == "get_attr":
            attr = self.model
            for part in node.target.split("."):
                attr = getattr(attr, part)
            return _binarize(attr.detach()) if isinstance(attr, torch.Tensor) else attr
        if node.op == "call_module":
            module = self.model.get_submodule(node.target)
            if isinstance(module, QUANTIZABLE):
                return self._layer(node, module, args[0], recorded)
            if isinstance(module, _IDENTITY_MODULES):
                return args[0]
            if isinstance(module, _PASS_MODULES):
                clones = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)  # inplace=True
                return self._apply(type(module).__name__, lambda: module(*clones, **kwargs), recorded)
            return self._unknown(type(module).__name__, recorded)
        if node.op == "call_function":
            name = getattr(node.target, "__name__", str(node.target))
            qualified = f"{getattr(node.target, '__module__', '')}.{getattr(node.target, '__qualname__', '')}"
            rule = _FUNCTION_RULES.get(node.target) or _FUNCTION_RULES_BY_NAME.get(qualified)
            fn = node.target
            kwargs = {**kwargs, "inplace": False} if "inplace" in kwargs else kwargs
        else:  # call_method
            method = node.target[:-1] if node.target.endswith("_") and not node.target.startswith("__") else node.target
            name, rule, fn = f"Tensor.{node.target}", _METHOD_RULES.get(method), getattr(torch.Tensor, method, None)
        if rule is None or fn is None:
            return self._unknown(name, recorded)
        if rule == "identity":
            return args[0] if args else kwargs["input"]
        if rule == "sum":
            terms = [*args, *(kwargs[k] for k in ("input", "other") if k in kwargs)]
            return self._apply(name, lambda: _live_sum(*terms), recorded)
        if rule == "product":
            magnitudes = {k: _magnitude(v) for k, v in kwargs.items()}
            return self._apply(name, lambda: fn(*map(_magnitude, args), **magnitudes), recorded)
        if rule == "div":
            return self._apply(name, lambda: _live_quotient(*args[:2]), recorded)
        return self._apply(name, lambda: fn(*args, **kwargs), recorded)

    def _apply(self, name: str, compute: Callable[[], Any], recorded: Any) -> Any:
        """Run an op on live indicators; a failure or a shape surprise makes it an unknown op."""
        try:
            value = compute()
        except Exception:  # noqa: BLE001 - an op that rejects indicators is treated conservatively
            return self._unknown(name, recorded)
        if not _same_shapes(value, recorded):
            return self._unknown(name, recorded)
        return _binarize(value)

    def _unknown(self, name: str, recorded: Any) -> Any:
        """No rule for this op: every output channel counts as live."""
        self.unknown.add(name)
        return _all_live(recorded, self.device)

    def _layer(self, node: fx.Node, module: nn.Module, x: Any, recorded: _TensorMeta) -> torch.Tensor:
        """Null inputs = channels dead at every position; null outputs by ``_null_output_mask``."""
        info = self.infos[node.target]
        channel_dim = -1 if isinstance(module, nn.Linear) else 1
        c_in = _in_channels(module)
        if isinstance(x, torch.Tensor):
            null_in = ~x.movedim(channel_dim, 0).reshape(c_in, -1).ne(0).any(1)
        else:
            null_in = torch.zeros(c_in, dtype=torch.bool, device=self.device)
        null_out = _null_output_mask(info.weight, null_in, info.bias)
        self.layer_nulls[node.name] = (null_in, null_out)
        view = [1] * len(recorded.shape)
        view[channel_dim] = null_out.numel()
        return (~null_out).to(torch.float32).view(view).expand(recorded.shape).contiguous()


# --------------------------------------------------------------------------- model-level comparison


class QuantizationComparison:
    """Structured and unstructured MACs/BOPs of models against a dense 32-bit baseline.

    Usage: ``qc = QuantizationComparison((3, 32, 32)); qc.set_baseline(model);
    qc.compression_ratio(qc.calculate_stats(model))``. The traced forward pass is cached per model
    object and re-done only when its module names, classes or weight shapes change.
    """

    def __init__(self, input_size: tuple[int, ...], b_a: int = 32):
        self.input_size = tuple(input_size)
        self.b_a = b_a
        self.baseline_stats: ModelStats | None = None
        self._traces: weakref.WeakKeyDictionary[nn.Module, _TracedModel] = weakref.WeakKeyDictionary()

    def _traced(self, model: nn.Module) -> _TracedModel:
        traced = self._traces.get(model)
        if traced is None or traced.signature != _signature(model):
            traced = _trace_model(model, self.input_size)
            self._traces[model] = traced
        return traced

    def set_baseline(self, model: nn.Module) -> ModelStats:
        """Dense 32-bit cost of ``model``'s layers: every weight counted, b_w = 32. Returns the stats."""
        traced = self._traced(model)
        if not traced.calls:
            raise ValueError(f"{type(model).__name__} has no Conv/Linear layer reached by a forward pass")
        latent_shapes = {name: shape for name, _, shape in traced.signature if shape is not None}
        layers = []
        for name, calls in _calls_by_layer(traced.calls).items():
            shape = latent_shapes[name]
            macs = math.prod(shape) * _positions(calls)
            layers.append(
                LayerStats(
                    name=name,
                    macs=macs,
                    bops=float(macs * UNQUANTIZED_BITS * self.b_a),
                    bitwidth=UNQUANTIZED_BITS,
                    pruning_ratio=0.0,
                    null_out=NullChannels.none(shape[0]),
                    null_in=NullChannels.none(_in_channels(model.get_submodule(name))),
                    spatial=calls[0].spatial,
                    kernel_size=tuple(shape[2:]) or (1, 1),
                )
            )
        self.baseline_stats = _model_stats(layers)
        return self.baseline_stats

    def calculate_stats(self, model: nn.Module, layer_info: dict[str, LayerQuantInfo] | None = None) -> ModelStats:
        """Structured cost: null channels propagated through the graph, then the structured MAC formula."""
        traced = self._traced(model)
        infos = layer_info if layer_info is not None else collect_layer_quant_info(model)
        by_layer = _calls_by_layer(traced.calls)
        with torch.no_grad():
            nulls = self._propagate(model, traced, infos)
            per_layer = {}
            for name, calls in by_layer.items():
                info, c_in = infos[name], _in_channels(model.get_submodule(name))
                call_nulls = [nulls.get(call.node) or _alone(info, c_in) for call in calls]
                macs = sum(
                    _effective_macs(info.weight, n_in, n_out, call.spatial[0] * call.spatial[1])
                    for (n_in, n_out), call in zip(call_nulls, calls)
                )
                null_in = torch.stack([n_in for n_in, _ in call_nulls]).all(0)
                null_out = torch.stack([n_out for _, n_out in call_nulls]).all(0)
                per_layer[name] = (macs, null_in, null_out)
            counts = torch.stack([macs for macs, _, _ in per_layer.values()]).tolist() if per_layer else []
        layers = []
        for (name, (_, null_in, null_out)), macs in zip(per_layer.items(), counts):
            info, calls = infos[name], by_layer[name]
            dense = info.weight.numel() * _positions(calls)
            layers.append(
                LayerStats(
                    name=name,
                    macs=macs,
                    bops=float(macs * info.bitwidth * self.b_a),
                    bitwidth=info.bitwidth,
                    pruning_ratio=1.0 - macs / dense if dense else 0.0,
                    null_out=NullChannels.from_mask(null_out),
                    null_in=NullChannels.from_mask(null_in),
                    spatial=calls[0].spatial,
                    kernel_size=_kernel_size(info.weight),
                )
            )
        return _model_stats(layers)

    def calculate_unstructured_stats(
        self, model: nn.Module, layer_info: dict[str, LayerQuantInfo] | None = None
    ) -> ModelStats:
        """Unstructured cost: nnz(W)·m_h·m_w per layer; pruning_ratio = fraction of zero weights."""
        traced = self._traced(model)
        infos = layer_info if layer_info is not None else collect_layer_quant_info(model)
        by_layer = _calls_by_layer(traced.calls)
        with torch.no_grad():
            nnz = torch.stack([infos[name].weight.ne(0).sum() for name in by_layer]).tolist() if by_layer else []
        layers = []
        for (name, calls), nonzero in zip(by_layer.items(), nnz):
            info = infos[name]
            macs = nonzero * _positions(calls)
            numel = info.weight.numel()
            layers.append(
                LayerStats(
                    name=name,
                    macs=macs,
                    bops=float(macs * info.bitwidth * self.b_a),
                    bitwidth=info.bitwidth,
                    pruning_ratio=1.0 - nonzero / numel if numel else 0.0,
                    null_out=NullChannels.none(info.weight.shape[0]),
                    null_in=NullChannels.none(_in_channels(model.get_submodule(name))),
                    spatial=calls[0].spatial,
                    kernel_size=_kernel_size(info.weight),
                )
            )
        return _model_stats(layers)

    def compression_ratio(self, stats: ModelStats) -> float:
        """Structured BOPs compression: baseline BOPs / BOPs (inf when nothing is left)."""
        return _ratio(self._baseline(stats).total_bops, stats.total_bops)

    def mac_compression_ratio(self, stats: ModelStats) -> float:
        """Structured MAC compression: baseline MACs / MACs (inf when nothing is left)."""
        return _ratio(self._baseline(stats).total_macs, stats.total_macs)

    def unstructured_compression_ratio(self, stats: ModelStats) -> float:
        """Unstructured BOPs compression: baseline BOPs / unstructured BOPs."""
        return _ratio(self._baseline(stats).total_bops, stats.total_bops)

    def unstructured_mac_compression_ratio(self, stats: ModelStats) -> float:
        """Unstructured MAC compression: baseline MACs / unstructured MACs."""
        return _ratio(self._baseline(stats).total_macs, stats.total_macs)

    def _baseline(self, stats: ModelStats) -> ModelStats:
        """The baseline stats, after checking that ``stats`` describes the same layers."""
        if self.baseline_stats is None:
            raise RuntimeError("QuantizationComparison: call set_baseline(model) before asking for a ratio")
        _check_same_layers(self.baseline_stats, stats)
        return self.baseline_stats

    def _propagate(
        self, model: nn.Module, traced: _TracedModel, infos: dict[str, LayerQuantInfo]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if traced.graph is None or not infos:
            return {}
        propagation = _NullPropagation(model, traced, infos)
        nulls = propagation.run()
        new_unknown = propagation.unknown - traced.warned_ops
        if new_unknown:
            log.warning(
                "Structured MACs: outputs of ops with no null-channel rule are treated as all-live (conservative): %s",
                ", ".join(sorted(new_unknown)),
            )
            traced.warned_ops |= new_unknown
        return nulls


def _in_channels(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def _alone(info: LayerQuantInfo, c_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Untraced layer: no input known null; outputs null only by the layer's own zero filters."""
    null_in = torch.zeros(c_in, dtype=torch.bool, device=info.weight.device)
    return null_in, _null_output_mask(info.weight, null_in, info.bias)


def _calls_by_layer(calls: list[_LayerCall]) -> dict[str, list[_LayerCall]]:
    grouped: dict[str, list[_LayerCall]] = {}
    for call in calls:
        grouped.setdefault(call.name, []).append(call)
    return grouped


def _positions(calls: list[_LayerCall]) -> int:
    """Output positions m_h·m_w summed over a layer's calls."""
    return sum(call.spatial[0] * call.spatial[1] for call in calls)


def _kernel_size(weight: torch.Tensor) -> tuple[int, ...]:
    return tuple(weight.shape[2:]) or (1, 1)


def _model_stats(layers: list[LayerStats]) -> ModelStats:
    return ModelStats(
        layers=layers, total_macs=sum(layer.macs for layer in layers), total_bops=sum(layer.bops for layer in layers)
    )


def _ratio(baseline: float, value: float) -> float:
    return baseline / value if value else math.inf


def _check_same_layers(baseline: ModelStats, stats: ModelStats) -> None:
    """One clear error when the compared model's layers are not the baseline's."""

    def shapes(s: ModelStats) -> dict[str, tuple]:
        return {x.name: (x.null_in.total, x.null_out.total, x.kernel_size, x.spatial) for x in s.layers}

    base, other = shapes(baseline), shapes(stats)
    if base == other:
        return
    missing = sorted(set(base) - set(other))
    extra = sorted(set(other) - set(base))
    changed = sorted(n for n in set(base) & set(other) if base[n] != other[n])
    raise ValueError(
        "model layers differ from the baseline's (in/out channels, kernel, output size): "
        f"missing {missing}, extra {extra}, changed {changed}"
    )
