"""natgrad's optimizers (torch.optim.Optimizer subclasses)."""
from __future__ import annotations

from natgrad.optim.ngd_solvers import CGOptions
from natgrad.optim.kfac import KFAC
from natgrad.optim.natural_gradient import NaturalGradient

__all__ = ["CGOptions", "KFAC", "NaturalGradient"]
