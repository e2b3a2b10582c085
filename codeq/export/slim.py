"""Physically slimmed models: every dead channel removed, its input-independent value folded into what follows.

A channel the structured analysis calls null (codeq.cost.liveness on the fx graph) carries a value that
does not depend on the input: zero out of a conv whose filter to every live input is zero, then a constant
after BatchNorm (its bias) and ReLU, then whatever fixed map the next layers make of it. So the slimmed model
keeps, at every tensor of the graph, only the live channels, and adds the dead channels' contribution as a
constant: into a layer's bias when it is the same at every position, else as a fixed per-position map (zero
padding makes the border of a 3×3 conv see fewer of a constant input). At a residual add each path is
gathered into the add's live channels (a channel is kept when it is live on either path; the option-A
shortcut's zero padding is never kept), and the dead part of either path is added as a constant.
Outputs stay equal in eval mode, and every Conv/Linear holds exactly the live input × live output weights the
structured MAC count charges for.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_map

from codeq.cost.layers import collect_layer_quant_info
from codeq.cost.liveness import NullPropagation, _LayerLeafTracer, trace_model
from codeq.errors import ConfigError

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
# Modules and functions that act on each channel separately (same channel count in and out).
CHANNELWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
CHANNELWISE_FUNCTIONS = {
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.gelu,
    F.silu,
    F.hardswish,
    F.hardtanh,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    F.dropout,
    F.max_pool1d,
    F.max_pool2d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
}
CHANNELWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}
ADDS = {operator.add, operator.iadd, torch.add}
PADS = {F.pad, torch._C._nn.pad}


class SurgeryError(ConfigError):
    """The model holds an op the surgery cannot slim (named), or its liveness is contradicted by its values."""


@dataclass
class SlimResult:
    """The slimmed model (flat module names, see ``flat_name``), per original layer name its channels in and out
    before and after, and the layers whose folded constant is a per-position map rather than a bias."""

    model: fx.GraphModule
    layer_channels: dict[str, dict[str, int]]
    bias_maps: list[str]


def bake_quantized(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode whose parametrized weights are plain tensors holding their current value.

    The quantizers are gone: the copy computes with the fake-quantized weights and nothing else. (Not
    ``parametrize.remove_parametrizations`` on a deep copy: it edits the parametrized class, which the copy
    shares with ``model``.)
    """
    with torch.no_grad():
        values = {
            name: {tensor: getattr(module, tensor).detach().clone() for tensor in module.parametrizations}
            for name, module in model.named_modules()
            if parametrize.is_parametrized(module)
        }
    baked = copy.deepcopy(model).eval()
    for name, tensors in values.items():
        module = baked.get_submodule(name)
        plain_class = parametrize.type_before_parametrizations(module)
        del module._modules["parametrizations"]
        module.__class__ = plain_class
        for tensor, value in tensors.items():
            setattr(module, tensor, nn.Parameter(value))
    for parameter in baked.parameters():
        parameter.requires_grad_(False)
    return baked


