"""last.pt: everything a run needs to continue exactly where it stopped, written atomically.

A checkpoint is a plain dict loadable with ``torch.load(weights_only=True)``: tensors, numbers,
strings, lists and dicts only (the numpy RNG state is stored as a tensor for that reason).
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codeq.errors import ConfigError
from codeq.rundir import atomic_write_bytes

CHECKPOINT_FILE = "last.pt"
BEST_CHECKPOINT_FILE = "best.pt"  # the same state, written at the epoch of the best eval accuracy
FORMAT_VERSION = 1
REQUIRED_KEYS = ("version", "epoch", "epochs", "model", "optimizer", "lr_scheduler", "rng", "wandb_run_id", "partial")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read or does not fit the configured run."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Serialize ``state`` in memory, then write it atomically (temp file, fsync, rename)."""
    buffer = io.BytesIO()
    torch.save({"version": FORMAT_VERSION, **state}, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read and check a checkpoint; anything unreadable is a CheckpointError with one clear line."""
    path = Path(path)
    hint = f"delete {path} to start over, or set trainer.resume=false"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"trainer.resume: cannot read checkpoint {path} ({reason}); {hint}") from None
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        raise CheckpointError(f"trainer.resume: {path} is not a codeq checkpoint; {hint}")
    if state["version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"trainer.resume: {path} has format version {state['version']}, this codeq reads {FORMAT_VERSION}; {hint}"
        )
    return state


def capture_rng_state() -> dict[str, Any]:
    """The RNG states of python, numpy, torch and (when present) every CUDA device."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": _to_lists(random.getstate()),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of capture_rng_state."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(value: Any) -> Any:
    """Tuples -> lists, recursively (python's RNG state, for weights_only loading)."""
    if isinstance(value, tuple):
        return [_to_lists(v) for v in value]
    return value
