"""The parameter table of the optimizers' ``describe()``."""
from __future__ import annotations

from collections.abc import Sequence


def parameter_table(rows: Sequence[tuple[str, str, str]]) -> str:
    """``rows`` of (parameter, shape, treatment) as an aligned text table with a header."""
    width = [max(len(r[i]) for r in list(rows) + [("parameter", "shape", "")]) for i in range(2)]
    lines = [f"{'parameter':<{width[0]}}  {'shape':<{width[1]}}  preconditioner"]
    lines += [f"{n:<{width[0]}}  {s:<{width[1]}}  {h}" for n, s, h in rows]
    return "\n".join(lines)
