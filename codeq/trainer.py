"""The training loop: epochs of ``codeq.step.TrainingStep``, evaluation, files and checkpoints.

It knows nothing of Hydra: codeq.main builds every object and hands them over. Per epoch it writes one
metrics.jsonl row, the summary, figures every ``viz_interval`` epochs, and last.pt (atomically), so a
killed run resumes exactly where its last checkpoint left it (codeq.resume).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn
from tqdm import tqdm

from codeq.checkpoint import BEST_CHECKPOINT_FILE, CHECKPOINT_FILE, save_checkpoint
from codeq.distributed import Distributed
from codeq.errors import ConfigError
from codeq.loggers import Logger
from codeq.resume import EpochProgress, StopSignals, restore_training_state, training_state
from codeq.rundir import RunFiles
from codeq.schema import allowed, check_values, configured_by
from codeq.sparsity import Proximal, SparsityLoss
from codeq.step import TrainingStep

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainerConfig:
    """The loop's settings (conf/trainer/default.yaml), also their schema: a bad value raises ConfigError."""

    epochs: int = allowed(default=300, minimum=1)
    device: str = "auto"
    resume: bool = False
    viz_interval: int = allowed(default=25, minimum=1)
    sparsity_layer: str | None = None
    precision: str = allowed(default="fp32", choices=PRECISIONS)
    compile: bool = False
    channels_last: bool = False
    log_every_steps: int = allowed(default=25, minimum=1)
    sync_bn: bool = True
    max_loss_ratio: float | None = allowed(default=1.0e4, minimum=1)

    def __post_init__(self):
        check_values(TrainerConfig, "trainer.", dataclasses.asdict(self))


configured_by(TrainerConfig)(TrainerConfig)


class TrainingDiverged(RuntimeError):
    """The loss became non-finite; the message names the epoch, step and the knobs to turn."""


