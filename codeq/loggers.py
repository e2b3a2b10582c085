"""Where a run's metrics and figures go besides the run dir's own files: W&B, a CSV file, or nowhere.

The interface is three calls: ``log_metrics(dict, step=epoch)``, ``log_figures({name: png_path}, step)``
and ``finish(status)``. metrics.jsonl and summary.json are written by the trainer whatever the logger.
"""

from __future__ import annotations

import csv
import io
import logging
import netrc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from codeq.errors import ConfigError
from codeq.rundir import atomic_write_bytes
from codeq.schema import allowed, configured_by

log = logging.getLogger(__name__)

WANDB_MODES = ("auto", "online", "offline", "disabled")


class Logger:
    """A logger that records nothing; the base of the others. ``run_id`` is what a resume passes back."""

    run_id: str | None = None

    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        name: str,
        group: str | None = None,
        job_type: str | None = None,
        run_id: str | None = None,
    ):
        self.run_dir = Path(run_dir)

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """Record one epoch's scalars (``step`` is the epoch)."""

    def log_figures(self, figures: dict[str, Path], step: int) -> None:
        """Record the figures the trainer just wrote to the run dir, by name -> PNG path."""

    def finish(self, status: str) -> None:
        """Close the logger; ``status`` is the run's summary status (completed, interrupted, …)."""


class NullLogger(Logger):
    """logger=none: only the run dir's files."""


class CsvLogger(Logger):
    """logger=csv: metrics.csv beside metrics.jsonl, one row per epoch, rewritten atomically each epoch.

    On resume the rows of epochs the resumed run replays are dropped, as in metrics.jsonl.
    """

    def __init__(self, run_dir: Path, config: dict[str, Any], name: str, **run_info: Any):
        super().__init__(run_dir, config, name, **run_info)
        self.path = self.run_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] | None = None

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        if self.rows is None:
            self.rows = [row for row in self._read() if int(row["epoch"]) < step]
        self.rows.append(dict(metrics))
        columns = list(dict.fromkeys(key for row in self.rows for key in row))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_bytes(self.path, text.getvalue().encode())

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))


def wandb_credentials_exist() -> bool:
    """True when W&B has an API key: WANDB_API_KEY or a ~/.netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    """logger.mode -> the mode W&B runs in: auto = $WANDB_MODE, else online with credentials, else offline."""
    if mode not in WANDB_MODES:
        raise ConfigError(f"logger.mode must be one of {', '.join(WANDB_MODES)}; got {mode!r}")
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if wandb_credentials_exist():
        return "online"
    log.warning("W&B: no credentials found, logging offline to <run dir>/wandb (upload later with `wandb sync`)")
    return "offline"


@dataclass
class WandbKeys:
    project: str = "codeq"
    entity: str | None = None
    mode: str = allowed(default="auto", choices=WANDB_MODES)


@configured_by(WandbKeys)
class WandbLogger(Logger):
    """logger=wandb: one W&B run per job, files under ``<run dir>/wandb``, epoch as the step metric.

    A resumed job passes its previous ``run_id`` and continues the same W&B run.
    """

    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        name: str,
        group: str | None = None,
        job_type: str | None = None,
        run_id: str | None = None,
        project: str = "codeq",
        entity: str | None = None,
        mode: str = "auto",
    ):
        super().__init__(run_dir, config, name, group, job_type, run_id)
        resolved_mode = resolve_wandb_mode(mode)
        import wandb

        self._wandb = wandb
        self.run = wandb.init(
            project=project,
            entity=entity,
            dir=str(self.run_dir),
            config=config,
            name=name,
            group=group,
            job_type=job_type,
            id=run_id,
            resume="allow" if run_id else None,
            mode=resolved_mode,
            reinit="finish_previous",
            settings=wandb.Settings(silent=resolved_mode == "offline"),  # offline: the notice line says it all
        )
        self.run.define_metric("epoch")
        self.run.define_metric("*", step_metric="epoch")
        self.run_id = self.run.id

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log({**metrics, "epoch": step})

    def log_figures(self, figures: dict[str, Path], step: int) -> None:
        self.run.log(
            {**{f"figures/{name}": self._wandb.Image(str(path)) for name, path in figures.items()}, "epoch": step}
        )

    def finish(self, status: str) -> None:
        self.run.summary["status"] = status
        self.run.finish(exit_code=0 if status == "completed" else 1)
