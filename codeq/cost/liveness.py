"""Liveness propagation: which channels of every Conv/Linear layer are always zero, through the fx graph.

The model is traced once with torch.fx and run on a zero batch to record every node's output shape.
Null channels are then propagated through the graph: every activation carries a "live" indicator
tensor (non-zero = may be non-zero on some input) that is pushed through each op, so residual adds,
option-A padding, slicing, pooling, flatten and concat are handled by the ops themselves.
BatchNorm/dropout pass the indicator through (the constant offset of a dead channel folds into the
next bias, the usual structured-pruning convention). An op not known to be safe marks its output
all-live (conservative) and is named once in a warning.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import math
import numbers
import operator
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_leaves, tree_map

from codeq.cost.layers import LayerQuantInfo, _in_channels, _null_output_mask
from codeq.quant.parametrize import QUANTIZABLE

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- one traced forward pass


@dataclass(frozen=True)
class _TensorMeta:
    """Shape and dtype of a tensor seen on the recording forward pass."""

    shape: torch.Size
    dtype: torch.dtype


@dataclass(frozen=True)
class LayerCall:
    """One call of a Conv/Linear layer: its fx node (None when untraced) and output positions."""

    name: str
    node: str | None
    spatial: tuple[int, int]


@dataclass
class TracedModel:
    """What one forward pass tells about a model: its graph, every node's output shapes, the layer calls."""

    signature: tuple
    graph: fx.Graph | None
    outputs: dict[str, Any]
    calls: list[LayerCall]
    warned_ops: set[str] = field(default_factory=set)


class _LayerLeafTracer(fx.Tracer):
    """fx tracer that keeps Conv/Linear layers (parametrized ones too) and every BatchNorm (also those defined
    outside torch, e.g. the data-parallel global BatchNorm) as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        leaf = isinstance(m, (*QUANTIZABLE, nn.modules.batchnorm._BatchNorm))
        return leaf or super().is_leaf_module(m, module_qualified_name)


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


def model_signature(model: nn.Module) -> tuple:
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
    """(m_h, m_w): output positions on the batch-of-one probe; Linear: every dim but features, times 1 (the
    leading dim counts too: windowed attention folds its windows into it)."""
    if isinstance(module, nn.Linear):
        return math.prod(out_shape[:-1]), 1
    dims = out_shape[2:]
    return (dims[0] if dims else 1), math.prod(dims[1:])


def _probe_input(model: nn.Module, input_size: tuple[int, ...]) -> torch.Tensor:
    reference = next(iter(model.parameters()), None)
    if reference is None:
        return torch.zeros(1, *input_size)
    return torch.zeros(1, *input_size, device=reference.device, dtype=reference.dtype)


def trace_model(model: nn.Module, input_size: tuple[int, ...]) -> TracedModel:
    """Trace ``model`` with torch.fx and run it once on a zero batch of one to record every shape.

    An untraceable model falls back to forward hooks (spatial sizes only) with a warning: its
    structured count then sees each layer alone.
    """
    signature = model_signature(model)
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
            return TracedModel(signature, None, {}, _hooked_layer_calls(model, x))
    calls = []
    for node in graph.nodes:
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            if isinstance(module, QUANTIZABLE):
                calls.append(LayerCall(node.target, node.name, _spatial(module, interpreter.outputs[node.name].shape)))
    return TracedModel(signature, graph, interpreter.outputs, calls)


def _hooked_layer_calls(model: nn.Module, x: torch.Tensor) -> list[LayerCall]:
    """Layer calls seen by forward hooks on one plain forward pass."""
    calls: list[LayerCall] = []

    def hook_for(name: str):
        return lambda module, inputs, output: calls.append(LayerCall(name, None, _spatial(module, output.shape)))

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
    for call in trace_model(model, tuple(input_size)).calls:
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


class NullPropagation:
    """Pushes live indicators through a traced graph and records each layer call's null channels."""

    def __init__(self, model: nn.Module, traced: TracedModel, infos: dict[str, LayerQuantInfo]):
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
