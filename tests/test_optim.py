"""Parameter groups asked of each quantizer, the optimizers and the LR schedules of the config groups."""

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn
from toy_models import TinyConvNet

from codeq.errors import ConfigError
from codeq.main import CONF_DIR, instantiate_group
from codeq.optim import adamw, parameter_groups, sgd
from codeq.quant import DeadZoneLDZCompander, attach_weight_quantizers

GROUP_SETTINGS = dict(lr=0.1, weight_decay=0.0, lr_dz=0.2, weight_decay_dz=0.01, lr_bit=0.3, weight_decay_bit=0.02)


def lr_schedule(option: str, epochs: int, *overrides: str) -> list[float]:
    """The weights' learning rate at each epoch under conf/lr_scheduler/<option>.yaml (base lr 1)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"lr_scheduler={option}", f"trainer.epochs={epochs}", *overrides])
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = instantiate_group(cfg, "lr_scheduler")(optimizer)
    rates = []
    for _ in range(epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_each_quantizer_names_its_groups():
    model = TinyConvNet()
    attach_weight_quantizers(model, [], DeadZoneLDZCompander)
    groups = parameter_groups(model)
    assert [len(groups[name]) for name in ("weights", "deadzone", "bits")] == [2, 2, 2]
    assert all(p.shape == (8, 4, 3, 3) or p.shape == (4, 3, 3, 3) for p in groups["weights"])


def test_a_quantizer_parameter_outside_every_group_is_an_error():
    class Unnamed(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def param_groups(self):
            return {}

        def forward(self, w):
            return w * self.scale

    model = TinyConvNet()
    attach_weight_quantizers(model, [], Unnamed)
    with pytest.raises(TypeError, match="Unnamed has parameters that its param_groups"):
        parameter_groups(model)


def test_sgd_has_the_three_groups_with_nesterov_momentum():
    model = TinyConvNet()
    attach_weight_quantizers(model, [], DeadZoneLDZCompander)
    optimizer = sgd(model, **GROUP_SETTINGS, momentum=0.8)
    assert [(g["name"], g["lr"], g["momentum"], g["nesterov"]) for g in optimizer.param_groups] == [
        ("weights", 0.1, 0.8, True),
        ("deadzone", 0.2, 0.8, True),
        ("bits", 0.3, 0.8, True),
    ]
    with pytest.raises(ConfigError, match="optimizer.momentum must be a finite number >= 0, got -1"):
        sgd(model, **GROUP_SETTINGS, momentum=-1)


def test_adamw_validates_every_setting():
    model = TinyConvNet()
    with pytest.raises(ConfigError, match=r"optimizer.lr_dz must be a finite number >= 0, got -1"):
        adamw(model, **(GROUP_SETTINGS | {"lr_dz": -1}))
    with pytest.raises(ConfigError, match="optimizer.betas"):
        adamw(model, **GROUP_SETTINGS, betas=[0.9, 1.5])


def test_fixed_bits_leave_the_bit_group_out():
    model = TinyConvNet()
    attach_weight_quantizers(model, [], DeadZoneLDZCompander, {"learnable_bit": False})
    optimizer = adamw(model, **GROUP_SETTINGS)
    assert [(g["name"], len(g["params"])) for g in optimizer.param_groups] == [("weights", 2), ("deadzone", 2)]


def test_lr_schedules():
    cosine = [0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    assert lr_schedule("cosine", 4) == pytest.approx(cosine)
    assert lr_schedule("constant", 4) == pytest.approx([1.0] * 4)
    assert lr_schedule("step", 5, "lr_scheduler.step_size=2", "lr_scheduler.gamma=0.5") == pytest.approx(
        [1.0, 1.0, 0.5, 0.5, 0.25]
    )
    # warm-up 2 of 6 epochs: 1/3, 2/3, then cosine over the remaining 4
    assert lr_schedule("cosine_warmup", 6, "lr_scheduler.warmup_epochs=2") == pytest.approx([1 / 3, 2 / 3, *cosine])


def test_cosine_warmup_rejects_a_warmup_as_long_as_the_run():
    with pytest.raises(ConfigError, match=r"lr_scheduler.warmup_epochs must be an integer in \[0, 3\), got 3"):
        lr_schedule("cosine_warmup", 3, "lr_scheduler.warmup_epochs=3")
