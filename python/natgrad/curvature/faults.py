"""The fault ledger of a K-FAC run: which layers skipped an update (NaN/Inf or overflow) and
which decompositions needed a fallback-ladder rung, warned about once per layer and counted."""
from __future__ import annotations

import warnings


class FaultLedger:
    """The faults of a run: NaN/Inf skips and fallback-ladder rungs, each warned about once per
    layer and counted (saved with the optimizer)."""

    def __init__(self) -> None:
        self.faults: dict[str, int] = {}
        self.ladder: dict[str, int] = {}

    def fault(self, where: str, what: str, kind: str = "layer") -> None:
        """Counts a skipped update of ``where`` (warns the first time)."""
        if where not in self.faults:
            warnings.warn(f"natgrad.KFAC: NaN or Inf (or values that would overflow) in the {what} of "
                          f"{kind} {where!r}; its update is skipped this step (parameters and factors "
                          "untouched)", RuntimeWarning, stacklevel=4)
        self.faults[where] = self.faults.get(where, 0) + 1

    def rung(self, name: str, rung: int) -> None:
        """Counts a decomposition of ``name`` that needed fallback-ladder rung ``rung`` > 0."""
        if name not in self.ladder:
            warnings.warn(f"natgrad.KFAC: decomposing the factors of {name!r} needed "
                          f"fallback-ladder rung {rung}; see natgrad.ops.Rung", stacklevel=4)
        self.ladder[name] = self.ladder.get(name, 0) + 1
