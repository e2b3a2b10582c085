"""Attach quantizers to Conv/Linear weights as parametrizations, toggle them, compute them stacked."""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

log = logging.getLogger(__name__)

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class FakeQuantParametrization(nn.Module):
    """Weight parametrization: ``quantizer(W)`` while enabled, the latent ``W`` unchanged otherwise."""

    def __init__(self, quantizer: nn.Module, enabled: bool = True):
        super().__init__()
        self.quantizer = quantizer
        self.enabled = enabled
        self.precomputed: torch.Tensor | None = None  # set only inside StackedFakeQuant.cached()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        if self.precomputed is not None:
            return self.precomputed
        return self.quantizer(weight)


def no_quantizer() -> None:
    """quantizer=none: no factory, so no layer is quantized (the dense 32-bit model; the step pays nothing)."""
    return None


def _is_excluded(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def attach_weight_quantizers(
    model: nn.Module,
    exclude_layers: Iterable[str] | None,
    quantizer: Callable[..., nn.Module],
    quantizer_kwargs: dict | None = None,
    enabled: bool = True,
) -> list[str]:
    """Give every Conv/Linear weight its own ``quantizer(**quantizer_kwargs)``, except excluded modules.

    An entry of ``exclude_layers`` excludes a module when it equals the module's full dotted name
    or matches it as a glob (``layer3.*``). Entries matching no module are warned about.
    Returns the names of the quantized modules.
    """
    patterns = list(exclude_layers or [])
    kwargs = dict(quantizer_kwargs or {})
    names = [name for name, _ in model.named_modules()]
    for pattern in patterns:
        if not any(_is_excluded(name, [pattern]) for name in names):
            log.warning("exclude_layers entry %r matches no module of %s", pattern, type(model).__name__)
    attached = []
    for name, module in model.named_modules():
        if not isinstance(module, QUANTIZABLE) or _is_excluded(name, patterns):
            continue
        if parametrize.is_parametrized(module, "weight"):
            raise ValueError(f"layer {name!r} already has a weight parametrization")
        parametrize.register_parametrization(module, "weight", FakeQuantParametrization(quantizer(**kwargs), enabled))
        attached.append(name)
    skipped = [
        name for name, module in model.named_modules() if isinstance(module, QUANTIZABLE) and name not in attached
    ]
    log.info(
        "Attached weight quantizers to %d layers: %s; not quantized: %s",
        len(attached),
        ", ".join(attached),
        ", ".join(skipped) or "none",
    )
    return attached


def fake_quant_of(module: nn.Module) -> FakeQuantParametrization | None:
    """The module's weight FakeQuantParametrization, or None when its weight is not quantized."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations["weight"]:
        if isinstance(p, FakeQuantParametrization):
            return p
    return None


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, FakeQuantParametrization]]:
    """Yield (name, module, parametrization) for every module whose weight has a quantizer."""
    for name, module in model.named_modules():
        fq = fake_quant_of(module)
        if fq is not None:
            yield name, module, fq


def toggle_quantization(model: nn.Module, enabled: bool) -> None:
    """Switch every weight quantizer of ``model`` on or off (off gives back the latent weights)."""
    for _, _, fq in quantized_layers(model):
        fq.enabled = enabled


class StackedFakeQuant:
    """``parametrize.cached()`` for a fake-quantized model, with its quantized weights computed in stacked passes.

    Inside ``cached()`` every quantized weight is computed once, as with ``parametrize.cached()``. Layers whose
    quantizers offer ``quantize_stacked`` and a ``stack_key()`` other than None are quantized together, one call
    per quantizer class, key, dtype and device, with the weights of one shape stacked (ResNet-20's 18 block
    convs: one call, 5 stacks); other quantizers run one by one on first use. The layers are looked up once,
    here: build it after attaching the quantizers.
    """

    def __init__(self, model: nn.Module):
        self.layers = [(fq, module.parametrizations["weight"]) for _, module, fq in quantized_layers(model)]

    def _batches(self) -> list[dict[torch.Size, list[tuple[FakeQuantParametrization, torch.Tensor]]]]:
        """The stackable layers, by quantize_stacked call and, inside one, by weight shape."""
        batches: dict[tuple, dict] = defaultdict(lambda: defaultdict(list))
        for fq, chain in self.layers:
            key = fq.quantizer.stack_key() if hasattr(fq.quantizer, "quantize_stacked") else None
            if fq.enabled and len(chain) == 1 and key is not None:
                w = chain.original
                batches[(type(fq.quantizer), key, w.dtype, w.device)][w.shape].append((fq, w))
        return list(batches.values())

    @contextlib.contextmanager
    def cached(self) -> Iterator[None]:
        """Within: ``module.weight`` of every quantized layer is its quantized weight, computed on entry."""
        with parametrize.cached():
            try:
                for by_shape in self._batches():
                    layers = [layer for same_shape in by_shape.values() for layer in same_shape]
                    stacks = [
                        torch.stack([w for _, w in same_shape])
                        if len(same_shape) > 1
                        else same_shape[0][1].unsqueeze(0)
                        for same_shape in by_shape.values()
                    ]
                    quantizers = [fq.quantizer for fq, _ in layers]
                    w_hats = type(quantizers[0]).quantize_stacked(quantizers, stacks)
                    for (fq, _), w_hat in zip(layers, (row for stack in w_hats for row in stack.unbind(0))):
                        fq.precomputed = w_hat
                yield
            finally:
                for fq, _ in self.layers:
                    fq.precomputed = None
