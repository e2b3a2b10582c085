"""The run dir's plain files: metrics.jsonl, summary.json, failed.json and the figures (README "What a run writes").

They are written whatever logger is chosen and are the source of truth for tests, resume and the report.
A write that fails (disk full, read-only dir) raises RunFileError naming the file and the OS error and
leaves what was there before intact: the old file for atomic writes, the earlier rows for metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
FAILED_FILE = "failed.json"
FIGURES_DIR = "figures"


class RunFileError(OSError):
    """A run-dir file could not be written; the message names it and the OS error."""

    def __init__(self, path: Path, error: OSError):
        reason = error.strerror or str(error) or type(error).__name__
        super().__init__(
            error.errno, f"cannot write {path}: {reason}" + (f" (errno {error.errno})" if error.errno else "")
        )
        self.path = Path(path)

    def __str__(self) -> str:
        return self.strerror


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the new one, never half of one.

    temp file in the same dir -> fsync -> rename over ``path`` -> fsync the dir. On an OSError the temp
    file is removed and RunFileError is raised; ``path`` keeps its previous content.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise RunFileError(path, exc) from None
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The complete rows of a metrics.jsonl file; a half-written (unparsable) last line is dropped.

    Any other bad line is a ValueError naming the file and the line number.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                log.warning("dropping a half-written last line of %s", path)
                continue
            raise ValueError(f"{path.name} line {number} is not valid JSON ({exc})") from exc
        if not isinstance(row, dict):
            raise ValueError(f"{path.name} line {number} is not a JSON object")
        rows.append(row)
    return rows


class RunFiles:
    """Writes one run's metrics.jsonl (append + flush + fsync per epoch), summary.json and failed.json.

    Rows already in the dir are read at once, so a job failing before it trains (a typo on resume)
    still reports them in its summary instead of clobbering them.
    """

    def __init__(self, run_dir: Path, epochs: int | None = None):
        self.run_dir = Path(run_dir)
        self.epochs = epochs
        self.metrics_path = self.run_dir / METRICS_FILE
        self.summary_path = self.run_dir / SUMMARY_FILE
        self.failed_path = self.run_dir / FAILED_FILE
        self.rows: list[dict[str, Any]] = read_metrics(self.metrics_path)

    def start(self, completed_epochs: int) -> None:
        """Keep the rows of epochs ``< completed_epochs`` (what the checkpoint holds), drop the rest.

        Rows beyond the checkpoint (killed between metrics and checkpoint) are replayed by the resumed
        run, so every epoch ends up in metrics.jsonl exactly once. A stale failed.json is removed.
        """
        self.rows = [row for row in read_metrics(self.metrics_path) if row["epoch"] < completed_epochs]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(row) + "\n" for row in self.rows)
        atomic_write_bytes(self.metrics_path, text.encode())
        if self.failed_path.exists():
            self.failed_path.unlink()

    def append(self, row: dict[str, Any]) -> None:
        """Append one epoch's row and make it durable before anything else about the epoch is written.

        If the write fails the file is cut back to its previous rows and RunFileError is raised.
        """
        line = (json.dumps(row) + "\n").encode()
        try:
            fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunFileError(self.metrics_path, exc) from None
        try:
            size = os.fstat(fd).st_size
            written = 0
            while written < len(line):
                written += os.write(fd, line[written:])
            os.fsync(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise RunFileError(self.metrics_path, exc) from None
        finally:
            os.close(fd)
        self.rows.append(row)

    def best_row(self) -> dict[str, Any] | None:
        """The row of the highest eval accuracy (the first one on ties), or None before any epoch."""
        return max(self.rows, key=lambda r: r["eval/accuracy"], default=None)

    def write_summary(self, status: str, error: str | None = None) -> dict[str, Any]:
        """Rewrite summary.json atomically from the rows written so far."""
        best = self.best_row()
        summary: dict[str, Any] = {
            "status": status,
            "epochs": self.epochs,
            "epochs_completed": len(self.rows),
            "best_accuracy": best["eval/accuracy"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "final": self.rows[-1] if self.rows else {},
        }
        if error is not None:
            summary["error"] = error
        atomic_write_bytes(self.summary_path, (json.dumps(summary, indent=2) + "\n").encode())
        return summary

    def write_failed(self, error: str, error_type: str) -> None:
        """Record why the job failed: {"error", "type", "epoch": last completed epoch or null}."""
        epoch = self.rows[-1]["epoch"] if self.rows else None
        record = {"error": error, "type": error_type, "epoch": epoch}
        atomic_write_bytes(self.failed_path, (json.dumps(record, indent=2) + "\n").encode())

    def write_figures(self, figures: dict[str, Figure], epoch: int) -> dict[str, Path]:
        """Write each figure as figures/<name>/epoch_<epoch>.png (the history) and <name>.png (the latest).

        Returns the latest-name paths. Both are written atomically; figures hold no pyplot state.
        """
        paths = {}
        for name, fig in figures.items():
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=100)
            history = self.run_dir / FIGURES_DIR / name / f"epoch_{epoch:04d}.png"
            history.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(history, buffer.getvalue())
            paths[name] = self.run_dir / f"{name}.png"
            atomic_write_bytes(paths[name], buffer.getvalue())
        return paths

    def last_completed_epoch(self) -> int | None:
        """The epoch of the last row written, or None before the first epoch ends."""
        return self.rows[-1]["epoch"] if self.rows else None
