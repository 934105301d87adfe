"""natgrad's optimizers (torch.optim.Optimizer subclasses)."""
from __future__ import annotations

from natgrad.optim.kfac import KFAC

__all__ = ["KFAC"]
