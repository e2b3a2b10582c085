"""trainer.device -> torch.device: the configured accelerator, checked against this machine."""

from __future__ import annotations

import torch

from codeq.errors import ConfigError


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
