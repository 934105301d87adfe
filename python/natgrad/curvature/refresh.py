"""Cheap refreshes of a Kronecker block's decomposition, warm-started from the previous one.

Between exact decompositions (``damped_eigh`` / ``kfac_damped_inverses``), the factors of a
layer move slowly (an exponential moving average), so the previous decomposition is a good
starting point:

* eigenbasis (:func:`warm_eigh`): one step of subspace iteration from the previous eigenvectors,
  ``Q = qr(F V_prev)``, with the eigenvalues read off the diagonal of ``Qᵀ F Q`` (the update
  SOAP uses, Vyas et al., 2024). Columns are ordered by decreasing previous eigenvalue first, so
  that the Gram–Schmidt order of the QR keeps the dominant directions. The result is always an
  orthonormal basis with non-negative eigenvalues, i.e. a valid damped preconditioner; its
  error against the exact eigendecomposition is what ``benchmarks/kfac_refresh.py`` measures.
* damped inverse (:func:`newton_schulz_inverse`): Newton–Schulz iterations
  ``X ← X + X (I − M X)`` from the previous inverse, for ``M = F + δ I``. The residual obeys
  ``I − M X_{k+1} = (I − M X_k)²``, so convergence is guaranteed when ``‖I − M X_0‖ < 1``; the
  refresh checks the Frobenius norm of the starting residual (an upper bound of the spectral
  norm) and declines (returns None) above ``max_residual``, so that the caller falls back to the
  exact inverse.

Both cost a few GEMMs and one QR (eigenbasis) instead of a full ``eigh`` or Cholesky inverse.
Measured on the benchmark models (``benchmarks/kfac_refresh.py``, CPU): the warm eigenbasis is
3–10x closer to the exact one than the previous decomposition, but a QR costs about as much as
LAPACK's ``eigh`` there, so it saves no time; with damping 1e-3 the factors move too much
between refreshes for Newton–Schulz (it declines and the refresh is exact). Hence
``natgrad.KFAC(warm_refreshes=0)`` by default.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["factored_shifts", "newton_schulz_inverse", "warm_eigh"]


def warm_eigh(factor: Tensor, eigenvalues: Tensor, eigenvectors: Tensor,
              iterations: int = 1) -> tuple[Tensor, Tensor]:
    """Approximate eigendecomposition of ``factor`` warm-started from a previous one.

    Args:
        factor (Tensor): ``[n, n]`` symmetric PSD factor (finite).
        eigenvalues (Tensor): ``[n]`` previous eigenvalues (they only order the columns).
        eigenvectors (Tensor): ``[n, n]`` previous orthonormal eigenvectors (columns).
        iterations (int): subspace-iteration steps (default: 1).

    Returns:
        (eigenvalues, eigenvectors): ``[n]`` (clamped at 0, in decreasing order of the previous
        eigenvalues) and ``[n, n]`` orthonormal, in the factor's dtype.
    """
    if iterations < 1:
        raise ValueError(f"Invalid iterations: {iterations!r} (expected an int >= 1)")
    q = eigenvectors[:, torch.argsort(eigenvalues, descending=True)]
    for _ in range(iterations):
        q = torch.linalg.qr(factor @ q).Q
    values = (q * (factor @ q)).sum(0).clamp_min_(0)
    return values, q


def factored_shifts(g_factor: Tensor, a_factor: Tensor, damping: float,
                    pi_correction: bool) -> tuple[float, float]:
    """The diagonal shifts ``(δ_G, δ_A) = (√γ/π, π√γ)`` of factored damping, with
    ``π = sqrt((tr A / d_A) / (tr G / d_G))`` (1 without ``pi_correction`` or when a trace is
    not positive): the same shifts as :func:`natgrad.ops.kfac_damped_inverses`.
    """
    pi = 1.0
    if pi_correction:
        a_mean = float(torch.diagonal(a_factor).double().mean())
        g_mean = float(torch.diagonal(g_factor).double().mean())
        if a_mean > 0 and g_mean > 0:
            pi = math.sqrt(a_mean / g_mean)
    root = math.sqrt(damping)
    return root / pi, pi * root


def newton_schulz_inverse(matrix: Tensor, previous: Tensor, iterations: int = 2,
                          max_residual: float = 0.5) -> Tensor | None:
    """``matrix⁻¹`` by Newton–Schulz iterations from ``previous`` (an approximate inverse).

    Args:
        matrix (Tensor): ``[n, n]`` symmetric positive definite (a damped factor).
        previous (Tensor): ``[n, n]`` starting point, e.g. the previous refresh's inverse.
        iterations (int): Newton–Schulz steps; the residual norm goes from r to r^(2^k)
            (default: 2).
        max_residual (float): the largest ``‖I − matrix · previous‖_F`` accepted (< 1)
            (default: 0.5).

    Returns:
        Tensor or None: the symmetrised inverse, or None when ``previous`` is too far (or not
        finite) for the iteration to be trusted; the caller then inverts exactly.
    """
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    x = previous
    residual = eye - matrix @ x
    r0 = float(torch.linalg.matrix_norm(residual))  # one host read per refresh and factor
    if not r0 <= max_residual:  # NaN included
        return None
    for i in range(iterations):
        x = x + x @ residual
        if i + 1 < iterations:
            residual = residual @ residual  # I - M X_{k+1} = (I - M X_k)^2
    return (x + x.mT) * 0.5