def _op_name(node: fx.Node, model: nn.Module) -> str:
    if node.op == "call_module":
        return type(model.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return getattr(node.target, "__name__", str(node.target))


class _RecordingLiveness(NullPropagation):
    """codeq.cost's null-channel propagation, keeping every node's live indicator instead of only the layers'."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.indicators: dict[str, Any] = {}

    def _live(self, node: fx.Node, args: tuple, kwargs: dict, recorded: Any) -> Any:
        value = super()._live(node, args, kwargs, recorded)
        self.indicators[node.name] = value
        return value


def _live_channels(indicator: torch.Tensor) -> torch.Tensor:
    """Indices of the channels (dim 1) that are live at some position."""
    return indicator.movedim(1, 0).reshape(indicator.shape[1], -1).ne(0).any(1).nonzero().flatten()


def _record_values(graph_module: fx.GraphModule, x: torch.Tensor) -> dict[str, Any]:
    """Every node's output on input ``x``."""
    values: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            values[n.name] = super().run_node(n)
            return values[n.name]

    with torch.no_grad():
        Recorder(graph_module).run(x)
    return values


@dataclass
class _Slim:
    """A tensor of the slimmed graph: its node (None when no channel is kept), the kept channel indices of the
    original tensor, and the original tensor's fixed part (its dropped channels' values, batch of one)."""

    node: fx.Node | None
    kept: torch.Tensor
    fixed: torch.Tensor


class _Surgery:
    """Builds the slimmed graph node by node from the original graph, its values and its live channels."""

    def __init__(self, model: nn.Module, input_size: tuple[int, ...]):
        self.model = model
        self.graph_in = _LayerLeafTracer().trace(model)
        self.traced_in = fx.GraphModule(model, self.graph_in)
        infos = collect_layer_quant_info(model)
        liveness = _RecordingLiveness(model, trace_model(model, input_size), infos)
        liveness.run()
        self.indicators = liveness.indicators
        # batch of two: a zero image and a random one; a dropped channel must hold the same value for both
        probe = torch.stack(
            [torch.zeros(input_size), torch.randn(input_size, generator=torch.Generator().manual_seed(0))]
        )
        self.values = _record_values(self.traced_in, probe.to(next(model.parameters()).device))
        self.graph = fx.Graph()
        self.attributes: dict[str, Any] = {}
        self.layer_channels: dict[str, dict[str, int]] = {}
        self.bias_maps: list[str] = []
        self.env: dict[str, Any] = {}

    # ---- helpers -----------------------------------------------------------------------------
    def _fixed_part(self, node: fx.Node, kept: torch.Tensor) -> torch.Tensor:
        """The node's value on the probe with kept channels zeroed; checks the rest does not depend on the input."""
        value = self.values[node.name]
        dropped = torch.ones(value.shape[1], dtype=torch.bool, device=value.device)
        dropped[kept] = False
        if dropped.any() and not torch.allclose(value[0, dropped], value[1, dropped], rtol=1e-5, atol=1e-6):
            raise SurgeryError(
                f"{_op_name(node, self.model)} ({node.name}): channels the liveness analysis calls dead depend on "
                "the input; this op cannot be slimmed"
            )
        fixed = value[:1].clone()
        fixed[:, kept] = 0
        return fixed

    def _attribute(self, name: str, value: Any) -> fx.Node:
        self.attributes[name] = value
        return self.graph.get_attr(name)

    def _kept_of(self, node: fx.Node) -> torch.Tensor:
        indicator = self.indicators.get(node.name)
        if not isinstance(indicator, torch.Tensor) or indicator.dim() < 2:
            raise SurgeryError(f"{_op_name(node, self.model)} ({node.name}): no channel liveness for this op")
        return _live_channels(indicator)

    def _align(self, source: _Slim, kept: torch.Tensor, name: str) -> fx.Node | None:
        """``source``'s kept channels placed at their positions among ``kept`` (a superset), zero elsewhere."""
        if source.node is None:
            return None
        if torch.equal(source.kept, kept):
            return source.node
        if not set(source.kept.tolist()) <= set(kept.tolist()):
            raise SurgeryError(f"{name}: a live channel of an input is dead in the output; cannot gather")
        position = {int(c): i for i, c in enumerate(source.kept.tolist())}
        zero_slot = len(position)
        index = torch.tensor([position.get(int(c), zero_slot) for c in kept.tolist()], dtype=torch.long)
        ndim = source.fixed.dim()
        padded = self.graph.call_function(F.pad, (source.node, (0, 0) * (ndim - 2) + (0, 1)))
        return self.graph.call_function(torch.index_select, (padded, 1, self._attribute(f"{name}_index", index)))

    def _add_constant(self, node: fx.Node | None, constant: torch.Tensor, name: str) -> fx.Node | None:
        if node is None or not constant.ne(0).any():
            return node
        return self.graph.call_function(operator.add, (node, self._attribute(f"{name}_fixed", _compact(constant))))

    # ---- the rules ---------------------------------------------------------------------------
    def run(self) -> SlimResult:
        for node in self.graph_in.nodes:
            self.env[node.name] = self._slim(node)
        self.graph.lint()
        model = fx.GraphModule(self.attributes, self.graph, class_name="SlimModel")
        return SlimResult(model.eval(), self.layer_channels, self.bias_maps)

    def _slim(self, node: fx.Node) -> Any:
        value = self.values.get(node.name)
        if node.op == "placeholder":
            kept = torch.arange(value.shape[1])
            return _Slim(self.graph.placeholder(node.name), kept, self._fixed_part(node, kept))
        if node.op == "output":
            return self._output(node)
        args = fx.node.map_arg(node.args, lambda n: self.env[n.name])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self.env[n.name])
        if not isinstance(value, torch.Tensor):
            if any(isinstance(a, _Slim) for a in (*args, *kwargs.values())):
                raise SurgeryError(
                    f"{_op_name(node, self.model)} ({node.name}): unsupported op (reads a tensor's shape)"
                )
            return value
        if node.op == "call_module":
            module = self.model.get_submodule(node.target)
            if isinstance(module, LAYERS):
                return self._layer(node, module, args[0])
            if isinstance(module, NORMS):
                return self._norm(node, module, args[0])
            if isinstance(module, CHANNELWISE_MODULES):
                return self._channelwise(
                    node,
                    args[0],
                    lambda x: self.graph.call_module(flat_name(node.target), (x,)),
                    module=copy.deepcopy(module),
                )
            if isinstance(module, nn.Flatten):
                return self._flatten(node, args[0], module.start_dim)
        elif node.op == "call_function":
            if node.target in CHANNELWISE_FUNCTIONS:
                rest = tuple(_plain(a) for a in args[1:])
                return self._channelwise(
                    node, args[0], lambda x: self.graph.call_function(node.target, (x, *rest), tree_map(_plain, kwargs))
                )
            if node.target is torch.flatten:
                return self._flatten(node, args[0], args[1] if len(args) > 1 else kwargs.get("start_dim", 0))
            if node.target is operator.getitem and isinstance(args[0], _Slim):
                return self._getitem(node, args[0], args[1])
            if node.target in PADS:
                return self._pad(node, *args, **kwargs)
            if node.target in ADDS:
                return self._add(node, args, kwargs)
        elif node.op == "call_method":
            if node.target in CHANNELWISE_METHODS:
                return self._channelwise(node, args[0], lambda x: self.graph.call_method(node.target, (x,)))
            if node.target == "flatten":
                return self._flatten(node, args[0], args[1] if len(args) > 1 else kwargs.get("start_dim", 0))
        raise SurgeryError(f"{_op_name(node, self.model)} ({node.name}): unsupported op for channel surgery")

    def _layer(self, node: fx.Node, module: nn.Module, x: _Slim) -> _Slim:
        """Live output rows × live input columns; the dead inputs' fixed contribution becomes the bias."""
        if getattr(module, "groups", 1) != 1:
            raise SurgeryError(f"{type(module).__name__} ({node.target}): grouped convolution is not supported")
        if isinstance(module, nn.Linear) and self.values[node.name].dim() != 2:
            raise SurgeryError(f"Linear ({node.target}): only a [batch, features] input is supported")
        if node.target in self.layer_channels:
            raise SurgeryError(f"{type(module).__name__} ({node.target}): a layer called twice is not supported")
        kept = self._kept_of(node)
        self.layer_channels[node.target] = {
            "in": _in_channels(module),
            "out": module.weight.shape[0],
            "in_kept": len(x.kept),
            "out_kept": len(kept),
        }
        with torch.no_grad():
            constant = module(x.fixed)[:, kept]  # what the dead inputs and the bias give: input-independent
        if len(kept) and x.node is None:
            raise SurgeryError(f"{type(module).__name__} ({node.target}): live outputs but no live input")
        fixed = self._fixed_part(node, kept)
        if not len(kept):
            return _Slim(None, kept, fixed)
        weight = module.weight.detach()[kept][:, x.kept]
        per_position = constant.flatten(2) if constant.dim() > 2 else constant.unsqueeze(-1)
        uniform = bool((per_position == per_position[..., :1]).all())
        slim = _resized(module, len(x.kept), len(kept))
        with torch.no_grad():
            slim.weight.copy_(weight)
            slim.bias.copy_(per_position[0, :, 0] if uniform else torch.zeros(len(kept)))
        self.attributes[flat_name(node.target)] = slim
        out = self.graph.call_module(flat_name(node.target), (x.node,))
        if not uniform:
            self.bias_maps.append(node.target)
            out = self.graph.call_function(operator.add, (out, self._attribute(f"{node.name}_bias_map", constant)))
        return _Slim(out, kept, fixed)

    def _norm(self, node: fx.Node, module: nn.Module, x: _Slim) -> _Slim:
        """BatchNorm (eval) acts per channel: keep the live channels' statistics and affine parameters."""
        kept = self._kept_of(node)
        if not torch.equal(kept, x.kept):
            raise SurgeryError(f"{type(module).__name__} ({node.target}): live channels differ from its input's")
        fixed = self._fixed_part(node, kept)
        if x.node is None:
            return _Slim(None, kept, fixed)
        slim = type(module)(len(kept), eps=module.eps, momentum=module.momentum, affine=module.affine).eval()
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                if getattr(module, name) is not None:
                    getattr(slim, name).copy_(getattr(module, name)[kept])
        self.attributes[flat_name(node.target)] = slim
        return _Slim(self.graph.call_module(flat_name(node.target), (x.node,)), kept, fixed)

    def _channelwise(self, node: fx.Node, x: _Slim, emit: Any, module: nn.Module | None = None) -> _Slim:
        if module is not None:
            self.attributes[flat_name(node.target)] = module
        return _Slim(emit(x.node) if x.node is not None else None, x.kept, self._fixed_part(node, x.kept))

    def _flatten(self, node: fx.Node, x: _Slim, start_dim: int) -> _Slim:
        """flatten(1) of [N, C, *S]: channel c becomes features c·|S| … c·|S| + |S| − 1, in order."""
        shape = self.values[node.args[0].name].shape
        if start_dim != 1:
            raise SurgeryError(f"flatten ({node.name}): only flatten from dim 1 is supported")
        positions = shape[2:].numel()
        kept = (x.kept[:, None] * positions + torch.arange(positions)).flatten()
        emitted = self.graph.call_function(torch.flatten, (x.node, 1)) if x.node is not None else None
        return _Slim(emitted, kept, self._fixed_part(node, kept))

    def _getitem(self, node: fx.Node, x: _Slim, index: Any) -> _Slim:
        """Slicing that leaves the channel dim whole (the option-A shortcut's x[:, :, ::2, ::2])."""
        if not (isinstance(index, tuple) and len(index) > 1 and index[1] == slice(None)):
            raise SurgeryError(f"getitem ({node.name}): only indexing that keeps dim 1 whole is supported")
        emitted = self.graph.call_function(operator.getitem, (x.node, index)) if x.node is not None else None
        return _Slim(emitted, x.kept, self._fixed_part(node, x.kept))

    def _pad(self, node: fx.Node, x: _Slim, pad: tuple, mode: str = "constant", value: float | None = None) -> _Slim:
        """Zero padding; padded channels are dead (never kept), so only the spatial part of the padding remains."""
        ndim = self.values[node.name].dim()
        if mode != "constant" or value not in (None, 0, 0.0) or len(pad) > 2 * (ndim - 1):
            raise SurgeryError(f"pad ({node.name}): only zero padding of channels and positions is supported")
        pad = tuple(pad) + (0,) * (2 * (ndim - 1) - len(pad))
        spatial, (before, _after) = pad[: 2 * (ndim - 2)], pad[2 * (ndim - 2) :]
        kept = x.kept + before
        emitted = x.node
        if x.node is not None and any(spatial):
            emitted = self.graph.call_function(F.pad, (x.node, spatial))
        return _Slim(emitted, kept, self._fixed_part(node, kept))

    def _add(self, node: fx.Node, args: tuple, kwargs: dict) -> _Slim:
        """a + b: each path gathered into the sum's live channels; their dead parts added as one constant."""
        terms = [*args, *(kwargs[k] for k in ("input", "other") if k in kwargs)]
        if len(terms) != 2 or not all(isinstance(t, _Slim) for t in terms) or set(kwargs) - {"input", "other"}:
            raise SurgeryError(f"add ({node.name}): only the sum of two tensors is supported")
        kept = self._kept_of(node)
        parts = [self._align(t, kept, f"{node.name}_{i}") for i, t in enumerate(terms)]
        live = [p for p in parts if p is not None]
        fixed = self._fixed_part(node, kept)
        if not live:
            return _Slim(None, kept, fixed)
        out = live[0] if len(live) == 1 else self.graph.call_function(operator.add, tuple(live))
        constant = (terms[0].fixed + terms[1].fixed)[:, kept]
        return _Slim(self._add_constant(out, constant, node.name), kept, fixed)

    def _output(self, node: fx.Node) -> fx.Node:
        result = self.env[node.args[0].name]
        if not isinstance(result, _Slim) or result.node is None:
            raise SurgeryError("the model's output must be one tensor that depends on the input")
        everything = torch.arange(self.values[node.args[0].name].shape[1])
        out = self._align(result, everything, "output")
        out = self._add_constant(out, result.fixed, "output")
        return self.graph.output(out)


