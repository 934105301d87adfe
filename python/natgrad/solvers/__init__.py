"""Iterative solvers for damped Fisher systems: :func:`conjugate_gradient` (preconditioned CG
on matrix-free Fisher-vector products, with a K-FAC or diagonal preconditioner).
"""
from __future__ import annotations

from natgrad.solvers.cg import CGResult, conjugate_gradient

__all__ = ["CGResult", "conjugate_gradient"]
