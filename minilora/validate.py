"""Checks for the values of configs and settings: each raises one ValueError naming the field.

A config read from a JSON file can hold anything: a string where a number belongs, ``"false"``
(which Python reads as true), a float rank, NaN. These checks let only the intended type through,
so that a wrong value fails where it enters, with its name, instead of deep inside the model.
``bool`` is refused where an integer is meant (Python counts True as 1), and NaN and the
infinities are refused where a float is meant.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np


def check_int(name: str, value, minimum: int | None = None) -> int:
    """``value`` as an int, if it is an integer (not a bool) >= ``minimum``; else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value)


def check_float(
    name: str, value, low: float | None = None, high: float | None = None, *, low_open=False, high_open=False
) -> float:
    """``value`` as a float, if it is a finite real number in the given range; else ValueError naming ``name``.

    ``low`` and ``high`` are included unless ``low_open`` / ``high_open``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(-inf" if low is None else f"{'(' if low_open else '['}{low:g}"
        right = "inf)" if high is None else f"{high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {left}, {right}, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    """``value`` if it is a bool (JSON true/false); else ValueError naming ``name`` (``"false"`` is not false)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be true or false, got {value!r} ({type(value).__name__})")
    return bool(value)


class ConfigFields:
    """``to_dict`` and ``from_dict`` for a frozen dataclass config, so that it reads and writes JSON.

    ``from_dict`` refuses anything but a mapping of the class's own fields, naming what is unknown;
    each field's value is then checked by the class's ``__post_init__``.
    """

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        if not isinstance(values, dict):
            raise ValueError(f"a {cls.__name__} must be a mapping of its fields, got {type(values).__name__}")
        unknown = set(values) - {field.name for field in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(map(str, unknown))}")
        return cls(**values)


def check_choice(name: str, value, choices) -> str:
    """``value`` if it is one of ``choices``; else ValueError naming ``name`` and the choices."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value
