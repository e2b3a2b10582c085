"""``python -m codeq.bench``: what CoDeQ costs next to plain training, measured side by side.

Every comparison runs in one process with its variants alternated round by round, warm-up rounds
excluded, and reports the median of the repeats; ratios are taken between medians. The table goes
to stdout and everything measured to a JSON file (``--out``).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from codeq import models, sparsity
from codeq.data import synthetic
from codeq.evaluator import Evaluator
from codeq.quant import DeadZoneLDZCompander, attach_weight_quantizers, quantized_layers, split_param_groups

EXCLUDE = ["conv1", "linear"]
# each loss with its default strength λ from conf/sparsity/
LOSSES = {
    "group_lasso": (sparsity.group_lasso_channels, 5e-4),
    "group_lasso_blocks": (sparsity.group_lasso_blocks(4), 1e-3),
    "l1_kernel": (sparsity.l1_kernel_sparsity, 3e-5),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device) -> dict:
    """Median seconds of each fn, timed in alternation (A, B, C, A, B, C, ...) after ``warmup`` rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def build_model(depth: str, quantized: bool, device: torch.device) -> nn.Module:
    model = getattr(models, depth)()
    if quantized:
        attach_weight_quantizers(model, EXCLUDE, DeadZoneLDZCompander, {})
    return model.to(device)


def make_step(model: nn.Module, loss: tuple | None, batch: int, device: torch.device, cached: bool) -> Callable[[], None]:
    """One training step as the trainer takes it: forward, CE (+ λ·sparsity for ``loss`` = (fn, λ)), backward, AdamW."""
    weights, dz, bit = split_param_groups(model)
    groups = [{"params": p} for p in (weights, dz, bit) if p]
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def loss_and_backward() -> None:
        total = F.cross_entropy(model(x), y)
        if loss is not None:
            loss_fn, strength = loss
            total = total + strength * loss_fn(model)
        total.backward()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        if cached:
            with parametrize.cached():
                loss_and_backward()
        else:
            loss_and_backward()
        optimizer.step()

    return step


def bench_training_step(batch: int, repeats: int, warmup: int, device: torch.device) -> dict:
    """Plain vs dead-zone quantizers vs quantizers + each sparsity loss, as the trainer steps (inside
    parametrize.cached); group lasso also uncached, where the loss recomputes every quantizer."""
    variants = {
        "plain": make_step(build_model("resnet20", False, device), None, batch, device, cached=False),
        "deadzone": make_step(build_model("resnet20", True, device), None, batch, device, cached=True),
    }
    for name, loss in LOSSES.items():
        variants[f"deadzone+{name}"] = make_step(build_model("resnet20", True, device), loss, batch, device, cached=True)
    variants["deadzone+group_lasso, uncached"] = make_step(
        build_model("resnet20", True, device), LOSSES["group_lasso"], batch, device, cached=False)
    medians = alternate(variants, repeats, warmup, device)
    return {name: {"seconds": t, "ratio_to_plain": t / medians["plain"]} for name, t in medians.items()}


def bench_evaluator(repeats: int, warmup: int, device: torch.device) -> dict:
    """A full evaluation (structured + unstructured accounting) against one training step at batch 128."""
    evaluator = Evaluator(build_model("resnet20", False, device), (3, 32, 32))
    model = build_model("resnet20", True, device)
    fns = {"training step": make_step(model, None, 128, device, cached=True),
           "evaluator": lambda: evaluator.evaluate(model)}
    medians = alternate(fns, repeats, warmup, device)
    return {name: {"seconds": t, "ratio_to_step": t / medians["training step"]} for name, t in medians.items()}


def bench_scaling(depths: list[str], repeats: int, warmup: int, device: torch.device) -> dict:
    """Quantizer (forward + backward of all quantizers) and evaluator time for growing depth."""
    results = {}
    for depth in depths:
        model = build_model(depth, True, device)
        evaluator = Evaluator(build_model(depth, False, device), (3, 32, 32))
        layers = [(fq.quantizer, module.parametrizations.weight.original) for _, module, fq in quantized_layers(model)]

        def quantizers() -> None:
            torch.stack([q(w).sum() for q, w in layers]).sum().backward()

        medians = alternate({"quantizers": quantizers, "evaluator": lambda: evaluator.evaluate(model)},
                            repeats, warmup, device)
        results[depth] = {"layers": len(layers), **{f"{k}_s": v for k, v in medians.items()}}
    return results


def bench_data(repeats: int, size: int, device: torch.device, fashion_root: str | None) -> dict:
    """Images/s of the training pipeline (shuffle + augmentation + transfer) over one epoch."""
    from codeq.data import fashion_mnist

    pipelines = {"synthetic 3x32x32": lambda: synthetic(
        batch_size=128, train_size=size, test_size=128, input_size=(3, 32, 32), device=device)}
    if fashion_root is not None:
        pipelines["fashion_mnist 1x28x28"] = lambda: fashion_mnist(root=fashion_root, batch_size=128, device=device)
    results = {}
    for name, build in pipelines.items():
        data = build()
        rates = []
        for epoch in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            n = sum(x.shape[0] for x, _ in data.train_batches(epoch))
            _sync(device)
            if epoch:
                rates.append(n / (time.perf_counter() - start))
        results[name] = {"images_per_s": statistics.median(rates), "images": n}
    return results


def _table(results: dict) -> str:
    lines = []
    for batch, rows in results["training_step"].items():
        lines.append(f"training step, ResNet-20, batch {batch} (a loss's cost: its row minus 'deadzone')")
        lines += [f"  {name:<34} {r['seconds'] * 1e3:9.1f} ms   {r['ratio_to_plain']:5.3f}x plain"
                  for name, r in rows.items()]
    lines.append("evaluator vs one training step (batch 128)")
    lines += [f"  {name:<34} {r['seconds'] * 1e3:9.1f} ms   {100 * r['ratio_to_step']:6.2f} % of a step"
              for name, r in results["vs_step"].items()]
    lines.append("scaling with depth (all quantizers fwd+bwd; full evaluation)")
    lines += [f"  {depth:<10} {r['layers']:4d} quantized layers   quantizers {r['quantizers_s'] * 1e3:8.1f} ms"
              f"   evaluator {r['evaluator_s'] * 1e3:8.1f} ms" for depth, r in results["scaling"].items()]
    lines.append("data pipeline with augmentation")
    lines += [f"  {name:<34} {r['images_per_s']:12,.0f} images/s" for name, r in results["data"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m codeq.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per comparison (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds before timing")
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 32], help="training-step batch sizes")
    parser.add_argument("--depths", nargs="+", default=["resnet20", "resnet56", "resnet110"],
                        help="models for the scaling comparison")
    parser.add_argument("--data-size", type=int, default=20_000, help="synthetic images per data-benchmark epoch")
    parser.add_argument("--fashion-root", default="/usr/share/datasets/fashion-mnist",
                        help="Fashion-MNIST location for the data benchmark ('' to skip)")
    parser.add_argument("--out", default="bench.json", help="JSON file for every number measured")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    fashion = args.fashion_root if args.fashion_root and Path(args.fashion_root).exists() else None

    results = {
        "machine": {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu": platform.processor() or platform.machine()},
        "training_step": {b: bench_training_step(b, args.repeats, args.warmup, device) for b in args.batches},
        "vs_step": bench_evaluator(args.repeats, args.warmup, device),
        "scaling": bench_scaling(args.depths, max(1, args.repeats // 3), min(1, args.warmup), device),
        "data": bench_data(max(1, args.repeats // 5), args.data_size, device, fashion),
    }
    print(_table(results))
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
