"""Stopping and resuming a run: SIGINT/SIGTERM handling, the training state in last.pt, a stopped epoch's replay.

A signal lets the current step finish, then the trainer checkpoints the steps done so far in the epoch
(``EpochProgress``); a resumed run skips those batches (the data order is a function of seed and epoch)
and continues with the same step history, so its numbers equal an uninterrupted run's.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from codeq.checkpoint import CheckpointError, capture_rng_state, restore_rng_state

log = logging.getLogger(__name__)


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

    def interrupt(self, where: str, checkpoint_path: Path) -> TrainingInterrupted:
        """The exception that ends the run after the checkpoint at ``checkpoint_path`` was written."""
        name = signal.Signals(self.signum).name
        return TrainingInterrupted(
            f"interrupted by {name} {where}; checkpoint {checkpoint_path} written; re-run the same command with "
            f"trainer.resume=true hydra.run.dir={checkpoint_path.parent}",
            self.signum,
        )


@dataclass
class EpochProgress:
    """The steps of one epoch so far: a [loss, ce, sparsity, correct] row per step, images seen, seconds."""

    epoch: int
    history: list[torch.Tensor] = field(default_factory=list)
    seen: int = 0
    train_s: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "history": torch.stack(self.history).cpu(),
            "seen": self.seen,
            "train_s": self.train_s,
        }

    @classmethod
    def resumed(cls, partial: dict[str, Any] | None, epoch: int, device: torch.device) -> EpochProgress:
        """The progress stored in a checkpoint for ``epoch``, else a fresh start of it."""
        if partial is None or partial["epoch"] != epoch:
            return cls(epoch)
        history = list(partial["history"].to(device).unbind(0))
        return cls(epoch, history, partial["seen"], partial["train_s"])


def training_state(
    completed_epoch: int,
    epochs: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    wandb_run_id: str | None,
    partial: EpochProgress | None = None,
) -> dict[str, Any]:
    """What last.pt holds: weights + logits, optimizer, LR schedule, RNGs, W&B id, a stopped epoch's progress."""
    return {
        "epoch": completed_epoch,
        "epochs": epochs,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "rng": capture_rng_state(),
        "wandb_run_id": wandb_run_id,
        "partial": partial.state_dict() if partial is not None else None,
    }


def restore_training_state(
    state: dict[str, Any],
    path: Path,
    epochs: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[int, dict[str, Any] | None]:
    """Load ``state`` (read from ``path``) into the objects; returns (epoch to start at, stopped epoch's progress)."""
    if state["epochs"] != epochs:
        raise CheckpointError(
            f"trainer.epochs={epochs} but {path} belongs to a {state['epochs']}-epoch "
            f"run (its LR and sparsity schedules depend on it); resume with trainer.epochs={state['epochs']}"
        )
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    except (RuntimeError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise CheckpointError(
            f"trainer.resume: {path} does not fit the configured model/optimizer "
            f"(was the config changed?): {first_line}"
        ) from None
    restore_rng_state(state["rng"])
    start_epoch, partial = state["epoch"] + 1, state["partial"]
    where = f"epoch {start_epoch}" + (f", step {len(partial['history'])}" if partial else "")
    log.info("Resuming from %s at %s", path, where)
    return start_epoch, partial
