"""``python -m codeq.bench``: what CoDeQ costs next to plain training, measured side by side.

Every comparison runs in one process with its variants alternated round by round, warm-up rounds
excluded, and reports the median of the repeats; ratios are taken between medians. The opt-in trainer
comparison (``--trainer-runs N``) alternates whole CLI runs instead and reads the trainer's own epoch
times. The table goes to stdout and everything measured to a JSON file (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch import nn
from torch.nn.utils import parametrize

from codeq import models
from codeq.cost import Evaluator
from codeq.data import synthetic
from codeq.main import CONF_DIR, instantiate_group, sparsity_of
from codeq.quant import DeadZoneLDZCompander, StackedFakeQuant, attach_weight_quantizers, quantized_layers
from codeq.rundir import read_metrics
from codeq.step import TrainingStep

EXCLUDE = ["conv1", "linear"]
LOSSES = ("group_lasso", "group_lasso_blocks", "l1_kernel")  # conf/sparsity options, each with its default λ


def composed(*overrides: str) -> DictConfig:
    """The real run config (conf/config.yaml) with ``overrides``, as ``python -m codeq.main`` composes it."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def sparsity_loss(name: str) -> tuple[Callable[[nn.Module], torch.Tensor], float]:
    """(loss fn, λ) of conf/sparsity/<name>.yaml."""
    return sparsity_of(composed(f"sparsity={name}"))


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


QUANTIZED_WEIGHTS = {  # how a step computes its quantized weights, by variant
    "stacked": lambda model: StackedFakeQuant(model).cached,  # as the trainer does
    "layer by layer": lambda model: parametrize.cached,
    "uncached": lambda model: contextlib.nullcontext,  # a loss reading module.weight re-runs every quantizer
}


def make_step(
    model: nn.Module, loss: str | None, batch: int, device: torch.device, quantized_weights: str = "stacked"
) -> Callable[[], torch.Tensor]:
    """One training step as the trainer takes it (codeq.step.TrainingStep, the configured optimizer) with the
    sparsity loss ``loss`` (a conf/sparsity option, None: none); quantized weights as ``QUANTIZED_WEIGHTS``."""
    cfg = composed(f"sparsity={loss or 'none'}")
    sparsity_fn, weight = sparsity_of(cfg)
    step = TrainingStep(model, instantiate_group(cfg, "optimizer")(model), sparsity_fn)
    step.quantized_weights = QUANTIZED_WEIGHTS[quantized_weights](model)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    return functools.partial(step, x, y, weight)


def bench_training_step(batch: int, repeats: int, warmup: int, device: torch.device) -> dict:
    """Plain vs dead-zone quantizers vs quantizers + each sparsity loss, as the trainer steps (all quantized
    weights in one stacked pass); group lasso also with the quantizers layer by layer, and uncached."""
    variants = {
        "plain": make_step(build_model("resnet20", False, device), None, batch, device),
        "deadzone": make_step(build_model("resnet20", True, device), None, batch, device),
    }
    for name in LOSSES:
        variants[f"deadzone+{name}"] = make_step(build_model("resnet20", True, device), name, batch, device)
    for how in ("layer by layer", "uncached"):
        variants[f"deadzone+group_lasso, {how}"] = make_step(
            build_model("resnet20", True, device), "group_lasso", batch, device, how
        )
    medians = alternate(variants, repeats, warmup, device)
    return {name: {"seconds": t, "ratio_to_plain": t / medians["plain"]} for name, t in medians.items()}


