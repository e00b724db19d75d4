"""Model config fields, declared once: each family's frozen dataclass is the source of its keys.

A family's config class derives from `ModelConfig`, names its `family`, and declares every
field with `field(default, ...)`: the default, and where the value is a number its range
(`ge`, `gt`, `le`, `lt`; for a tuple, of every element) or where it is a name its `choices`,
with the meaning in the line's comment. From that one declaration:
  `config_dict(cls, sizes, size)`  the `config.model` group an experiment edits (the family
                                   `name` and `size` plus every field, a named size applied);
  `cls.from_config(config.model)`  the frozen config the modules take. Construction checks
                                   every value (`check_field`) and then the combinations
                                   (`ModelConfig.check`); an unknown key, a wrong type or an
                                   impossible value is a one-line `ConfigError` naming
                                   `config.model.<key>` and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import typing
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import ml_collections

from bigmodel.config import ConfigError, Range

KEPT = ("name", "size")  # keys of config.model that name the model rather than configure it


def field(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
          lt: float | None = None, choices: Sequence[Any] | None = None) -> Any:
    """A dataclass field with its default and its declared range (numbers) or choices (names)."""
    metadata: dict[str, Any] = {}
    if ge is not None or gt is not None or le is not None or lt is not None:
        low, high = gt if gt is not None else ge, lt if lt is not None else le
        metadata["range"] = Range(low=-math.inf if low is None else low, high=math.inf if high is None else high,
                                  low_open=gt is not None, high_open=lt is not None)
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return dataclasses.field(default=default, metadata=metadata)


def _closest(name: str, options: Sequence[Any]) -> str | None:
    close = difflib.get_close_matches(name, [o for o in options if isinstance(o, str) and o], n=1, cutoff=0.6)
    return close[0] if close else None


def _kind(hint: Any) -> str:
    """What a field's annotation accepts, in words."""
    if typing.get_origin(hint) is tuple:
        return "a list of ints"
    return {bool: "a bool", int: "an int", float: "a number", str: "a string"}[hint]


def check_field(f: dataclasses.Field, hint: Any, value: Any) -> Any:
    """`value` for the field `f` (annotation `hint`) checked and in its canonical type; ConfigError if not."""
    where = f"config.model.{f.name}={value!r}"
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if typing.get_origin(hint) is tuple:
        ok = isinstance(value, (tuple, list)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        if ok and not value:
            raise ConfigError(f"{where} is empty; give at least one entry, e.g. {list(f.default)}")
        value = tuple(value) if ok else value
    elif hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = is_int
    elif hint is float:
        ok = is_int or isinstance(value, float)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, hint)
    if not ok:
        raise ConfigError(f"{where} is not {_kind(hint)}; set it to {_kind(hint)} such as {f.default!r}")
    allowed = f.metadata.get("range")
    if allowed is not None and any(v not in allowed for v in (value if isinstance(value, tuple) else (value,))):
        what = "entries" if isinstance(value, tuple) else "a value"
        raise ConfigError(f"{where} is out of range; use {what} {allowed} (default {f.default!r})")
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        close = _closest(value, choices) if isinstance(value, str) else None
        raise ConfigError(f"{where} is not a choice; use one of {', '.join(map(repr, choices))}"
                          + (f" (did you mean {close!r}?)" if close else ""))
    return value


@functools.cache
def declared(cls: type) -> tuple[tuple[dataclasses.Field, Any], ...]:
    """(field, resolved annotation) of every field of a config class: what checks and tests walk."""
    hints = typing.get_type_hints(cls)
    return tuple((f, hints[f.name]) for f in dataclasses.fields(cls))


T = TypeVar("T", bound="ModelConfig")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Base of every family's frozen config: fields checked on construction, then `check`."""

    family: ClassVar[str] = ""  # config.model.name of the family

    def __post_init__(self) -> None:
        for f, hint in declared(type(self)):
            object.__setattr__(self, f.name, check_field(f, hint, getattr(self, f.name)))
        self.check()

    def check(self) -> None:
        """Refuse impossible combinations of fields (each family adds its own)."""

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> typing.Self:
        """The frozen config for `config.model`; an unknown key is refused with the closest field."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in cfg:
            if key not in names and key not in KEPT:
                close = _closest(key, names)
                fix = f"did you mean {close!r}?" if close else f"the fields are {', '.join(sorted(names))}"
                raise ConfigError(f"config.model.{key} is not a field of the {cls.family} model; {fix}")
        return cls(**{k: cfg[k] for k in names if k in cfg})


def config_dict(cls: type[ModelConfig], sizes: Mapping[str, Mapping[str, Any]], size: str) -> ml_collections.ConfigDict:
    """`config.model` for a named size: the family name, the size, every field's default, the size's values."""
    if size not in sizes:
        raise ConfigError(f"unknown {cls.family} size {size!r}; choose one of {sorted(sizes)}")
    values = {f.name: f.default for f in dataclasses.fields(cls)}
    values.update(sizes[size])
    cls(**values)  # a named size is itself a valid config
    return ml_collections.ConfigDict({"name": cls.family, "size": size, **values})


def check_heads(d_model: int, num_heads: int, rotary: bool = False) -> None:
    """Refuse attention heads that do not split the width, or (rotary) an odd head size."""
    if d_model % num_heads:
        raise ConfigError(f"config.model.d_model={d_model} is not divisible by config.model.num_heads={num_heads}; "
                          "choose a number of heads that divides the width")
    if rotary and (d_model // num_heads) % 2:
        raise ConfigError(f"config.model.position='rope' rotates pairs of channels, but the head size d_model/"
                          f"num_heads={d_model // num_heads} is odd; change config.model.num_heads or d_model")