class Trainer:
    """Runs epochs ``start_epoch .. epochs-1`` of loss = CE + λ·schedule(e, E)·sparsity(model).

    ``sparsity_fn``: a loss, a ``codeq.sparsity.Proximal`` step or None (see ``codeq.step.TrainingStep``).
    ``figure_fn(model, eval_result)`` returns {name: Figure}; RunFiles writes them as PNGs.
    The logger is given to ``fit``, so a checkpoint can be restored before a W&B run is opened.

    Data-parallel (``ranks`` of several processes): every rank trains on its part of each global batch through
    DistributedDataParallel; the step history and the test sums are summed over ranks, a stop signal on any
    rank stops all at the same step (agreed every ``log_every_steps`` steps), and rank 0 alone evaluates the
    cost, writes files and checkpoints and logs.
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
        sparsity_fn: SparsityLoss | Proximal | None,
        sparsity_weight: float,
        figure_fn: Callable[[nn.Module, Any], dict[str, Figure]],
        files: RunFiles,
        device: torch.device,
        ranks: Distributed | None = None,
    ):
        self.config = config
        self.model = model
        self.ranks = Distributed() if ranks is None else ranks
        self.step = TrainingStep(
            model,
            optimizer,
            sparsity_fn,
            compile=config.compile,
            precision=config.precision,
            channels_last=config.channels_last,
            forward=self.ranks.wrap(model),
        )
        self.data = data
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.evaluator = evaluator
        self.schedule = schedule
        self.sparsity_weight = float(sparsity_weight)
        self.figure_fn = figure_fn
        self.logger: Logger | None = None
        self.files = files
        self.device = device
        self.run_dir = files.run_dir
        self.checkpoint_path = self.run_dir / CHECKPOINT_FILE
        self.start_epoch = 0
        self.wrote_checkpoint = False  # this run wrote last.pt or resumed from it (a stale file is not "good")
        self.first_loss: float | None = None  # the run's first logged loss, for trainer.max_loss_ratio
        self.partial: dict[str, Any] | None = None

    def state_dict(self, completed_epoch: int, partial: EpochProgress | None = None) -> dict[str, Any]:
        """What last.pt holds (codeq.resume.training_state)."""
        run_id = self.logger.run_id if self.logger is not None else None
        return training_state(
            completed_epoch, self.config.epochs, self.model, self.optimizer, self.lr_scheduler, run_id, partial
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: after its last completed epoch, or inside the epoch it was stopped in."""
        self.start_epoch, self.partial = restore_training_state(
            state, self.checkpoint_path, self.config.epochs, self.model, self.optimizer, self.lr_scheduler
        )
        self.wrote_checkpoint = True

    def fit(self, logger: Logger) -> dict[str, Any]:
        """Train to the last epoch, logging to ``logger``; returns the final summary.

        Raises TrainingDiverged (non-finite loss) or TrainingInterrupted (SIGINT/SIGTERM, after a checkpoint).
        """
        self.logger = logger
        if self.ranks.is_main:
            self.files.start(self.start_epoch)
            self.files.write_summary("running")
        with StopSignals() as stop:
            for epoch in range(self.start_epoch, self.config.epochs):
                row = self._epoch(epoch, stop)
                self.ranks.check_replicas_agree(self.model)
                if self.ranks.is_main:
                    self._record_epoch(row)
                stop.signum = self.ranks.agreed_signal(stop.signum)
                self.wrote_checkpoint = True  # rank 0 wrote last.pt for this epoch
                if stop.signum is not None:
                    raise stop.interrupt(f"after epoch {epoch} (counting from 0)", self.checkpoint_path)
        return self.files.write_summary("completed") if self.ranks.is_main else {}

    def _epoch(self, epoch: int, stop: StopSignals) -> dict[str, Any]:
        """Train one epoch, step the LR schedule and test (every rank): the row's training and test part."""
        coeff = float(self.schedule(epoch, self.config.epochs))
        lr = self.optimizer.param_groups[0]["lr"]
        train = self._train_epoch(epoch, self.sparsity_weight * coeff, stop)
        self.lr_scheduler.step()
        tic = time.perf_counter()
        eval_accuracy, eval_loss = self._test()
        return {
            "epoch": epoch,
            **train,
            "train/sparsity_coeff": coeff,
            "eval/accuracy": eval_accuracy,
            "eval/loss": eval_loss,
            "lr": lr,
            "time/eval_s": time.perf_counter() - tic,
        }

    def _record_epoch(self, row: dict[str, Any]) -> None:
        """Rank 0: count the cost, draw the figures when due, append the row, log it, checkpoint."""
        epoch = row["epoch"]
        tic = time.perf_counter()
        result = self.evaluator.evaluate(self.model)
        row.update(result.as_metrics())
        row["time/evaluator_s"] = time.perf_counter() - tic
        if epoch % self.config.viz_interval == 0 or epoch == self.config.epochs - 1:
            tic = time.perf_counter()
            paths = self.files.write_figures(self.figure_fn(self.model, result), epoch)
            self.logger.log_figures(paths, step=epoch)
            row["time/figures_s"] = time.perf_counter() - tic
        self.files.append(row)
        self.logger.log_metrics(row, step=epoch)
        state = self.state_dict(epoch)
        save_checkpoint(self.checkpoint_path, state)
        if self.files.best_row() is row:
            save_checkpoint(self.run_dir / BEST_CHECKPOINT_FILE, state)
        self.files.write_summary("running")
        self._log_epoch(row)

    def _train_epoch(self, epoch: int, strength: float, stop: StopSignals) -> dict[str, float]:
        """One pass over the training batches; per-step sums stay on the device (a sync every N steps)."""
        self.model.train()
        ranks = self.ranks
        progress = EpochProgress.resumed(self.partial, epoch, self.device)
        self.partial = None
        if not ranks.is_main:  # the checkpoint holds the steps' sums over ranks; rank 0 carries them
            progress.history = [torch.zeros_like(row) for row in progress.history]
        skip = len(progress.history)
        batches = self.data.train_batches(epoch, ranks.rank, ranks.world_size)
        total = len(batches) if hasattr(batches, "__len__") else None
        desc = f"epoch {epoch + 1}/{self.config.epochs}"
        bar = tqdm(
            total=total, initial=skip, desc=desc, unit="step", leave=False, disable=None if ranks.is_main else True
        )
        # [loss, ce, sparsity] of a rank's step are its share of the global batch's: summed over ranks they are those
        share = torch.tensor([1 / ranks.world_size] * 3 + [1.0], device=self.device)
        tic, train_s = time.perf_counter(), progress.train_s
        for step, (x, y) in enumerate(batches):
            if step < skip:
                continue  # replaying a stopped epoch: these batches were trained on before the checkpoint
            images = min(self.data.batch_size, self.data.num_train - step * self.data.batch_size)  # the global batch
            row = self.step(x, y, strength, images / ranks.world_size)
            progress.history.append(row * share if ranks.active else row)
            progress.seen += images
            bar.update(1)
            signum = None if ranks.active else stop.signum  # data-parallel: agreed at the next sync only
            if (step + 1) % self.config.log_every_steps == 0:
                totals = self._check_finite(progress.history, epoch)
                elapsed = train_s + time.perf_counter() - tic
                loss, acc, img_s = totals[0] / len(progress.history), totals[3] / progress.seen, progress.seen / elapsed
                bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.4f}", img_s=f"{img_s:.0f}", refresh=False)
                signum = stop.signum = ranks.agreed_signal(stop.signum)
            if signum is not None:
                history = self._summed(progress.history)
                self._check_finite(progress.history, epoch, history)
                progress.train_s = train_s + time.perf_counter() - tic
                if ranks.is_main:
                    stopped = EpochProgress(epoch, list(history.unbind(0)), progress.seen, progress.train_s)
                    save_checkpoint(self.checkpoint_path, self.state_dict(epoch - 1, stopped))
                ranks.barrier()  # no rank exits (and has torchrun stop the others) before the checkpoint is whole
                bar.close()
                raise stop.interrupt(f"at epoch {epoch}, step {step} (counting from 0)", self.checkpoint_path)
        bar.close()
        if not progress.history:
            raise ConfigError("dataset: the training set yields no batches (check dataset.batch_size and its size)")
        totals = self._check_finite(progress.history, epoch)
        train_s += time.perf_counter() - tic
        steps, seen = len(progress.history), progress.seen
        return {
            "train/loss": totals[0] / steps,
            "train/ce_loss": totals[1] / steps,
            "train/sparsity_loss": totals[2] / steps,
            "train/accuracy": totals[3] / seen,
            "time/train_s": train_s,
            "train/images_per_s": seen / train_s,
        }

    def _summed(self, history: list[torch.Tensor]) -> torch.Tensor:
        """The step history stacked, summed over ranks: per step the global batch's loss, ce, sparsity, correct."""
        return self.ranks.all_reduce(torch.stack(history))

    def _check_finite(self, history: list[torch.Tensor], epoch: int, summed: torch.Tensor | None = None) -> list[float]:
        """Column sums of the step history over ranks (loss, ce, sparsity, correct) — one host sync (and
        data-parallel one all-reduce, so a diverged loss on any rank stops every rank). Diverged: non-finite, or
        above trainer.max_loss_ratio × the run's first logged loss."""
        stacked = self._summed(history) if summed is None else summed
        if self.first_loss is None:
            self.first_loss = float(stacked[0, 0])
        ratio = self.config.max_loss_ratio
        limit = math.inf if ratio is None or not math.isfinite(self.first_loss) else ratio * abs(self.first_loss)
        healthy = torch.isfinite(stacked[:, 0]) & (stacked[:, 0] <= limit)
        summary = torch.cat((stacked.sum(0), healthy.all().float()[None])).tolist()
        if summary[-1] == 1.0:
            return summary[:4]
        step = int((~healthy).nonzero()[0, 0])
        loss, ce, sparsity, _ = stacked[step].tolist()
        what = (
            "non-finite loss"
            if not math.isfinite(loss)
            else (
                f"loss {loss:.3g} above trainer.max_loss_ratio={ratio:g} x the first logged loss {self.first_loss:.3g}"
            )
        )
        lrs = ", ".join(f"{g.get('name', i)} lr {g['lr']:.3g}" for i, g in enumerate(self.optimizer.param_groups))
        checkpoint = (
            f"last good checkpoint: {self.checkpoint_path}"
            if self.wrote_checkpoint
            else "no checkpoint was written (it diverged before its first epoch ended)"
        )
        raise TrainingDiverged(
            f"training diverged: {what} at epoch {epoch}, step {step} (counting from 0; loss {loss}, ce {ce}, "
            f"sparsity {sparsity}); lower the learning rates (optimizer.lr/lr_dz/lr_bit: {lrs}) or the sparsity "
            f"strength (sparsity.weight={self.sparsity_weight:g}); {checkpoint}"
        )

    def _test(self) -> tuple[float, float]:
        """Test accuracy (fraction) and mean CE with quantization on, over every rank's part of the test set."""
        batches = self.data.test_batches(self.ranks.rank, self.ranks.world_size)
        sums = torch.tensor(self.step.test(batches, self.device), dtype=torch.float64)
        seen, loss_sum, correct = self.ranks.all_reduce(sums).tolist()
        if seen == 0:
            raise ConfigError("dataset: the test set yields no batches (check dataset.test_size)")
        return correct / seen, loss_sum / seen

    def _log_epoch(self, row: dict[str, Any]) -> None:
        log.info(
            "epoch %d/%d | loss %.4f | train acc %.4f | eval acc %.4f | unstructured Rel. BOPs %.2f%% "
            "| sparsity %.3f | bits %.2f | %.1f s",
            row["epoch"] + 1,
            self.config.epochs,
            row["train/loss"],
            row["train/accuracy"],
            row["eval/accuracy"],
            row["compression/unstructured_rel_bops_pct"],
            row["sparsity/unstructured"],
            row["bits/mean"],
            row["time/train_s"],
        )
