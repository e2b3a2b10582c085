"""Tests for sparsity coefficient schedule factories."""

import math
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from codeq.errors import ConfigError
from codeq.schedules import constant, cosine_anneal, linear_warmup

SCHEDULE_CONF = Path(__file__).resolve().parents[1] / "conf" / "schedule"


# --- the public schedules' contract ---


def test_constant_always_returns_value():
    fn = constant(0.5)
    assert fn(0, 100) == 0.5
    assert fn(50, 100) == 0.5
    assert fn(99, 100) == 0.5


def test_constant_zero():
    fn = constant(0.0)
    assert fn(50, 100) == 0.0


def test_linear_warmup_delay_phase():
    """Zero during delay period."""
    fn = linear_warmup(delay=50, ramp=20)
    assert fn(0, 200) == 0.0
    assert fn(25, 200) == 0.0
    assert fn(49, 200) == 0.0


def test_linear_warmup_ramp_phase():
    """Linear increase from 0 to 1 during ramp period."""
    fn = linear_warmup(delay=50, ramp=20)
    assert fn(50, 200) == 0.0  # start of ramp
    assert fn(60, 200) == 0.5  # midpoint of ramp
    assert fn(70, 200) == 1.0  # end of ramp


def test_linear_warmup_after_ramp():
    """Stays at 1.0 after ramp completes."""
    fn = linear_warmup(delay=50, ramp=20)
    assert fn(71, 200) == 1.0
    assert fn(100, 200) == 1.0
    assert fn(199, 200) == 1.0


def test_linear_warmup_no_delay():
    """delay=0 → ramp starts immediately."""
    fn = linear_warmup(delay=0, ramp=10)
    assert fn(0, 100) == 0.0
    assert fn(5, 100) == 0.5
    assert fn(10, 100) == 1.0


def test_cosine_anneal_delay_phase():
    """Zero during delay period."""
    fn = cosine_anneal(delay=30)
    assert fn(0, 100) == 0.0
    assert fn(29, 100) == 0.0


def test_cosine_anneal_after_delay():
    """Cosine ramp from 0 → 1 over remaining epochs."""
    fn = cosine_anneal(delay=0)
    assert fn(0, 100) == 0.0
    assert abs(fn(50, 100) - 0.5) < 0.01  # midpoint ≈ 0.5
    assert abs(fn(99, 100) - 1.0) < 0.01  # end ≈ 1.0


def test_cosine_anneal_with_delay():
    fn = cosine_anneal(delay=50)
    assert fn(49, 100) == 0.0
    # After delay, 50 epochs of cosine ramp
    assert abs(fn(75, 100) - 0.5) < 0.01  # midpoint of ramp
    assert abs(fn(99, 100) - 1.0) < 0.02


# --- edge cases and validation ---


def test_constant_defaults_to_one():
    assert constant()(0, 10) == 1.0
    assert constant(2.5)(3, 10) == 2.5  # a strength above 1 is the user's choice


def test_linear_warmup_zero_ramp_is_a_step_at_delay():
    fn = linear_warmup(delay=3, ramp=0)
    assert [fn(e, 10) for e in range(6)] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]


def test_linear_warmup_quarter_points():
    fn = linear_warmup(delay=2, ramp=4)
    assert [fn(e, 10) for e in range(8)] == [0.0, 0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_cosine_anneal_exact_values():
    """½(1 − cos(π t)) with t = (e − delay)/(total − delay): t = ¼ → (1 − √½)/2, t = ¾ → (1 + √½)/2."""
    fn = cosine_anneal(delay=20)
    assert fn(20, 100) == 0.0
    assert fn(40, 100) == pytest.approx((1 - math.sqrt(0.5)) / 2, abs=1e-12)
    assert fn(60, 100) == pytest.approx(0.5, abs=1e-12)
    assert fn(80, 100) == pytest.approx((1 + math.sqrt(0.5)) / 2, abs=1e-12)


def test_cosine_anneal_reaches_one_at_total_and_stays():
    fn = cosine_anneal(delay=0)
    assert fn(100, 100) == 1.0
    assert fn(150, 100) == 1.0


@pytest.mark.parametrize("delay", [10, 12])
def test_cosine_anneal_delay_past_the_run_stays_zero(delay):
    fn = cosine_anneal(delay=delay)
    assert all(fn(e, 10) == 0.0 for e in range(20))


@pytest.mark.parametrize(
    "fn",
    [
        linear_warmup(delay=0, ramp=0),
        linear_warmup(delay=0, ramp=7),
        linear_warmup(delay=5, ramp=3),
        linear_warmup(delay=2.5, ramp=1.5),
        cosine_anneal(),
        cosine_anneal(delay=4),
        cosine_anneal(delay=30),
        constant(),
        constant(0.0),
    ],
)
def test_schedules_are_floats_in_unit_interval_and_non_decreasing(fn):
    total = 20
    values = [fn(e, total) for e in range(2 * total)]
    assert all(type(v) is float for v in values)
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(a <= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize(
    "factory, kwargs, key",
    [
        (linear_warmup, {"delay": -1, "ramp": 5}, "delay"),
        (linear_warmup, {"delay": 0, "ramp": -2}, "ramp"),
        (linear_warmup, {"delay": "5", "ramp": 2}, "delay"),
        (linear_warmup, {"delay": 0, "ramp": float("nan")}, "ramp"),
        (cosine_anneal, {"delay": -3}, "delay"),
        (cosine_anneal, {"delay": True}, "delay"),
        (constant, {"value": -0.5}, "value"),
        (constant, {"value": float("inf")}, "value"),
    ],
)
def test_bad_arguments_raise_config_error_naming_the_key(factory, kwargs, key):
    with pytest.raises(ConfigError, match=rf"schedule\.{key} must be a finite number >= 0"):
        factory(**kwargs)
    assert issubclass(ConfigError, ValueError)


def _instantiate(name, *overrides):
    cfg = OmegaConf.merge(OmegaConf.load(SCHEDULE_CONF / f"{name}.yaml"), OmegaConf.from_dotlist(list(overrides)))
    return instantiate(cfg)


def test_schedule_group_has_exactly_the_three_schedules():
    assert sorted(p.stem for p in SCHEDULE_CONF.glob("*.yaml")) == ["constant", "cosine_anneal", "linear_warmup"]


def test_constant_yaml_instantiates_to_one():
    fn = _instantiate("constant")
    assert callable(fn)
    assert [fn(e, 10) for e in (0, 5, 9)] == [1.0, 1.0, 1.0]


def test_linear_warmup_yaml_ramps_over_three_epochs():
    fn = _instantiate("linear_warmup")
    assert callable(fn)
    assert [fn(e, 10) for e in range(5)] == [0.0, 1 / 3, 2 / 3, 1.0, 1.0]


def test_linear_warmup_yaml_overrides_for_a_300_epoch_run():
    fn = _instantiate("linear_warmup", "delay=50", "ramp=50")
    assert [fn(e, 300) for e in (49, 50, 75, 100)] == [0.0, 0.0, 0.5, 1.0]


def test_cosine_anneal_yaml_spans_the_run():
    fn = _instantiate("cosine_anneal")
    assert callable(fn)
    assert fn(0, 10) == 0.0
    assert fn(5, 10) == pytest.approx(0.5, abs=1e-12)
