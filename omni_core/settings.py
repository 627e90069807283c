"""User-facing settings of the core's configuration dataclasses, each declared once.

A configuration dataclass (an accelerator, the generation request, the decode options) declares every field a
user sets with `setting(...)`: its kind, default, range or choices and tooltip. The dataclass checks its own
values from that declaration (`check_settings`), and the ComfyUI node schema is derived from it
(nodes/schema.py), so a default, a bound or a tooltip cannot differ between the node and the core.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .errors import InvalidInput

_KEY = "omni_setting"
KINDS = (int, float, bool, str)


@dataclass(frozen=True)
class Setting:
    kind: type  # int, float, bool or str (a str with `choices` is a list to pick from)
    default: Any  # as the user gives it (for `parse`d settings: the text before parsing)
    tooltip: str
    min: float | None = None
    max: float | None = None
    step: float | None = None  # the editor's increment
    round: float | None = None  # the editor's display rounding of floats
    choices: tuple[str, ...] | None = None
    multiline: bool = False
    # Inputs added after the node first shipped: saved prompts may lack them, the default then applies.
    optional: bool = False
    control_after_generate: bool = False  # the editor's increment/randomize widget (seeds)
    valid: str | None = None  # what to call valid in a range error, when more helpful than "min to max"
    parse: Callable[[Any], Any] | None = None  # the user's value (text) -> the field's value

    def __post_init__(self):
        if self.kind not in KINDS:
            raise TypeError(f"a setting is one of {KINDS}, not {self.kind}")

    @property
    def field_default(self) -> Any:
        return self.parse(self.default) if self.parse else self.default

    def valid_text(self) -> str:
        if self.valid:
            return self.valid
        if self.choices:
            return ", ".join(self.choices)
        if self.kind is bool:
            return "true or false"
        if self.kind is str:
            return "text"
        low = "" if self.min is None else f"{self.min:g}"
        high = "" if self.max is None else f"{self.max:g}"
        what = "whole numbers" if self.kind is int else "numbers"
        if low and high:
            return f"{what} from {low} to {high}"
        return f"{what} of at least {low}" if low else f"{what} up to {high}"

    def problem(self, value: Any) -> str | None:
        """Why `value` (the user's value, before parsing) is not allowed, or None."""
        if self.kind is bool:
            return None if isinstance(value, bool) else f"{value!r} is not true or false."
        if self.kind is str:
            if not isinstance(value, str):
                return f"{value!r} is not text."
            if self.choices is not None and value not in self.choices:
                return f"'{value}' is not one of the choices."
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{value!r} is not a number."
        if isinstance(value, float) and not math.isfinite(value):
            return f"{value} is not a finite number."
        if self.kind is int and not isinstance(value, int):
            if not float(value).is_integer():
                return f"{value} is not a whole number."
        if self.min is not None and value < self.min:
            return f"Value {value} smaller than min of {self.min}."  # ComfyUI's own wording
        if self.max is not None and value > self.max:
            return f"Value {value} bigger than max of {self.max}."
        return None


def setting(kind: type, default: Any, tooltip: str, **options: Any) -> dataclasses.Field:
    """A dataclass field declared as a user setting (see Setting for the options)."""
    declared = Setting(kind, default, tooltip, **options)
    return dataclasses.field(default=declared.field_default, metadata={_KEY: declared})


def settings_of(config: type | object, names: Iterable[str] | None = None) -> dict[str, Setting]:
    """name -> Setting of the config class's user settings, in declaration order (or in `names`' order)."""
    declared = {f.name: f.metadata[_KEY] for f in dataclasses.fields(config) if _KEY in f.metadata}
    if names is None:
        return declared
    return {name: declared[name] for name in names}


def check_value(name: str, declared: Setting, value: Any) -> Any:
    """`value` as an int or float of the setting's kind, or InvalidInput naming the input."""
    problem = declared.problem(value)
    if problem:
        raise InvalidInput(name, problem, declared.valid_text())
    if declared.kind is int and isinstance(value, float):
        return int(value)
    if declared.kind is float and isinstance(value, int):
        return float(value)
    return value


def check_settings(config: object) -> None:
    """Checks every setting of a config instance against its declaration (parsed settings check themselves
    when parsed)."""
    for name, declared in settings_of(type(config)).items():
        if declared.parse is None:
            value = getattr(config, name)
            checked = check_value(name, declared, value)
            if type(checked) is not type(value):
                object.__setattr__(config, name, checked)


def from_user_values(config: type, **values: Any):
    """An instance of `config` from the user's values (parsing the settings that are given as text)."""
    declared = settings_of(config)
    converted = {}
    for name, value in values.items():
        setting_ = declared.get(name)
        if setting_ is not None and setting_.parse is not None:
            check_value(name, setting_, value)
            value = setting_.parse(value)
        converted[name] = value
    return config(**converted)
