"""The fault ledger of a K-FAC run: which layers skipped an update (NaN/Inf or overflow) and
which decompositions needed a fallback-ladder rung, warned about once per layer and counted.
"""
from __future__ import annotations

import warnings

from natgrad import ops
from natgrad.ops.rules import Fault


class FaultLedger:
    """The faults of a run: NaN/Inf skips and fallback-ladder rungs, each warned about once per
    layer and counted (saved with the optimizer).
    """

    def __init__(self) -> None:
        self.faults: dict[str, int] = {}
        self.ladder: dict[str, int] = {}

    def fault(self, where: str, fault: Fault, kind: str = "layer") -> None:
        """Counts a skipped update of ``where`` (warns the first time, with
        :func:`natgrad.ops.kfac_fault_message`); ``kind`` is "layer" or "parameter".
        """
        if where not in self.faults:
            warnings.warn(ops.kfac_fault_message("natgrad.KFAC", fault, kind, where), RuntimeWarning,
                          stacklevel=4)
        self.faults[where] = self.faults.get(where, 0) + 1

    def rung(self, name: str, rung: int) -> None:
        """Counts a decomposition of ``name`` that needed fallback-ladder rung ``rung`` > 0."""
        if name not in self.ladder:
            warnings.warn(f"natgrad.KFAC: decomposing the factors of {name!r} needed "
                          f"fallback-ladder rung {rung}; see natgrad.ops.Rung", stacklevel=4)
        self.ladder[name] = self.ladder.get(name, 0) + 1
