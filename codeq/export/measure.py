"""What an export is checked by: output parity, MACs counted by torch.utils.flop_counter, and latency.

Latency: every variant (model × engine × batch size) is timed once per round, the rounds alternate the
variants, the warm-up round is not counted, and each variant's median is reported; dense and slimmed models
are thus measured side by side in one process under the same load.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from codeq.errors import ConfigError


class ParityError(ConfigError):
    """The exported model disagrees with the run: outputs beyond tolerance, or MACs other than reported."""


def layer_macs(model: nn.Module, input_size: tuple[int, ...], names: dict[str, str]) -> dict[str, int]:
    """MACs per layer on a batch of one, from torch.utils.flop_counter (FLOPs / 2).

    ``names`` maps the reported layer name to the module name inside ``model``.
    """
    reference = next(model.parameters())
    x = torch.zeros(1, *input_size, device=reference.device, dtype=reference.dtype)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    return {name: sum(counts.get(f"{root}.{module}", {}).values()) // 2 for name, module in names.items()}


def reported_layer_macs(row: dict, dense_macs: dict[str, int]) -> dict[str, int]:
    """A metrics.jsonl row's structured MACs per layer: ``layers/<name>/structured_macs``, or, in rows without it,
    (1 − ``layers/<name>/structured_pruning``)·dense MACs rounded (exact: the ratio was computed from integers)."""
    reported = {}
    for name, dense in dense_macs.items():
        exact = row.get(f"layers/{name}/structured_macs")
        if exact is not None:
            reported[name] = int(exact)
            continue
        pruning = row.get(f"layers/{name}/structured_pruning")
        if pruning is None:
            raise ParityError(f"metrics.jsonl epoch {row.get('epoch')}: no structured count for layer {name}")
        reported[name] = round((1.0 - pruning) * dense)
    return reported


def check_mac_parity(measured: dict[str, int], reported: dict[str, int]) -> None:
    """Every layer's measured MACs equal the reported ones, else a ParityError naming the layers that differ."""
    differing = [
        f"{name} (measured {measured[name]}, reported {reported[name]})"
        for name in reported
        if measured.get(name) != reported[name]
    ]
    if differing:
        raise ParityError("MAC parity failed: " + "; ".join(differing))


def output_difference(reference: torch.Tensor, candidate: torch.Tensor | np.ndarray) -> float:
    """max |candidate − reference| relative to the logits' scale, max |reference|."""
    candidate = torch.as_tensor(candidate, dtype=reference.dtype)
    scale = reference.abs().max().clamp_min(torch.finfo(reference.dtype).tiny)
    return float((candidate - reference).abs().max() / scale)


def median_latencies(variants: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None]) -> dict:
    """Median seconds per call of each variant over ``repeats`` alternated rounds (plus one warm-up round)."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(repeats + 1):
        for name, call in variants.items():
            sync()
            tic = time.perf_counter()
            call()
            sync()
            if round_index:
                samples[name].append(time.perf_counter() - tic)
    return {name: statistics.median(times) for name, times in samples.items()}


def speedup(dense: float, slim: float) -> float:
    return dense / slim if slim else math.inf
