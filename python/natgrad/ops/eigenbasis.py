"""Adam in a Kronecker eigenbasis (natgrad.EigenAdam; SOAP, Vyas et al., 2024): rotating a
layer's packed gradient into ``Q_G ⊗ Q_A``, carrying Adam's moments into a refreshed basis, the
Adam direction, and the Shampoo factors ``L`` and ``R``.

Layout: a layer's weight (and bias) is the packed matrix ``W̃`` ``[d_g, d_a]`` of
:mod:`natgrad.curvature.kron`; ``Q_G`` ``[d_g, d_g]`` and ``Q_A`` ``[d_a, d_a]`` hold orthonormal
eigenvectors as columns. A basis given as None is the identity (a side that is not rotated).

These are compositions of ATen calls (GEMMs, elementwise work, an argmax): they dispatch to every
device and trace under torch.compile as they are, so they need no custom op or fake kernel.
Rotations run in the basis' dtype and return the input's dtype.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["adam_direction", "adam_moments_", "basis_change", "rebase_first_moment",
           "rebase_second_moment", "rotate", "rotate_back", "shampoo_factors_ema_"]


def rotate(x: Tensor, g_basis: Tensor | None, a_basis: Tensor | None) -> Tensor:
    """``Q_Gᵀ X Q_A``: a packed ``[d_g, d_a]`` matrix in the eigenbasis (None sides: identity).

    Example:
        >>> q = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64)).Q
        >>> x = torch.randn(3, 2, dtype=torch.float64)
        >>> torch.allclose(rotate_back(rotate(x, q, None), q, None), x)
        True
    """
    dtype = x.dtype
    if g_basis is not None:
        x = g_basis.mT @ x.to(g_basis.dtype)
    if a_basis is not None:
        x = x.to(a_basis.dtype) @ a_basis
    return x.to(dtype)


def rotate_back(x: Tensor, g_basis: Tensor | None, a_basis: Tensor | None) -> Tensor:
    """``Q_G X Q_Aᵀ``: the inverse of :func:`rotate`."""
    dtype = x.dtype
    if g_basis is not None:
        x = g_basis @ x.to(g_basis.dtype)
    if a_basis is not None:
        x = x.to(a_basis.dtype) @ a_basis.mT
    return x.to(dtype)


def basis_change(old: Tensor | None, new: Tensor | None) -> Tensor | None:
    """``R = Q_oldᵀ Q_new`` (None: both are the identity): coordinates in the new basis are
    ``Rᵀ`` times those in the old one.
    """
    if old is None:
        return new
    if new is None:
        return old.mT
    return old.mT @ new.to(old.dtype)


def rebase_first_moment(exp_avg: Tensor, g_change: Tensor | None, a_change: Tensor | None) -> Tensor:
    """Adam's first moment carried into a refreshed basis exactly: ``R_Gᵀ M R_A`` with the
    :func:`basis_change` of each side (the moment is linear in the gradient, so this equals
    keeping it in the parameter's coordinates and rotating it each step, as SOAP's paper does).
    """
    return rotate(exp_avg, g_change, a_change)


def _matching(change: Tensor | None, size: int, device: torch.device) -> Tensor:
    """For each new eigenvector, the old one it overlaps most (``argmax_i |R_ij|``)."""
    if change is None:
        return torch.arange(size, device=device)
    return change.abs().argmax(0)


def rebase_second_moment(exp_avg_sq: Tensor, g_change: Tensor | None, a_change: Tensor | None) -> Tensor:
    """Adam's second moment across a refresh, SOAP's way: not rotated (a rotated diagonal
    would need the full second-moment matrix), each coordinate kept with the eigenvector it
    belongs to. A refreshed eigenvector inherits the entry of the old eigenvector it overlaps
    most, ``argmax_i |(Q_oldᵀ Q_new)_ij|`` per side, which re-indexes the moment when a refresh
    reorders the eigenvectors (SOAP's QR refresh sorts them by eigenvalue) and keeps it
    otherwise.
    """
    rows = _matching(g_change, exp_avg_sq.shape[0], exp_avg_sq.device)
    cols = _matching(a_change, exp_avg_sq.shape[1], exp_avg_sq.device)
    return exp_avg_sq.index_select(0, rows).index_select(1, cols)


def adam_moments_(exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, beta1: float, beta2: float) -> None:
    """Adam's moments in place: ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²`` (torch.optim.AdamW's
    order of operations).
    """
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)


def adam_direction(exp_avg: Tensor, exp_avg_sq: Tensor, step: int, beta1: float, beta2: float,
                   eps: float) -> Tensor:
    """Adam's bias-corrected direction ``(m / (1−β₁ᵗ)) / (√v / √(1−β₂ᵗ) + ε)`` at step ``t``
    (1-based), the step AdamW takes before the learning rate.

    Example:
        >>> m, v = torch.zeros(2), torch.zeros(2)
        >>> adam_moments_(m, v, torch.tensor([1.0, -2.0]), 0.9, 0.999)
        >>> torch.allclose(adam_direction(m, v, 1, 0.9, 0.999, 0.0), torch.tensor([1.0, -1.0]))
        True
    """
    denom = exp_avg_sq.sqrt().div_(math.sqrt(1.0 - beta2 ** step)).add_(eps)
    return (exp_avg / denom).div_(1.0 - beta1 ** step)


def shampoo_factors_ema_(left: Tensor | None, right: Tensor | None, grad: Tensor, beta: float) -> None:
    """Shampoo's factors of a packed gradient ``X`` in place: ``L ← βL + (1−β) X Xᵀ`` and
    ``R ← βR + (1−β) Xᵀ X`` (a None side is not kept).
    """
    for factor, product in ((left, lambda x: x @ x.mT), (right, lambda x: x.mT @ x)):
        if factor is not None:
            factor.mul_(beta).add_(product(grad.to(factor.dtype)), alpha=1.0 - beta)
