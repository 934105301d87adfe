"""natgrad's optimizers (torch.optim.Optimizer subclasses) and NaturalGradient's solver strategies."""
from __future__ import annotations

from natgrad.optim.eigen_adam import EigenAdam
from natgrad.optim.kfac import KFAC
from natgrad.optim.natural_gradient import NaturalGradient
from natgrad.optim.ngd_solvers import CGOptions, CGSolver, NGDSolver, WoodburySolver

__all__ = ["CGOptions", "CGSolver", "EigenAdam", "KFAC", "NGDSolver", "NaturalGradient", "WoodburySolver"]
