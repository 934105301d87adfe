"""Preconditioned conjugate gradient for damped Fisher systems ``(F + λI) x = b``.

``F`` is any :class:`natgrad.fisher.FisherMatrix` (typically the matrix-free
``compute_fisher(..., structure="implicit")``) or a callable ``v ↦ F v``. The preconditioner
``M ≈ F + λI`` is applied through ``M⁻¹ r``: a FisherMatrix from the curvature core
(``structure="kfac"`` — the K-FAC blocks — or ``"diagonal"``), whose damped ``solve(r, λ)`` is
used with the same λ, or a callable ``r ↦ M⁻¹ r``.

The iteration is the textbook PCG (Hestenes & Stiefel; Shewchuk 1994, B3): with ``r₀ = b − A x₀``,
``z = M⁻¹ r``, ``α = rᵀz / pᵀAp``, ``x ← x + αp``, ``r ← r − αAp``, ``β = r'ᵀz' / rᵀz``,
``p ← z' + βp``. It stops when the relative residual ``‖r‖ / ‖b‖`` (the recursively updated
residual) is at most ``tol``, or after ``max_iters`` products with ``A``.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeAlias

import torch
from torch import Tensor

from natgrad.curvature.block import max_abs
from natgrad.fisher.matrices import FisherMatrix, _check_damping

__all__ = ["CGResult", "conjugate_gradient"]

Operator: TypeAlias = FisherMatrix | Callable[[Tensor], Tensor]


@dataclass
class CGResult:
    """What :func:`conjugate_gradient` returns.

    Attributes:
        solution (Tensor): the last iterate ``x``.
        iterations (int): products with ``F + λI`` taken (0 when ``x₀`` already solved it).
        residuals (list of float): relative residual ``‖r_k‖ / ‖b‖`` at every iterate,
            ``k = 0 … iterations`` (``residuals[0]`` is the start's).
        converged (bool): whether ``residuals[-1] <= tol``.
    """

    solution: Tensor
    iterations: int
    residuals: list[float] = field(default_factory=list)
    converged: bool = False


def _vector(name: str, v: object, size: int | None) -> Tensor:
    if not isinstance(v, Tensor) or not v.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {getattr(v, 'dtype', type(v).__name__)}")
    if v.dim() != 1 or (size is not None and v.shape[0] != size):
        want = f"[{size}]" if size is not None else "[p]"
        raise ValueError(f"{name} must be a vector of shape {want} (one entry per parameter), got {tuple(v.shape)}")
    if not bool(torch.isfinite(max_abs(v))):
        raise ValueError(f"{name} holds NaN or Inf")
    return v


def _preconditioner(preconditioner: object, damping: float) -> Callable[[Tensor], Tensor] | None:
    if preconditioner is None:
        return None
    if isinstance(preconditioner, FisherMatrix):
        return lambda r: preconditioner.solve(r, damping)
    if callable(preconditioner):
        return preconditioner
    raise ValueError(f"Invalid preconditioner: {type(preconditioner).__name__} (expected a FisherMatrix, "
                     "a callable r -> M⁻¹r, or None)")


def conjugate_gradient(operator: Operator, b: Tensor, *, damping: float,
                       preconditioner: FisherMatrix | Callable[[Tensor], Tensor] | None = None,
                       x0: Tensor | None = None, tol: float = 1e-6, max_iters: int = 100,
                       preconditioner_damping: float | None = None, warn: bool = False) -> CGResult:
    r"""Solves ``(F + damping·I) x = b`` by (preconditioned) conjugate gradient.

    With :math:`A = F + \lambda I`, :math:`r_0 = b - A x_0`, :math:`z_0 = M^{-1} r_0`,
    :math:`p_0 = z_0`, each iteration is

    .. math::
        \alpha_k = \frac{r_k^\top z_k}{p_k^\top A p_k}, \quad
        x_{k+1} = x_k + \alpha_k p_k, \quad
        r_{k+1} = r_k - \alpha_k A p_k, \quad
        z_{k+1} = M^{-1} r_{k+1}, \quad
        p_{k+1} = z_{k+1} + \frac{r_{k+1}^\top z_{k+1}}{r_k^\top z_k}\, p_k,

    until :math:`\|r_k\| / \|b\| \le \mathrm{tol}` or ``max_iters`` products with :math:`A`.

    Args:
        operator (FisherMatrix or callable): ``F``, through ``operator.mv(v)`` or ``operator(v)``;
            symmetric positive semi-definite.
        b (Tensor): the right-hand side ``[p]`` (finite).
        damping (float): λ > 0.
        preconditioner (FisherMatrix or callable, optional): a FisherMatrix ``P`` (applied as
            ``(P + λI)⁻¹ r`` by its ``solve``; e.g. ``compute_fisher(..., structure="kfac")``) or
            a callable ``r ↦ M⁻¹ r`` (symmetric positive definite) (default: none).
        x0 (Tensor, optional): the starting iterate (a warm start) (default: zeros).
        tol (float): stop when ``‖r‖ / ‖b‖ <= tol`` (default: 1e-6).
        max_iters (int): at most this many products with ``F + λI`` (default: 100).
        preconditioner_damping (float, optional): μ > 0 for a FisherMatrix preconditioner,
            applied as ``(P + μI)⁻¹`` (default: ``damping``). An approximate ``P`` such as
            K-FAC often preconditions better with more damping than the system's (Martens &
            Grosse 2015 use ``μ = sqrt(λ)``-like values).
        warn (bool): warn (RuntimeWarning) when ``max_iters`` is reached before ``tol``
            (default: False).

    Returns:
        CGResult: solution, iterations, relative residual history, converged.

    Raises:
        ValueError: non-finite or wrongly sized ``b`` / ``x0``, ``damping <= 0``, ``tol <= 0``,
            ``max_iters < 1``, or a preconditioner that is not positive definite.
        FloatingPointError: the operator returned NaN/Inf.
    """
    _check_damping(damping)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol <= 0:
        raise ValueError(f"Invalid tol: {tol!r} (expected a finite number > 0)")
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"Invalid max_iters: {max_iters!r} (expected an int >= 1)")
    if preconditioner_damping is not None and (
            isinstance(preconditioner_damping, bool) or not isinstance(preconditioner_damping, (int, float))
            or not math.isfinite(preconditioner_damping) or preconditioner_damping <= 0):
        raise ValueError(f"Invalid preconditioner_damping: {preconditioner_damping!r} "
                         "(expected a finite number > 0 or None)")
    if not (isinstance(operator, FisherMatrix) or callable(operator)):
        raise ValueError(f"Invalid operator: {type(operator).__name__} (expected a FisherMatrix or a callable)")
    size = operator.num_params if isinstance(operator, FisherMatrix) else None
    b = _vector("b", b, size)
    matvec = operator.mv if isinstance(operator, FisherMatrix) else operator
    precondition = _preconditioner(preconditioner,
                                   damping if preconditioner_damping is None else preconditioner_damping)

    def apply(v: Tensor) -> Tensor:
        out = matvec(v)
        if not isinstance(out, Tensor) or out.shape != v.shape:
            raise ValueError(f"operator must map a [{v.shape[0]}] vector to one of the same shape, "
                             f"got {getattr(out, 'shape', type(out).__name__)}")
        out = out.to(v.dtype).add_(v, alpha=damping)
        if not bool(torch.isfinite(max_abs(out))):
            raise FloatingPointError("conjugate_gradient: the operator returned NaN/Inf")
        return out

    b_norm = float(torch.linalg.vector_norm(b))
    if x0 is None:
        x, r = torch.zeros_like(b), b.clone()
    else:
        x = _vector("x0", x0, b.shape[0]).to(b.dtype).clone()
        r = b - apply(x)
    if b_norm == 0.0:
        return CGResult(torch.zeros_like(b), 0, [0.0], True)
    residuals = [float(torch.linalg.vector_norm(r)) / b_norm]
    z = r if precondition is None else precondition(r).to(b.dtype)
    rz = float(r @ z)
    if precondition is not None and not rz > 0 and residuals[0] > 0:
        raise ValueError("the preconditioner is not positive definite (rᵀM⁻¹r <= 0)")
    p = z.clone()
    iterations = 0
    while residuals[-1] > tol and iterations < max_iters:
        ap = apply(p)
        curvature = float(p @ ap)
        if not curvature > 0:  # only from round-off: F + λI is positive definite
            break
        alpha = rz / curvature
        x.add_(p, alpha=alpha)
        r.sub_(ap, alpha=alpha)
        iterations += 1
        residuals.append(float(torch.linalg.vector_norm(r)) / b_norm)
        z = r if precondition is None else precondition(r).to(b.dtype)
        rz_next = float(r @ z)
        if precondition is not None and not rz_next > 0 and residuals[-1] > 0:
            raise ValueError("the preconditioner is not positive definite (rᵀM⁻¹r <= 0)")
        p = z + (rz_next / rz) * p
        rz = rz_next
    converged = residuals[-1] <= tol
    if warn and not converged:
        warnings.warn(f"conjugate_gradient stopped after {iterations} iterations at relative residual "
                      f"{residuals[-1]:.3g} > tol={tol:g}; raise max_iters or the damping",
                      RuntimeWarning, stacklevel=2)
    return CGResult(x, iterations, residuals, converged)
