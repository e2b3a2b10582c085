"""Loading pretrained weights into a model whose classifier may differ from the weights' (then re-initialised)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from codeq.errors import ConfigError

log = logging.getLogger(__name__)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: a state dict, or a checkpoint holding one under ``state_dict``/``model``.

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.weights={str(path)!r}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            content: Any = load_file(str(path))
        else:
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one line naming it
        raise ConfigError(
            f"model.weights={str(path)!r} is not a readable weights file ({type(exc).__name__})"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(content, Mapping) and isinstance(content.get(key), Mapping):
            content = content[key]
    if not isinstance(content, Mapping) or not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise ConfigError(f"model.weights={str(path)!r} holds no state dict (a mapping of names to tensors)")
    return dict(content)


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, head: str) -> None:
    """Copy ``state_dict`` into ``model``; the classifier module ``head`` keeps its fresh init when its size differs.

    Every other tensor must match by name and shape: a mismatch is a ConfigError naming ``source``.
    """
    own = model.state_dict()
    head_prefix = f"{head}."
    resized = sorted(
        k for k, v in state_dict.items() if k.startswith(head_prefix) and k in own and own[k].shape != v.shape
    )
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape and k not in resized)
    if missing or unexpected or wrong:
        detail = (
            f"missing {missing[:3]}"
            if missing
            else f"unexpected {unexpected[:3]}"
            if unexpected
            else f"{wrong[0]} is {tuple(state_dict[wrong[0]].shape)} in the file, {tuple(own[wrong[0]].shape)} here"
        )
        raise ConfigError(f"model.weights={source} does not fit {type(model).__name__}: {detail}")
    model.load_state_dict({k: v for k, v in state_dict.items() if k not in resized}, strict=False)
    if resized:
        weight = f"{head}.weight"
        before = state_dict[weight].shape[0] if weight in state_dict else "?"
        after = own[weight].shape[0] if weight in own else "?"
        log.info("Loaded %s; classifier %s re-initialised (%s -> %s classes)", source, head, before, after)
    else:
        log.info("Loaded %s", source)
