"""The training step and the test pass: how the model runs, separate from the loop around it.

The step is the method in one function: ``loss = CE + λ·s(e)·sparsity(model)``, backward, optimizer step.
The quantized weights are computed once per step (every quantizer runs once, even when the sparsity loss
reads the weights again): stacked per weight shape in eager mode, by torch.compile when compiling.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from codeq.quant import StackedFakeQuant
from codeq.sparsity import Proximal, SparsityLoss

Batch = tuple[torch.Tensor, torch.Tensor]


def weights_lr(optimizer: torch.optim.Optimizer) -> float:
    """The current learning rate of the group named "weights" (else the first group): a proximal step's lr."""
    groups = optimizer.param_groups
    return next((g["lr"] for g in groups if g.get("name") == "weights"), groups[0]["lr"])


class TrainingStep:
    """One optimizer step on a batch, and the quantized test pass, for ``model`` under ``optimizer``.

    ``sparsity_fn`` is the sparsity option: a loss (added as strength·loss), a ``codeq.sparsity.Proximal`` step (run
    after the optimizer step with η = strength·lr, lr of the weights' group), or None: no sparsity term at all
    (nothing is computed for it). ``compile`` runs the
    model through torch.compile; ``precision`` "bf16" autocasts; ``channels_last`` re-lays the inputs.
    ``forward`` is the module the batches go through, by default ``model``; data-parallel, ``model`` under
    DistributedDataParallel (which averages the gradients over ranks in ``backward``).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        sparsity_fn: SparsityLoss | Proximal | None = None,
        *,
        compile: bool = False,
        precision: str = "fp32",
        channels_last: bool = False,
        forward: nn.Module | None = None,
    ):
        self.model = model
        self.optimizer = optimizer
        self.sparsity_fn = None if isinstance(sparsity_fn, Proximal) else sparsity_fn
        self.proximal = sparsity_fn if isinstance(sparsity_fn, Proximal) else None
        forward = model if forward is None else forward
        self.forward = torch.compile(forward) if compile else forward
        # each step's quantized weights, computed once; eager stacks like layers, torch.compile fuses them itself
        self.quantized_weights = parametrize.cached if compile else StackedFakeQuant(model).cached
        self.precision = precision
        self.channels_last = channels_last

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, strength: float, mean_over: float | None = None
    ) -> torch.Tensor:
        """forward → CE + strength·sparsity → backward → step; returns [loss, ce, sparsity, correct], detached.

        ``strength`` = λ·s(e), the sparsity weight times the schedule's coefficient of this epoch.
        ``mean_over``: the CE is ``Σ CE / mean_over``, by default over this batch (its mean). Data-parallel it is
        the global batch's size / world size, so that the gradients averaged over ranks are those of the global
        batch's mean CE, however the batch was split.
        """
        with self.quantized_weights(), self.autocast(x.device):
            logits = self.forward(self.layout(x))
            ce = F.cross_entropy(logits, y, reduction="sum") / (y.shape[0] if mean_over is None else mean_over)
            if self.sparsity_fn is None:
                sparsity, loss = torch.zeros((), device=ce.device), ce
            else:
                sparsity = self.sparsity_fn(self.model)
                loss = ce + strength * sparsity
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.proximal is not None:
            self.proximal.step(self.model, strength * weights_lr(self.optimizer))
        correct = (logits.argmax(1) == y).sum()
        return torch.stack((loss.detach().float(), ce.detach().float(), sparsity.detach().float(), correct.float()))

    @torch.no_grad()
    def test(
        self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device
    ) -> tuple[int, float, float]:
        """(images, Σ CE, Σ correct) over ``batches`` with quantization on; quantizers run once for the whole pass."""
        self.model.eval()
        sums = torch.zeros(2, device=device)
        seen = 0
        with self.quantized_weights(), self.autocast(device):
            for x, y in batches:
                logits = self.forward(self.layout(x))
                sums += torch.stack(
                    (F.cross_entropy(logits, y, reduction="sum").float(), (logits.argmax(1) == y).sum().float())
                )
                seen += y.shape[0]
        loss_sum, correct = sums.tolist()
        return seen, loss_sum, correct

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """The input in the memory format the model runs in."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """bf16 autocast on ``device`` when precision is bf16, else nothing."""
        if self.precision == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()
