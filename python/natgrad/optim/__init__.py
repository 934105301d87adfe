"""natgrad's optimizers (torch.optim.Optimizer subclasses) and NaturalGradient's solver strategies."""
from __future__ import annotations

from natgrad.optim.kfac import KFAC
from natgrad.optim.natural_gradient import NaturalGradient
from natgrad.optim.ngd_solvers import CGOptions, CGSolver, NGDSolver, WoodburySolver

__all__ = ["CGOptions", "CGSolver", "KFAC", "NGDSolver", "NaturalGradient", "WoodburySolver"]
