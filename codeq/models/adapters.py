"""Classification models of torchvision and timm by name, with pretrained weights by name or from a file.

Both builders take the dataset's ``num_classes`` and ``input_size`` ``[C, H, W]``. ``weights`` is None (random
init), the library's own weights name (downloaded into and read from the library's cache), or a path to a state
dict. When the weights' classifier has another number of classes, the classifier keeps its fresh init (logged).
The built model runs one forward pass on a zero ``input_size`` batch, so a model that cannot take the data's
image size fails here, in one line.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from codeq.errors import ConfigError
from codeq.models.exclusions import first_and_last_layers
from codeq.models.weights import load_weights, read_state_dict

log = logging.getLogger(__name__)

WEIGHTS_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


def is_weights_file(weights: str) -> bool:
    """A weights value names a file when it has a path separator or a weights-file suffix."""
    return os.sep in weights or "/" in weights or weights.endswith(WEIGHTS_FILE_SUFFIXES)


def _check_input_size(input_size) -> tuple[int, int, int]:
    values = tuple(input_size) if input_size is not None else ()
    if len(values) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ConfigError(f"model.input_size must be [C, H, W], three integers >= 1, got {input_size!r}")
    return values


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"model.num_classes must be an integer >= 1, got {num_classes!r}")
    return num_classes


def _probe(model: nn.Module, label: str, input_size: tuple[int, int, int]) -> nn.Module:
    """One forward pass on a zero batch of two in eval mode; a model that cannot take the size fails in one line."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, *input_size))
    except Exception as exc:  # noqa: BLE001 - whatever the architecture raises becomes one line
        size = "x".join(map(str, input_size))
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ConfigError(f"model.name={label} cannot take {size} inputs ({reason})") from None
    model.train(training)
    return model


def torchvision_model(name: str, num_classes: int, input_size=(3, 224, 224), weights: str | None = None) -> nn.Module:
    """``torchvision.models.get_model(name)`` with ``num_classes`` outputs.

    ``weights``: None, a torchvision weights name of this model (``IMAGENET1K_V1``, ``DEFAULT``,
    ``ResNet50_Weights.IMAGENET1K_V2``; fetched by torchvision into ``$TORCH_HOME/hub/checkpoints``), or a file.
    """
    import torchvision.models as tv

    names = tv.list_models(module=tv)
    if name not in names:
        raise ConfigError(
            f"model.name={name!r} is not a torchvision classification model; allowed: e.g. resnet18, resnet50, "
            f"mobilenet_v2, efficientnet_b0 ({len(names)} in torchvision.models.list_models())"
        )
    num_classes = _check_num_classes(num_classes)
    input_size = _check_input_size(input_size)
    if input_size[0] != 3:
        raise ConfigError(f"model=torchvision takes RGB images (3 channels); the dataset has {input_size[0]}")
    model = tv.get_model(name, weights=None, num_classes=num_classes)
    if weights is not None:
        head = first_and_last_layers(model)[-1]
        if is_weights_file(str(weights)):
            load_weights(model, read_state_dict(weights), str(weights), head)
        else:
            enum = _torchvision_weights(tv, name, str(weights))
            load_weights(model, _download(enum, str(weights)), f"{weights} ({enum})", head)
    return _probe(model, name, input_size)


def _torchvision_weights(tv, name: str, weights: str):
    """The torchvision weights enum member ``weights`` of model ``name``."""
    try:
        return tv.get_weight(weights) if "." in weights else tv.get_model_weights(name)[weights]
    except (KeyError, ValueError, AttributeError):
        allowed = ", ".join(["DEFAULT", *(w.name for w in tv.get_model_weights(name))])
        raise ConfigError(
            f"model.weights={weights!r} is not a weights name of {name}; allowed: {allowed}, "
            "or a path to a state-dict file"
        ) from None


def _download(enum, weights: str) -> dict[str, torch.Tensor]:
    """torchvision's weights, from its cache or downloaded; one line saying where to put the file when offline."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(enum.url).path)
    try:
        return enum.get_state_dict(progress=False)
    except (OSError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise ConfigError(
            f"model.weights={weights}: cannot download {enum.url} ({reason}); put that file at "
            f"{cached}, or pass model.weights=/path/to/state_dict.pth"
        ) from None


def timm_model(
    name: str, num_classes: int, input_size=(3, 224, 224), weights: str | None = None, drop_path_rate: float = 0.0
) -> nn.Module:
    """``timm.create_model(name)`` with ``num_classes`` outputs, ``in_chans = C`` and ``img_size = (H, W)`` where the
    architecture takes one (otherwise it adapts to the input itself, e.g. TinyViT).

    ``weights``: None, a timm pretrained tag of this model (``in1k``, ``dist_in22k_ft_in1k``, or ``default``; fetched
    by timm from the Hugging Face hub), or a file (``.safetensors`` or a torch state dict).
    """
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        raise ConfigError(
            f"model.name={name!r} is not a timm model; allowed: any of timm.list_models()"
            + (f", e.g. {', '.join(close)}" if close else "")
        )
    num_classes = _check_num_classes(num_classes)
    input_size = _check_input_size(input_size)
    kwargs = {"num_classes": num_classes, "in_chans": input_size[0], "drop_path_rate": float(drop_path_rate)}
    pretrained = weights is not None and not is_weights_file(str(weights))
    full_name = name if not pretrained or weights == "default" else f"{name}.{weights}"
    if pretrained and weights != "default" and full_name not in timm.list_pretrained(f"{name}.*"):
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{name}.*")]
        raise ConfigError(
            f"model.weights={weights!r} is not a pretrained tag of {name}; allowed: default, "
            f"{', '.join(tags) or '(none)'}, or a path to a weights file"
        )
    try:
        model = _create_timm(timm, full_name, pretrained, kwargs, input_size)
    except (OSError, RuntimeError) as exc:
        if not pretrained:
            raise
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise ConfigError(
            f"model.weights={weights}: timm cannot fetch {full_name} from the Hugging Face hub ({reason}); "
            "download its model.safetensors and pass model.weights=/path/to/model.safetensors"
        ) from None
    if weights is not None and not pretrained:
        head = model.pretrained_cfg.get("classifier") or first_and_last_layers(model)[-1]
        load_weights(model, read_state_dict(weights), str(weights), head)
    return _probe(model, name, input_size)


def _create_timm(timm, full_name: str, pretrained: bool, kwargs: dict, input_size: tuple[int, int, int]) -> nn.Module:
    """Create with ``img_size = (H, W)``; an architecture without that argument is created without it (logged)."""
    try:
        return timm.create_model(full_name, pretrained=pretrained, img_size=tuple(input_size[1:]), **kwargs)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
    log.info(
        "%s takes no img_size argument: it is built as is and adapts to %s inputs",
        full_name,
        "x".join(map(str, input_size)),
    )
    return timm.create_model(full_name, pretrained=pretrained, **kwargs)
