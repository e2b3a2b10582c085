"""The training loop: CE (+ λ·schedule·sparsity) with CoDeQ quantizers, evaluation, files, checkpoints.

It knows nothing of Hydra: codeq.main builds every object and hands them over. Per epoch it writes one
metrics.jsonl row, the summary, figures every ``viz_interval`` epochs, and last.pt (atomically), so a
killed run resumes exactly where its last checkpoint left it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn
from torch.nn.utils import parametrize
from tqdm import tqdm

from codeq.checkpoint import CHECKPOINT_FILE, CheckpointError, capture_rng_state, restore_rng_state, save_checkpoint
from codeq.errors import ConfigError
from codeq.loggers import Logger
from codeq.quant import StackedFakeQuant
from codeq.rundir import RunFiles, atomic_write_bytes

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainerConfig:
    """The loop's settings (conf/trainer/default.yaml); invalid values raise ConfigError naming the key."""

    epochs: int = 300
    device: str = "auto"
    resume: bool = False
    viz_interval: int = 25
    sparsity_layer: str | None = None
    precision: str = "fp32"
    compile: bool = False
    channels_last: bool = False
    log_every_steps: int = 25

    def __post_init__(self):
        for key in ("epochs", "viz_interval", "log_every_steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"trainer.{key} must be an integer >= 1, got {value!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"trainer.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


def resolve_device(name: str) -> torch.device:
    """trainer.device -> torch.device; auto = cuda -> mps -> cpu. An unusable device is a ConfigError."""
    cuda = torch.cuda.is_available()
    mps = torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    allowed = ["auto", "cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())] if cuda else [])
    allowed += ["mps"] if mps else []
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        device = None
    usable = device is not None and (
        device.type == "cpu"
        or (device.type == "cuda" and cuda and (device.index or 0) < torch.cuda.device_count())
        or (device.type == "mps" and mps)
    )
    if not usable:
        raise ConfigError(f"trainer.device={name!r} is not usable on this machine; allowed: {', '.join(allowed)}")
    return device


class TrainingDiverged(RuntimeError):
    """The loss became non-finite; the message names the epoch, step and the knobs to turn."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped the run after a checkpoint was written."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """While active, SIGINT/SIGTERM only set ``signum``: the loop finishes its step and checkpoints.

    A second signal raises KeyboardInterrupt at once (the atomic checkpoint stays valid).
    Outside the main thread (some launchers) signals cannot be caught and nothing is installed.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning(
            "%s received: finishing the current step, then writing a checkpoint (send again to abort now)",
            signal.Signals(signum).name,
        )


class Trainer:
    """Runs epochs ``start_epoch .. epochs-1`` of loss = CE + λ·schedule(e, E)·sparsity(model).

    ``sparsity_fn`` None means no sparsity term at all (nothing is computed for it).
    ``figure_fn(model, eval_result)`` returns {name: Figure}; they are saved as <name>.png in the run dir.
    The logger is given to ``fit``, so a checkpoint can be restored before a W&B run is opened.
    """

    def __init__(
        self,
        config: TrainerConfig,
        *,
        model: nn.Module,
        data: Any,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
        evaluator: Any,
        schedule: Callable[[int, int], float],
        sparsity_fn: Callable[[nn.Module], torch.Tensor] | None,
        sparsity_weight: float,
        figure_fn: Callable[[nn.Module, Any], dict[str, Figure]],
        files: RunFiles,
        device: torch.device,
    ):
        self.config = config
        self.model = model
        self.forward = torch.compile(model) if config.compile else model
        # each step's quantized weights, computed once; eager stacks like layers, torch.compile fuses them itself
        self.quantized_weights = parametrize.cached if config.compile else StackedFakeQuant(model).cached
        self.data = data
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.evaluator = evaluator
        self.schedule = schedule
        self.sparsity_fn = sparsity_fn
        self.sparsity_weight = float(sparsity_weight)
        self.figure_fn = figure_fn
        self.logger: Logger | None = None
        self.files = files
        self.device = device
        self.run_dir = files.run_dir
        self.checkpoint_path = self.run_dir / CHECKPOINT_FILE
        self.start_epoch = 0
        self.partial: dict[str, Any] | None = None

    # ---- checkpoints -------------------------------------------------------------------------
    def state_dict(self, completed_epoch: int, partial: dict[str, Any] | None = None) -> dict[str, Any]:
        """What last.pt holds: weights + logits, optimizer, LR schedule, RNGs, W&B id, a half epoch."""
        return {
            "epoch": completed_epoch,
            "epochs": self.config.epochs,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "rng": capture_rng_state(),
            "wandb_run_id": self.logger.run_id if self.logger is not None else None,
            "partial": partial,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: after its last completed epoch, or inside the epoch it was stopped in."""
        if state["epochs"] != self.config.epochs:
            raise CheckpointError(
                f"trainer.epochs={self.config.epochs} but {self.checkpoint_path} belongs to a {state['epochs']}-epoch "
                f"run (its LR and sparsity schedules depend on it); resume with trainer.epochs={state['epochs']}"
            )
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first_line = str(exc).strip().splitlines()[0]
            raise CheckpointError(
                f"trainer.resume: {self.checkpoint_path} does not fit the configured model/optimizer "
                f"(was the config changed?): {first_line}"
            ) from None
        restore_rng_state(state["rng"])
        self.start_epoch = state["epoch"] + 1
        self.partial = state["partial"]
        where = f"epoch {self.start_epoch}" + (f", step {len(self.partial['history'])}" if self.partial else "")
        log.info("Resuming from %s at %s", self.checkpoint_path, where)

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self, logger: Logger) -> dict[str, Any]:
        """Train to the last epoch, logging to ``logger``; returns the final summary.

        Raises TrainingDiverged (non-finite loss) or TrainingInterrupted (SIGINT/SIGTERM, after a checkpoint).
        """
        self.logger = logger
        epochs = self.config.epochs
        self.files.start(self.start_epoch)
        self.files.write_summary("running")
        with StopSignals() as stop:
            for epoch in range(self.start_epoch, epochs):
                coeff = float(self.schedule(epoch, epochs))
                lr = self.optimizer.param_groups[0]["lr"]

                train = self._train_epoch(epoch, coeff, stop)
                self.lr_scheduler.step()

                tic = time.perf_counter()
                eval_accuracy, eval_loss = self._evaluate()
                eval_s = time.perf_counter() - tic
                tic = time.perf_counter()
                result = self.evaluator.evaluate(self.model)
                evaluator_s = time.perf_counter() - tic

                row = {
                    "epoch": epoch,
                    **train,
                    "train/sparsity_coeff": coeff,
                    "eval/accuracy": eval_accuracy,
                    "eval/loss": eval_loss,
                    **result.as_metrics(),
                    "lr": lr,
                    "time/eval_s": eval_s,
                    "time/evaluator_s": evaluator_s,
                }
                if epoch % self.config.viz_interval == 0 or epoch == epochs - 1:
                    tic = time.perf_counter()
                    self._save_figures(result, epoch)
                    row["time/figures_s"] = time.perf_counter() - tic
                self.files.append(row)
                self.logger.log_metrics(row, step=epoch)
                save_checkpoint(self.checkpoint_path, self.state_dict(epoch))
                self.files.write_summary("running")
                log.info(
                    "epoch %d/%d | loss %.4f | train acc %.4f | eval acc %.4f | unstructured Rel. BOPs %.2f%% "
                    "| sparsity %.3f | bits %.2f | %.1f s",
                    epoch + 1,
                    epochs,
                    train["train/loss"],
                    train["train/accuracy"],
                    eval_accuracy,
                    row["compression/unstructured_rel_bops_pct"],
                    row["sparsity/unstructured"],
                    row["bits/mean"],
                    train["time/train_s"],
                )
                if stop.signum is not None:
                    self._interrupt(stop.signum, f"after epoch {epoch} (counting from 0)")
        return self.files.write_summary("completed")

    def _train_epoch(self, epoch: int, coeff: float, stop: StopSignals) -> dict[str, float]:
        """One pass over the training batches; per-step sums stay on the device (a sync every N steps)."""
        self.model.train()
        resumed = self.partial if self.partial is not None and self.partial["epoch"] == epoch else None
        self.partial = None
        history = list(resumed["history"].to(self.device).unbind(0)) if resumed else []
        seen = resumed["seen"] if resumed else 0
        train_s = resumed["train_s"] if resumed else 0.0
        strength = self.sparsity_weight * coeff
        zero = torch.zeros((), device=self.device)
        skip = len(history)
        batches = self.data.train_batches(epoch)
        bar = tqdm(
            total=len(batches) if hasattr(batches, "__len__") else None,
            initial=skip,
            desc=f"epoch {epoch + 1}/{self.config.epochs}",
            unit="step",
            leave=False,
            disable=None,
        )
        tic = time.perf_counter()
        for step, (x, y) in enumerate(batches):
            if step < skip:
                continue  # replaying a stopped epoch: these batches were trained on before the checkpoint
            if self.config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.quantized_weights(), self._autocast():
                logits = self.forward(x)
                ce = F.cross_entropy(logits, y)
                if self.sparsity_fn is None:
                    sparsity, loss = zero, ce
                else:
                    sparsity = self.sparsity_fn(self.model)
                    loss = ce + strength * sparsity
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()

            correct = (logits.argmax(1) == y).sum()
            history.append(
                torch.stack((loss.detach().float(), ce.detach().float(), sparsity.detach().float(), correct.float()))
            )
            seen += y.shape[0]
            bar.update(1)
            if (step + 1) % self.config.log_every_steps == 0:
                totals = self._check_finite(history, epoch)
                elapsed = train_s + time.perf_counter() - tic
                bar.set_postfix(
                    loss=f"{totals[0] / len(history):.4f}",
                    acc=f"{totals[3] / seen:.4f}",
                    img_s=f"{seen / elapsed:.0f}",
                    refresh=False,
                )
            if stop.signum is not None:
                self._check_finite(history, epoch)
                partial = {
                    "epoch": epoch,
                    "history": torch.stack(history).cpu(),
                    "seen": seen,
                    "train_s": train_s + time.perf_counter() - tic,
                }
                save_checkpoint(self.checkpoint_path, self.state_dict(epoch - 1, partial))
                bar.close()
                self._interrupt(stop.signum, f"at epoch {epoch}, step {step} (counting from 0)")
        bar.close()
        if not history:
            raise ConfigError("dataset: the training set yields no batches (check dataset.batch_size and its size)")
        totals = self._check_finite(history, epoch)
        train_s += time.perf_counter() - tic
        steps = len(history)
        return {
            "train/loss": totals[0] / steps,
            "train/ce_loss": totals[1] / steps,
            "train/sparsity_loss": totals[2] / steps,
            "train/accuracy": totals[3] / seen,
            "time/train_s": train_s,
            "train/images_per_s": seen / train_s,
        }

    def _check_finite(self, history: list[torch.Tensor], epoch: int) -> list[float]:
        """Column sums of the step history (loss, ce, sparsity, correct) — one host sync; stop on a non-finite loss."""
        stacked = torch.stack(history)
        finite = torch.isfinite(stacked[:, 0])
        summary = torch.cat((stacked.sum(0), finite.all().float()[None])).tolist()
        if summary[-1] == 1.0:
            return summary[:4]
        step = int((~finite).nonzero()[0, 0])
        loss, ce, sparsity, _ = stacked[step].tolist()
        lrs = ", ".join(f"{g.get('name', i)} lr {g['lr']:.3g}" for i, g in enumerate(self.optimizer.param_groups))
        raise TrainingDiverged(
            f"training diverged: non-finite loss at epoch {epoch}, step {step} (counting from 0; loss {loss}, ce {ce}, "
            f"sparsity {sparsity}); lower the learning rates (optimizer.lr/lr_dz/lr_bit: {lrs}) or the sparsity "
            f"strength (sparsity.weight={self.sparsity_weight:g}); last good checkpoint: {self.checkpoint_path}"
        )

    @torch.no_grad()
    def _evaluate(self) -> tuple[float, float]:
        """Test accuracy (fraction) and mean CE with quantization on; quantizers run once for the whole pass."""
        self.model.eval()
        sums = torch.zeros(2, device=self.device)
        seen = 0
        with self.quantized_weights(), self._autocast():
            for x, y in self.data.test_batches():
                if self.config.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                logits = self.forward(x)
                sums += torch.stack(
                    (F.cross_entropy(logits, y, reduction="sum").float(), (logits.argmax(1) == y).sum().float())
                )
                seen += y.shape[0]
        if seen == 0:
            raise ConfigError("dataset: the test set yields no batches (check dataset.test_size)")
        loss_sum, correct = sums.tolist()
        return correct / seen, loss_sum / seen

    def _save_figures(self, result: Any, epoch: int) -> None:
        """Write <name>.png (latest epoch wins) and hand those files to the logger (figures hold no pyplot state)."""
        paths = {}
        for name, fig in self.figure_fn(self.model, result).items():
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=100)
            paths[name] = self.run_dir / f"{name}.png"
            atomic_write_bytes(paths[name], buffer.getvalue())
        self.logger.log_figures(paths, step=epoch)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _interrupt(self, signum: int, where: str) -> None:
        name = signal.Signals(signum).name
        raise TrainingInterrupted(
            f"interrupted by {name} {where}; checkpoint {self.checkpoint_path} written; continue with "
            f"trainer.resume=true hydra.run.dir={self.run_dir}",
            signum,
        )