def bench_vs_step(repeats: int, warmup: int, device: torch.device) -> dict:
    """Against one CoDeQ training step at batch 128: a full evaluation (structured + unstructured
    accounting), and each sparsity loss's forward + backward alone (on the weights of a plain ResNet-20:
    the same computation the step adds on top of its cached quantized weights)."""
    evaluator = Evaluator(build_model("resnet20", False, device), (3, 32, 32))
    model = build_model("resnet20", True, device)
    plain = build_model("resnet20", False, device)

    def loss_alone(loss_fn: Callable[[nn.Module], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            plain.zero_grad(set_to_none=True)
            loss_fn(plain).backward()

        return run

    fns = {"training step": make_step(model, None, 128, device), "evaluator": lambda: evaluator.evaluate(model)}
    fns.update({f"{name} loss fwd+bwd": loss_alone(sparsity_loss(name)[0]) for name in LOSSES})
    medians = alternate(fns, repeats, warmup, device)
    return {name: {"seconds": t, "ratio_to_step": t / medians["training step"]} for name, t in medians.items()}


def bench_scaling(depths: list[str], repeats: int, warmup: int, device: torch.device) -> dict:
    """Quantizer (forward + backward of all quantizers) and evaluator time for growing depth."""
    results = {}
    for depth in depths:
        model = build_model(depth, True, device)
        evaluator = Evaluator(build_model(depth, False, device), (3, 32, 32))
        layers = [module for _, module, _ in quantized_layers(model)]
        stacked = StackedFakeQuant(model)

        def quantizers(stacked=stacked, layers=layers) -> None:
            with stacked.cached():
                total = torch.stack([module.weight.sum() for module in layers]).sum()
            total.backward()

        medians = alternate(
            {"quantizers": quantizers, "evaluator": functools.partial(evaluator.evaluate, model)},
            repeats,
            warmup,
            device,
        )
        results[depth] = {"layers": len(layers), **{f"{k}_s": v for k, v in medians.items()}}
    return results


def bench_data(repeats: int, size: int, device: torch.device, fashion_root: str | None) -> dict:
    """Images/s of the training pipeline (shuffle + augmentation + transfer) over one epoch."""
    from codeq.data import fashion_mnist

    pipelines = {
        "synthetic 3x32x32": lambda: synthetic(
            batch_size=128, train_size=size, test_size=128, input_size=(3, 32, 32), device=device
        )
    }
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


def write_jpeg_set(root: Path, images: int, classes: int = 10, size: int = 224) -> None:
    """``images`` smooth random RGB JPEGs of ``size``x``size`` (quality 90) as ``root/{train,val}/<class>/``."""
    import torch.nn.functional as F
    from torchvision.io import encode_jpeg

    generator = torch.Generator().manual_seed(0)
    for i in range(images):
        folder = root / ("train" if i >= classes else "val") / f"class{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        grid = torch.rand(1, 3, 8, 8, generator=generator)
        smooth = F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)[0]
        noise = torch.randn(3, size, size, generator=generator)
        image = (255 * smooth + 8 * noise).clamp(0, 255).to(torch.uint8)
        (folder / f"{i}.JPEG").write_bytes(encode_jpeg(image, quality=90).numpy().tobytes())


def bench_imagefolder(images: int, workers: int, batch: int, repeats: int, device: torch.device) -> dict:
    """Images/s of the imagefolder training pipeline (read, decode, RandomResizedCrop 224 + flip, uint8 until the
    normalisation on ``device``) over a generated set of 224x224 JPEGs; median of ``repeats`` epochs after one."""
    from codeq.imagefolder import imagefolder

    with tempfile.TemporaryDirectory() as root:
        write_jpeg_set(Path(root), images)
        data = imagefolder(root=root, batch_size=batch, num_workers=workers, device=device)
        rates = []
        for epoch in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            n = sum(x.shape[0] for x, _ in data.train_batches(epoch))
            _sync(device)
            if epoch:
                rates.append(n / (time.perf_counter() - start))
    return {
        f"imagefolder 224x224 JPEG, decode={data.decode}, {workers} workers": {
            "images_per_s": statistics.median(rates),
            "images": n,
        }
    }


def bench_evaluator_resnet50(batch: int, repeats: int, warmup: int, device: torch.device) -> dict:
    """A full evaluation (structured + unstructured accounting) of torchvision's ResNet-50 at 224x224 with the
    dead-zone quantizers, against one training step of it at ``batch`` (codeq.step.TrainingStep, the AdamW of
    paper_resnet50_imagenet, no sparsity loss)."""
    evaluator = Evaluator(models.torchvision_model("resnet50", 1000, (3, 224, 224)).to(device), (3, 224, 224))
    model = models.torchvision_model("resnet50", 1000, (3, 224, 224))
    attach_weight_quantizers(model, models.first_and_last_layers(model), DeadZoneLDZCompander, {})
    model.to(device)
    optimizer = instantiate_group(composed("experiment=paper_resnet50_imagenet"), "optimizer")(model)
    step = TrainingStep(model, optimizer)
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    fns = {"training step": functools.partial(step, x, y, 0.0), "evaluator": lambda: evaluator.evaluate(model)}
    medians = alternate(fns, repeats, warmup, device)
    return {name: {"seconds": t, "ratio_to_step": t / medians["training step"]} for name, t in medians.items()} | {
        "batch": batch
    }


TRAINER_VARIANTS = {
    "plain": ["quantizer=none", "sparsity=none"],
    "codeq": ["quantizer=deadzone", "sparsity=group_lasso"],
}


def bench_trainer(runs: int, images: int, batch: int, device: torch.device, overrides: list[str]) -> dict:
    """The step target as the trainer measures it: ``time/train_s`` of the warm epochs (2 and 3 of 3) of
    ``python -m codeq.main`` on synthetic CIFAR-shaped data, plain vs CoDeQ (dead-zone + group lasso),
    ``runs`` runs of each, alternated; medians over all warm epochs."""
    common = [
        "dataset=synthetic",
        f"dataset.train_size={images}",
        "dataset.test_size=256",
        f"dataset.batch_size={batch}",
        "trainer.epochs=3",
        "trainer.viz_interval=100",
        "logger=none",
        f"trainer.device={device.type}",
        *overrides,
    ]
    times: dict[str, list[float]] = {name: [] for name in TRAINER_VARIANTS}
    with tempfile.TemporaryDirectory(prefix="codeq-bench-") as work:
        for run in range(runs):
            for name, variant in TRAINER_VARIANTS.items():
                run_dir = Path(work) / f"{name}-{run}"
                command = [sys.executable, "-m", "codeq.main", *common, *variant, f"hydra.run.dir={run_dir}"]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                    raise RuntimeError(f"trainer run failed ({' '.join(command[1:])}): {last}")
                times[name] += [row["time/train_s"] for row in read_metrics(run_dir / "metrics.jsonl")[1:]]
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "command": "python -m codeq.main " + " ".join(common),
        "variants": TRAINER_VARIANTS,
        "epoch_s": times,
        **{f"{name}_s": t for name, t in medians.items()},
        "ratio": medians["codeq"] / medians["plain"],
    }


