"""Config schemas: the type and allowed range of every key of a config node, checked before anything is built.

A schema is a dataclass declared next to the function or class it configures and attached with
``@configured_by(Schema)``; it is stored in Hydra's ConfigStore as ``schema/<module>.<name>``. Types are
checked by OmegaConf (the structured config), ranges and choices by ``allowed(...)`` metadata::

    @dataclass
    class LinearWarmup:
        delay: float = allowed(minimum=0)
        ramp: float = allowed(minimum=0)

    @configured_by(LinearWarmup)
    def linear_warmup(delay: float = 0, ramp: float = 3) -> Schedule: ...

``check_config(cfg)`` checks every node with a ``_target_`` against its target's schema; a bad value is a
ConfigError ``<group>.<key> must be <allowed>, got <value>``. Keys a schema does not declare, and targets
without a schema, are left to the code that reads them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from codeq.errors import ConfigError

SCHEMA_GROUP = "schema"
T = TypeVar("T")


@dataclass(frozen=True)
class Allowed:
    """A key's allowed values beyond its type: ``minimum <= v <= maximum``, ``v < below``, ``v in choices``,
    ``len(v) == length``; numbers must be finite unless ``finite`` is false."""

    minimum: float | None = None
    maximum: float | None = None
    below: float | None = None
    choices: tuple[Any, ...] | None = None
    length: int | None = None
    finite: bool = True

    def admits(self, value: Any) -> bool:
        if isinstance(value, (list, tuple)):
            return (self.length is None or len(value) == self.length) and all(self._admits_item(v) for v in value)
        return self._admits_item(value)

    def _admits_item(self, value: Any) -> bool:
        if value is None:
            return True
        if self.choices is not None:
            return value in self.choices
        if not isinstance(value, (int, float)):
            return True
        return (
            (math.isfinite(value) or not self.finite)
            and (self.minimum is None or value >= self.minimum)
            and (self.maximum is None or value <= self.maximum)
            and (self.below is None or value < self.below)
        )

    def bounds(self) -> str:
        """' >= 1', ' in [0, 1)', '' …: the range as it reads after a type."""
        low, high = self.minimum, self.maximum if self.maximum is not None else self.below
        closing = "]" if self.maximum is not None else ")"
        if low is not None and high is not None:
            return f" in [{low:g}, {high:g}{closing}"
        if low is not None:
            return f" >= {low:g}"
        if high is not None:
            return f" <= {high:g}" if self.maximum is not None else f" < {high:g}"
        return ""


def allowed(*, default: Any = MISSING, **limits: Any) -> Any:
    """A schema field with limits (see Allowed): ``epochs: int = allowed(minimum=1)``."""
    if "choices" in limits:
        limits["choices"] = tuple(limits["choices"])
    return field(default=default, metadata={"allowed": Allowed(**limits)})


def configured_by(schema: type) -> Callable[[T], T]:
    """Attach ``schema`` to the decorated function/class and store it in the ConfigStore."""

    def attach(target: T) -> T:
        name = f"{target.__module__}.{target.__qualname__}"
        ConfigStore.instance().store(group=SCHEMA_GROUP, name=name, node=schema)
        target.__config_schema__ = name
        return target

    return attach


def schema_of(target: Any) -> type | None:
    """The schema dataclass stored for ``target`` (an object or a ``_target_`` string), or None."""
    if isinstance(target, str):
        try:
            target = get_object(target)
        except Exception:  # an unimportable _target_ is reported when the node is instantiated
            return None
    name = getattr(target, "__config_schema__", None)
    return None if name is None else _stored_schema(name)


@functools.cache
def _stored_schema(name: str) -> type:
    return OmegaConf.get_type(ConfigStore.instance().load(f"{SCHEMA_GROUP}/{name}.yaml").node)


@functools.cache
def _typed_fields(schema: type) -> dict[str, tuple[DictConfig | None, Allowed, Any]]:
    """{key: (a one-key structured config to assign values to, its limits, its type)} of ``schema``.

    A type OmegaConf cannot express (e.g. torch.device) gets no structured config: only its limits are checked.
    """
    hints = typing.get_type_hints(schema)
    fields = {}
    for f in dataclasses.fields(schema):
        try:
            one = dataclasses.make_dataclass(f"{schema.__name__}_{f.name}", [(f.name, hints[f.name], MISSING)])
            typed = OmegaConf.structured(one)
        except (OmegaConfBaseException, ValueError, TypeError):
            typed = None
        fields[f.name] = (typed, f.metadata.get("allowed", Allowed()), hints[f.name])
    return fields


def check_config(cfg: DictConfig, root_schema: type | None = None) -> None:
    """Check the top-level keys against ``root_schema`` (first: nodes interpolate them), then every group node
    with a ``_target_`` against its target's schema. Raises ConfigError naming the first bad key.

    A node whose interpolation cannot be resolved is checked last: a bad key it points to (model.in_channels
    = ${dataset.input_size.0} with dataset.input_size=x) is reported by its own schema, not as the symptom.
    """
    if root_schema is not None:
        root = {f.name: cfg[f.name] for f in dataclasses.fields(root_schema) if f.name in cfg}
        plain = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v for k, v in root.items()}
        check_values(root_schema, "", plain)
    unresolved: OmegaConfBaseException | None = None
    for group in cfg:
        try:
            node = OmegaConf.to_container(cfg[group], resolve=True) if isinstance(cfg[group], DictConfig) else None
        except OmegaConfBaseException as exc:
            unresolved = unresolved or exc
            continue
        if node is not None and isinstance(node.get("_target_"), str):
            schema = schema_of(node["_target_"])
            if schema is not None:
                check_values(schema, f"{group}.", node)
    if unresolved is not None:
        raise unresolved


def check_values(schema: type, prefix: str, values: dict[str, Any]) -> None:
    """Check the keys of ``values`` that ``schema`` declares (type, then limits); others are ignored."""
    declared = _typed_fields(schema)
    for key, value in values.items():
        if key not in declared:
            continue
        if OmegaConf.is_config(value):  # hydra.utils.instantiate hands lists over as ListConfig
            value = OmegaConf.to_container(value, resolve=True)
        typed, limits, hint = declared[key]
        try:
            if typed is not None:
                typed[key] = value
            converted = value if typed is None else OmegaConf.to_container(typed)[key]
        except (OmegaConfBaseException, ValueError, TypeError):
            converted = _INVALID
        if not _same_value(value, converted) or not limits.admits(value):
            raise ConfigError(f"{prefix}{key} must be {describe(hint, limits)}, got {value!r}")


_INVALID = object()


def _same_value(raw: Any, converted: Any) -> bool:
    """True when OmegaConf kept ``raw`` as it is: no str -> int, int -> bool or number -> str conversions.

    An int where a float is declared is a float of the same value and passes.
    """
    if isinstance(raw, (list, tuple)):
        return isinstance(converted, list) and len(raw) == len(converted) and all(map(_same_value, raw, converted))
    if isinstance(raw, bool) or isinstance(converted, bool):
        return raw is converted
    if isinstance(raw, int) and isinstance(converted, float):
        return raw == converted
    return type(raw) is type(converted) and (raw == converted or raw != raw)  # nan != nan


def describe(hint: Any, limits: Allowed) -> str:
    """'an integer >= 1', 'one of fp32, bf16', 'a list of 2 finite numbers in [0, 1)', … for a type and limits."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, type(int | None)) and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return f"{describe(inner, limits)} or null"
    if limits.choices is not None:
        return "one of " + ", ".join(str(c) for c in limits.choices)
    if typing.get_origin(hint) is list:
        count = f"{limits.length} " if limits.length is not None else ""
        item = describe(args[0], dataclasses.replace(limits, length=None))
        plural = {
            "an integer": "integers",
            "a finite number": "finite numbers",
            "a number": "numbers",
            "a string": "strings",
        }
        for singular, many in plural.items():
            item = item.replace(singular, many, 1)
        return f"a list of {count}{item}"
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer" + limits.bounds()
    if hint is float:
        return ("a finite number" if limits.finite else "a number") + limits.bounds()
    if hint is str:
        return "a string"
    return getattr(hint, "__name__", str(hint))
