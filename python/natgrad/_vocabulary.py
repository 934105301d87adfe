"""The words every natgrad API uses for the same choices, and their deprecated spellings.

* ``fisher_type`` — which labels define the Fisher: "empirical" (the observed targets), "mc"
  (labels sampled from the model's predictive distribution) or "exact" (the expectation over
  it). Formerly ``kind`` (``compute_fisher``) and ``fisher`` (``EWC``).
* ``structure`` — how it is stored: "dense", "lowrank", "diagonal", "block_diagonal", "kfac" or
  "implicit" (not stored: matrix-free products).
  ``NaturalGradient``'s former "full" is "dense".

Old spellings keep working for one release with a :class:`DeprecationWarning`.
"""
from __future__ import annotations

import warnings
from typing import Any

FISHER_TYPES = ("empirical", "mc", "exact")
STRUCTURES = ("dense", "lowrank", "diagonal", "block_diagonal", "kfac", "implicit")

_UNSET: Any = object()


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Raises ValueError naming ``name`` unless ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (expected one of {', '.join(map(repr, choices))})")


def renamed_argument(new_name: str, new_value: Any, old_name: str, old_value: Any, default: Any,
                     owner: str, stacklevel: int = 3) -> Any:
    """The value of an argument that was renamed from ``old_name`` to ``new_name``.

    ``old_value`` is ``_UNSET`` when the caller did not pass the old spelling. Passing both
    (the new one not at its default) raises; passing only the old one warns.
    """
    if old_value is _UNSET:
        return default if new_value is _UNSET else new_value
    if new_value is not _UNSET:
        raise TypeError(f"{owner}: pass {new_name}= only ({old_name}= is its deprecated spelling)")
    warnings.warn(f"{owner}: {old_name}= is deprecated, use {new_name}= (same values)",
                  DeprecationWarning, stacklevel=stacklevel)
    return old_value


def renamed_value(name: str, value: str, renames: dict[str, str], owner: str, stacklevel: int = 3) -> str:
    """Maps a deprecated value of ``name`` to its new spelling, with a warning."""
    if isinstance(value, str) and value in renames:
        warnings.warn(f"{owner}: {name}={value!r} is deprecated, use {name}={renames[value]!r}",
                      DeprecationWarning, stacklevel=stacklevel)
        return renames[value]
    return value