def bench_ddp(ranks: int, runs: int, images: int, batch: int, device: torch.device, overrides: list[str]) -> dict:
    """Data-parallel step time per rank vs one process at the same per-rank batch: ``torchrun --nproc_per_node=
    ranks`` with global batch ``ranks·batch`` against ``python -m codeq.main`` with ``batch``, the CoDeQ step
    (dead-zone + group lasso) on synthetic CIFAR-shaped data, ``runs`` runs of each alternated, one thread per
    process; median ``time/train_s`` per step of the warm epochs. efficiency = single / per-rank step time
    (1.0: the ranks cost nothing extra; on a CPU the gap is the gloo all-reduces and the global BatchNorm)."""
    common = [
        "dataset=synthetic",
        f"dataset.train_size={images}",
        "dataset.test_size=256",
        "trainer.epochs=3",
        "trainer.viz_interval=100",
        "logger=none",
        f"trainer.device={device.type}",
        *TRAINER_VARIANTS["codeq"],
        *overrides,
    ]
    launch = {
        "single": ([sys.executable, "-m", "codeq.main"], batch),
        "ddp": (
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={ranks}",
                "-m",
                "codeq.main",
            ],
            ranks * batch,
        ),
    }
    step_s: dict[str, list[float]] = {name: [] for name in launch}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="codeq-bench-ddp-") as work:
        for run in range(runs):
            for name, (command, global_batch) in launch.items():
                run_dir = Path(work) / f"{name}-{run}"
                full = [*command, *common, f"dataset.batch_size={global_batch}", f"hydra.run.dir={run_dir}"]
                done = subprocess.run(full, capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                    raise RuntimeError(f"data-parallel bench run failed ({' '.join(full[1:])}): {last}")
                steps = -(-images // global_batch)
                rows = read_metrics(run_dir / "metrics.jsonl")[1:]
                step_s[name] += [row["time/train_s"] / steps for row in rows]
    medians = {name: statistics.median(t) for name, t in step_s.items()}
    return {
        "command": f"torchrun --nproc_per_node={ranks} -m codeq.main " + " ".join(common),
        "ranks": ranks,
        "per_rank_batch": batch,
        "step_s": step_s,
        "single_step_s": medians["single"],
        "ddp_step_s": medians["ddp"],
        "efficiency": medians["single"] / medians["ddp"],
    }


def _table(results: dict) -> str:
    lines = []
    for batch, rows in results["training_step"].items():
        lines.append(f"training step, ResNet-20, batch {batch} (a loss's cost: its row minus 'deadzone')")
        lines += [
            f"  {name:<38} {r['seconds'] * 1e3:9.1f} ms   {r['ratio_to_plain']:5.3f}x plain" for name, r in rows.items()
        ]
    lines.append("evaluator and sparsity losses vs one CoDeQ training step (batch 128)")
    lines += [
        f"  {name:<38} {r['seconds'] * 1e3:9.1f} ms   {100 * r['ratio_to_step']:6.2f} % of a step"
        for name, r in results["vs_step"].items()
    ]
    lines.append("scaling with depth (all quantizers fwd+bwd; full evaluation)")
    lines += [
        f"  {depth:<10} {r['layers']:4d} quantized layers   quantizers {r['quantizers_s'] * 1e3:8.1f} ms"
        f"   evaluator {r['evaluator_s'] * 1e3:8.1f} ms"
        for depth, r in results["scaling"].items()
    ]
    lines.append("data pipeline with augmentation")
    lines += [f"  {name:<38} {r['images_per_s']:12,.0f} images/s" for name, r in results["data"].items()]
    if "resnet50" in results:
        r = results["resnet50"]
        lines.append(f"evaluator vs one training step, torchvision ResNet-50 at 224x224 (batch {r['batch']})")
        lines += [
            f"  {name:<38} {v['seconds'] * 1e3:9.1f} ms   {100 * v['ratio_to_step']:6.2f} % of a step"
            for name, v in r.items()
            if name != "batch"
        ]
    if "trainer" in results:
        r = results["trainer"]
        lines.append("trainer: time/train_s of a warm epoch (median), CoDeQ = dead-zone + group lasso")
        lines.append(f"  plain {r['plain_s']:.2f} s   codeq {r['codeq_s']:.2f} s   {r['ratio']:5.3f}x plain")
    if "ddp" in results:
        r = results["ddp"]
        lines.append(
            f"data-parallel: step time per rank, {r['ranks']} ranks vs 1 process, {r['per_rank_batch']} images per rank"
        )
        lines.append(
            f"  1 process {r['single_step_s'] * 1e3:.1f} ms   {r['ranks']} ranks {r['ddp_step_s'] * 1e3:.1f} ms"
            f"   scaling efficiency {r['efficiency']:.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m codeq.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per comparison (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds before timing")
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 32], help="training-step batch sizes")
    parser.add_argument(
        "--depths", nargs="+", default=["resnet20", "resnet56", "resnet110"], help="models for the scaling comparison"
    )
    parser.add_argument("--data-size", type=int, default=20_000, help="synthetic images per data-benchmark epoch")
    parser.add_argument(
        "--fashion-root",
        default="/usr/share/datasets/fashion-mnist",
        help="Fashion-MNIST location for the data benchmark ('' to skip)",
    )
    parser.add_argument(
        "--trainer-runs",
        type=int,
        default=0,
        help="CLI training runs of plain and of CoDeQ, alternated, for the trainer comparison (0: skip)",
    )
    parser.add_argument("--trainer-images", type=int, default=5120, help="synthetic training images per epoch there")
    parser.add_argument("--trainer-batch", type=int, default=128, help="batch size there")
    parser.add_argument(
        "--trainer-overrides",
        nargs="*",
        default=[],
        help="extra overrides for those and the data-parallel runs (e.g. dataset.loader=device trainer.precision=bf16)",
    )
    parser.add_argument(
        "--imagefolder-images",
        type=int,
        default=512,
        help="generated 224x224 JPEGs for the imagefolder pipeline (0: skip)",
    )
    parser.add_argument("--imagefolder-workers", type=int, default=4, help="worker processes of that pipeline")
    parser.add_argument(
        "--resnet50-batch", type=int, default=0, help="ResNet-50 step batch for the evaluator comparison (0: skip)"
    )
    parser.add_argument(
        "--ddp-ranks",
        type=int,
        default=0,
        help="data-parallel comparison: torchrun with this many ranks vs one process (0: skip)",
    )
    parser.add_argument("--ddp-runs", type=int, default=2, help="alternated runs of each there")
    parser.add_argument("--ddp-images", type=int, default=2048, help="synthetic training images per epoch there")
    parser.add_argument("--ddp-batch", type=int, default=64, help="images per rank and step there")
    parser.add_argument("--out", default="bench.json", help="JSON file for every number measured")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    fashion = args.fashion_root if args.fashion_root and Path(args.fashion_root).exists() else None

    results = {
        "machine": {
            "device": str(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
        },
        "training_step": {b: bench_training_step(b, args.repeats, args.warmup, device) for b in args.batches},
        "vs_step": bench_vs_step(args.repeats, args.warmup, device),
        "scaling": bench_scaling(args.depths, max(1, args.repeats // 3), min(1, args.warmup), device),
        "data": bench_data(max(1, args.repeats // 5), args.data_size, device, fashion),
    }
    if args.imagefolder_images > 0:
        results["data"] |= bench_imagefolder(
            args.imagefolder_images, args.imagefolder_workers, 64, max(1, args.repeats // 5), device
        )
    if args.resnet50_batch > 0:
        results["resnet50"] = bench_evaluator_resnet50(args.resnet50_batch, max(1, args.repeats // 5), 1, device)
    status = 0
    if args.trainer_runs > 0:
        try:
            results["trainer"] = bench_trainer(
                args.trainer_runs, args.trainer_images, args.trainer_batch, device, args.trainer_overrides
            )
        except RuntimeError as exc:  # the other comparisons are still reported
            print(f"error: {exc}", file=sys.stderr)
            status = 1
    if args.ddp_ranks > 1:
        try:
            results["ddp"] = bench_ddp(
                args.ddp_ranks, args.ddp_runs, args.ddp_images, args.ddp_batch, device, args.trainer_overrides
            )
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
    print(_table(results))
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
