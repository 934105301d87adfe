"""Validation and resolution of hyperparameters that may be scheduled (float or callable)."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, Union, overload

from natgrad._vocabulary import check_choice  # noqa: F401  (re-exported for the optimizers)

Schedule = Union[float, Callable[[int], float]]


def resolve(value: Schedule | None, step: int) -> float | None:
    """The value of a constant or scheduled hyperparameter at ``step`` (0-based)."""
    return value(step) if callable(value) else value


def check_number(name: str, value: object, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False,
                 allow_none: bool = False, allow_callable: bool = False) -> None:
    """Raises ValueError naming ``name`` and ``value`` unless the value is in the range.

    A callable is accepted (when ``allow_callable``) and checked when resolved instead.
    """
    if value is None and allow_none:
        return
    if callable(value) and allow_callable:
        return
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int))
            or not math.isfinite(value)):
        kind = "an int" if integer else "a finite number"
        extra = " or a callable of the step" if allow_callable else ""
        extra += " or None" if allow_none else ""
        raise ValueError(f"Invalid {name}: {value!r} (expected {kind}{extra})")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"Invalid {name}: {value!r} (must be {'>' if low_open else '>='} {low})")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"Invalid {name}: {value!r} (must be {'<' if high_open else '<='} {high})")


def check_flag(name: str, value: object) -> None:
    """Raises ValueError naming ``name`` unless ``value`` is a bool (a truthy string or NaN would
    otherwise silently switch an option on).
    """
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (expected True or False)")


def check_group(group: dict, bounds: dict[str, dict]) -> None:
    """Validates a param group's per-group hyperparameters (``bounds``: name -> check_number
    keywords), naming the group's key: torch.optim does not check values passed per group.
    """
    for key, kwargs in bounds.items():
        if key in group:
            check_number(key, group[key], **kwargs)


@overload
def resolved_number(name: str, value: Schedule | None, step: int, *, allow_none: Literal[True],
                    **bounds: Any) -> float | None: ...
@overload
def resolved_number(name: str, value: Schedule | None, step: int, *, allow_none: Literal[False] = ...,
                    **bounds: Any) -> float: ...
def resolved_number(name: str, value: Schedule | None, step: int, **bounds: Any) -> float | None:
    """Resolves a scheduled value and validates the result with :func:`check_number` (None only
    with ``allow_none=True``).
    """
    out = resolve(value, step)
    check_number(f"{name} (at step {step})" if callable(value) else name, out, **bounds)
    return out
