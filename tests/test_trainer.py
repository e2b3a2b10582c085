"""The training loop on a tiny model and in-memory data: loss accounting, caching, files, resume, stops."""

import json
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from codeq.checkpoint import load_checkpoint
from codeq.device import resolve_device
from codeq.errors import ConfigError
from codeq.evaluator import Evaluator
from codeq.loggers import NullLogger
from codeq.optim import adamw
from codeq.quant import DeadZoneLDZCompander, attach_weight_quantizers
from codeq.resume import TrainingInterrupted
from codeq.rundir import RunFiles, read_metrics
from codeq.sparsity import Proximal
from codeq.trainer import Trainer, TrainerConfig, TrainingDiverged

CPU = torch.device("cpu")


class TinyNet(nn.Module):
    """conv(1→4, 3×3) → ReLU → global average pool → linear(4→3); no BatchNorm, so eval = train math."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return self.linear(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1))


class TinyData:
    """Stand-in DataModule: 3 learnable classes of 1×6×6 images; train order a pure function of the epoch.

    ``hook(epoch, step, x)`` runs just before a training batch is handed out and may return a new x.
    """

    input_size = (1, 6, 6)
    num_classes = 3

    def __init__(self, num_train=24, num_test=12, batch_size=8, hook=None):
        generator = torch.Generator().manual_seed(0)
        templates = torch.randn(3, 1, 6, 6, generator=generator)

        def make(n):
            y = torch.arange(n) % 3
            return templates[y] + 0.5 * torch.randn(n, 1, 6, 6, generator=generator), y

        self.train_x, self.train_y = make(num_train)
        self.test_x, self.test_y = make(num_test)
        self.num_train, self.num_test, self.batch_size, self.hook = num_train, num_test, batch_size, hook

    def train_batches(self, epoch, rank=0, world_size=1):  # one process: the rank's part is everything
        order = torch.randperm(self.num_train, generator=torch.Generator().manual_seed(100 + epoch))
        for step, index in enumerate(order.split(self.batch_size)):
            x = self.train_x[index]
            if self.hook is not None:
                x = self.hook(epoch, step, x)
            yield x, self.train_y[index]

    def test_batches(self, rank=0, world_size=1):
        return zip(self.test_x.split(self.batch_size), self.test_y.split(self.batch_size))


class CountingDeadZone(DeadZoneLDZCompander):
    """Counts layer quantizations (how often the quantizer math runs), one by one or stacked."""

    calls = 0
    stacked_calls = 0

    @classmethod
    def quantize_stacked(cls, quantizers, stacks):
        CountingDeadZone.calls += len(quantizers)
        CountingDeadZone.stacked_calls += 1
        return super().quantize_stacked(quantizers, stacks)


def make_trainer(
    run_dir,
    *,
    epochs=2,
    data=None,
    sparsity_fn=None,
    weight=0.0,
    schedule=None,
    lr=1e-2,
    quantizer=DeadZoneLDZCompander,
    figure_fn=None,
    viz_interval=25,
    log_every_steps=25,
    precision="fp32",
):
    torch.manual_seed(0)
    model = TinyNet()
    evaluator = Evaluator(model, input_size=TinyData.input_size)
    attach_weight_quantizers(model, exclude_layers=[], quantizer=quantizer)
    optimizer = adamw(model, lr=lr, weight_decay=0.0, lr_dz=lr, weight_decay_dz=0.0, lr_bit=lr, weight_decay_bit=0.0)
    config = TrainerConfig(
        epochs=epochs, device="cpu", viz_interval=viz_interval, log_every_steps=log_every_steps, precision=precision
    )
    return Trainer(
        config,
        model=model,
        data=data or TinyData(),
        optimizer=optimizer,
        lr_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs),
        evaluator=evaluator,
        schedule=schedule or (lambda epoch, total: 1.0),
        sparsity_fn=sparsity_fn,
        sparsity_weight=weight,
        figure_fn=figure_fn or (lambda model, result: {}),
        files=RunFiles(run_dir, epochs=epochs),
        device=CPU,
    )


def logger(run_dir):
    return NullLogger(run_dir, config={}, name="test")


def without_times(rows):
    return [{k: v for k, v in row.items() if not k.startswith("time/") and k != "train/images_per_s"} for row in rows]


def linear_l1(model):
    return model.linear.weight.abs().sum()


def test_loss_is_ce_plus_weight_times_schedule_times_sparsity(tmp_path):
    coefficients = [0.0, 0.5, 1.0]
    trainer = make_trainer(
        tmp_path, epochs=3, sparsity_fn=linear_l1, weight=0.1, schedule=lambda epoch, total: coefficients[epoch]
    )
    trainer.fit(logger(tmp_path))
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == [0, 1, 2]
    assert [row["train/sparsity_coeff"] for row in rows] == coefficients
    for row, coeff in zip(rows, coefficients):
        assert row["train/sparsity_loss"] > 0
        assert row["train/loss"] == pytest.approx(
            row["train/ce_loss"] + 0.1 * coeff * row["train/sparsity_loss"], rel=1e-6
        )


def test_a_proximal_option_runs_after_every_optimizer_step_with_eta_weight_times_schedule_times_lr(tmp_path):
    """η = λ·c(e)·lr: λ = 0.1, c = [0.0, 0.5, 1.0], the cosine LR of 1e-2 over 3 epochs; the loss is plain CE."""
    coefficients = [0.0, 0.5, 1.0]
    calls = []

    def record(model, eta):
        calls.append((eta, all(p.grad is not None for p in model.parameters() if p.requires_grad)))

    trainer = make_trainer(
        tmp_path, epochs=3, sparsity_fn=Proximal(record), weight=0.1, schedule=lambda epoch, total: coefficients[epoch]
    )
    trainer.fit(logger(tmp_path))
    steps = len(list(TinyData().train_batches(0)))
    lrs = [1e-2 * (1 + math.cos(math.pi * epoch / 3)) / 2 for epoch in range(3)]
    expected = [0.1 * coeff * lr for coeff, lr in zip(coefficients, lrs) for _ in range(steps)]
    assert [eta for eta, _ in calls] == pytest.approx(expected, rel=1e-9)
    assert all(after_backward for _, after_backward in calls)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert all(row["train/sparsity_loss"] == 0 and row["train/loss"] == row["train/ce_loss"] for row in rows)


def test_without_a_sparsity_fn_the_term_is_zero(tmp_path):
    trainer = make_trainer(tmp_path, epochs=1)
    trainer.fit(logger(tmp_path))
    (row,) = read_metrics(tmp_path / "metrics.jsonl")
    assert row["train/sparsity_loss"] == 0.0 and row["train/loss"] == row["train/ce_loss"]


def test_each_quantizer_runs_once_per_step_even_with_a_sparsity_loss(tmp_path):
    seen = []
    data = TinyData(hook=lambda epoch, step, x: seen.append(CountingDeadZone.calls) or x)
    trainer = make_trainer(
        tmp_path,
        epochs=1,
        data=data,
        sparsity_fn=lambda m: linear_l1(m) + m.conv.weight.abs().sum(),
        weight=0.1,
        quantizer=CountingDeadZone,
    )
    trainer.fit(logger(tmp_path))
    # 3 steps; between two batches the step ran the 2 quantized layers' quantizers exactly once each
    assert [b - a for a, b in zip(seen, seen[1:])] == [2, 2]
    assert CountingDeadZone.stacked_calls > 0  # the trainer quantizes through StackedFakeQuant


def test_accuracy_and_loss_are_exact_means(tmp_path):
    trainer = make_trainer(tmp_path, epochs=1, lr=0.0)  # lr 0: the model is the same at every step
    data = trainer.data
    trainer.fit(logger(tmp_path))
    (row,) = read_metrics(tmp_path / "metrics.jsonl")
    with torch.no_grad():
        train_logits = trainer.model(data.train_x)
        test_logits = trainer.model(data.test_x)
    assert row["train/accuracy"] == pytest.approx((train_logits.argmax(1) == data.train_y).float().mean().item())
    assert row["eval/accuracy"] == pytest.approx((test_logits.argmax(1) == data.test_y).float().mean().item())
    assert row["eval/loss"] == pytest.approx(F.cross_entropy(test_logits, data.test_y).item(), rel=1e-6)
    batch_ce = [F.cross_entropy(trainer.model(x), y).item() for x, y in data.train_batches(0)]
    assert row["train/ce_loss"] == pytest.approx(sum(batch_ce) / 3, rel=1e-6)


def test_files_after_a_run(tmp_path):
    figures = []
    trainer = make_trainer(tmp_path, epochs=3, viz_interval=2, figure_fn=lambda m, r: figures.append(r) or {})
    summary = trainer.fit(logger(tmp_path))
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert len(figures) == 2  # epochs 0 and 2 (the last)
    # cosine LR over 3 epochs: lr_e = 0.01·(1 + cos(π e / 3)) / 2
    assert [row["lr"] for row in rows] == pytest.approx([0.01, 0.0075, 0.0025])
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    best = max(rows, key=lambda r: r["eval/accuracy"])
    assert summary["status"] == "completed" and summary["epochs"] == summary["epochs_completed"] == 3
    assert (summary["best_accuracy"], summary["best_epoch"]) == (best["eval/accuracy"], best["epoch"])
    assert summary["final"] == rows[-1]
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 2 and state["partial"] is None and state["wandb_run_id"] is None
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == best["epoch"]
    for key in (
        "compression/structured_bops_ratio",
        "compression/unstructured_rel_bops_pct",
        "sparsity/unstructured",
        "bits/mean",
        "layers/conv/bitwidth",
        "layers/linear/unstructured_pruning",
    ):
        assert key in rows[0]


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path):
    reference = make_trainer(tmp_path / "a", epochs=4)
    reference.fit(logger(tmp_path / "a"))

    def crash(epoch, step, x):
        if epoch == 2:
            raise RuntimeError("simulated crash")
        return x

    crashed = make_trainer(tmp_path / "b", epochs=4, data=TinyData(hook=crash))
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit(logger(tmp_path / "b"))
    assert len(read_metrics(tmp_path / "b" / "metrics.jsonl")) == 2

    resumed = make_trainer(tmp_path / "b", epochs=4)
    resumed.load_state_dict(load_checkpoint(tmp_path / "b" / "last.pt"))
    assert resumed.start_epoch == 2
    resumed.fit(logger(tmp_path / "b"))
    assert without_times(read_metrics(tmp_path / "b" / "metrics.jsonl")) == without_times(
        read_metrics(tmp_path / "a" / "metrics.jsonl")
    )


def test_sigterm_mid_epoch_checkpoints_the_step_and_resumes_exactly(tmp_path):
    reference = make_trainer(tmp_path / "a", epochs=3, sparsity_fn=linear_l1, weight=0.1)
    reference.fit(logger(tmp_path / "a"))

    def terminate(epoch, step, x):
        if (epoch, step) == (1, 1):
            os.kill(os.getpid(), signal.SIGTERM)
        return x

    stopped = make_trainer(tmp_path / "b", epochs=3, data=TinyData(hook=terminate), sparsity_fn=linear_l1, weight=0.1)
    with pytest.raises(TrainingInterrupted, match="SIGTERM at epoch 1, step 1") as info:
        stopped.fit(logger(tmp_path / "b"))
    assert info.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    state = load_checkpoint(tmp_path / "b" / "last.pt")
    assert state["epoch"] == 0 and state["partial"]["epoch"] == 1 and len(state["partial"]["history"]) == 2

    resumed = make_trainer(tmp_path / "b", epochs=3, sparsity_fn=linear_l1, weight=0.1)
    resumed.load_state_dict(state)
    resumed.fit(logger(tmp_path / "b"))
    assert without_times(read_metrics(tmp_path / "b" / "metrics.jsonl")) == without_times(
        read_metrics(tmp_path / "a" / "metrics.jsonl")
    )


def test_nan_loss_stops_naming_epoch_and_step_and_keeps_the_last_good_state(tmp_path):
    def poison(epoch, step, x):
        return torch.full_like(x, math.nan) if (epoch, step) == (1, 2) else x

    trainer = make_trainer(tmp_path, epochs=3, data=TinyData(hook=poison), log_every_steps=1)
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step 2 .*optimizer.lr.*sparsity.weight"):
        trainer.fit(logger(tmp_path))
    assert [row["epoch"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [0]
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nan_is_found_at_the_epoch_end_check_too(tmp_path):
    def poison(epoch, step, x):
        return torch.full_like(x, math.nan) if (epoch, step) == (0, 1) else x

    trainer = make_trainer(tmp_path, epochs=2, data=TinyData(hook=poison), log_every_steps=100)
    with pytest.raises(TrainingDiverged, match="epoch 0, step 1 "):
        trainer.fit(logger(tmp_path))
    assert read_metrics(tmp_path / "metrics.jsonl") == [] and not (tmp_path / "last.pt").exists()


def test_bf16_autocast_trains_with_fp32_weights(tmp_path):
    trainer = make_trainer(tmp_path, epochs=1, precision="bf16", sparsity_fn=linear_l1, weight=0.1)
    trainer.fit(logger(tmp_path))
    (row,) = read_metrics(tmp_path / "metrics.jsonl")
    assert all(math.isfinite(row[key]) for key in ("train/loss", "eval/loss", "train/sparsity_loss"))
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_resolve_device():
    assert resolve_device("cpu") == CPU
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ConfigError, match=r"trainer.device='tpu' is not usable on this machine; allowed: auto, cpu"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="trainer.device='cuda'"):
            resolve_device("cuda")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("epochs", -1, "trainer.epochs must be an integer >= 1, got -1"),
        ("epochs", 0, "trainer.epochs must be an integer >= 1, got 0"),
        ("viz_interval", 0, "trainer.viz_interval must be an integer >= 1, got 0"),
        ("log_every_steps", 0, "trainer.log_every_steps must be an integer >= 1, got 0"),
        ("precision", "fp16", "trainer.precision must be one of fp32, bf16, got 'fp16'"),
    ],
)
def test_trainer_config_validation(key, value, message):
    with pytest.raises(ConfigError) as info:
        TrainerConfig(**{key: value})
    assert str(info.value) == message