def _compact(constant: torch.Tensor) -> torch.Tensor:
    """``constant`` with its positions collapsed to one when they are all equal: it broadcasts to the same sum."""
    if constant.dim() <= 2:
        return constant
    positions = constant.flatten(2)
    if not bool((positions == positions[..., :1]).all()):
        return constant
    return positions[..., :1].reshape(*constant.shape[:2], *[1] * (constant.dim() - 2)).clone()


def flat_name(name: str) -> str:
    """A module's dotted name as one attribute name of the slimmed model (layer1.0.conv1 -> layer1_0_conv1)."""
    return name.replace(".", "_")


def _plain(value: Any) -> Any:
    if isinstance(value, _Slim):
        raise SurgeryError("a channel-wise op takes a second tensor")
    return value


def _in_channels(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def _resized(module: nn.Module, c_in: int, c_out: int) -> nn.Module:
    """A new layer like ``module`` with ``c_in`` inputs, ``c_out`` outputs and a bias."""
    if isinstance(module, nn.Linear):
        return nn.Linear(c_in, c_out, bias=True)
    return type(module)(
        c_in,
        c_out,
        module.kernel_size,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        bias=True,
        padding_mode=module.padding_mode,
    )


def slim_model(model: nn.Module, input_size: tuple[int, ...]) -> SlimResult:
    """The slimmed copy of ``model`` (quantized weights baked in, eval mode); see the module docstring."""
    baked = bake_quantized(model)
    return _Surgery(baked, tuple(input_size)).run()
