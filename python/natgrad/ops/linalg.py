"""Damped eigendecomposition with a fallback ladder, and K-FAC preconditioning.

The ladder (csrc/linalg/ladder.h) tries, in order: the factorisation in the factor's dtype,
again in float64, float64 with growing diagonal jitter, and finally the diagonal of the factor.
Results never hold NaN or Inf, eigenvalues are clamped at 0, and the rung used is reported as a
0-dim int64 tensor (compare with :class:`Rung`).

K-FAC preconditioning applies ``(A ⊗ G + γI)⁻¹`` to a layer gradient ``∇W`` of shape
``[..., d_out, d_in]`` (bias folded in as the last column; leading dims batch layers of equal
shapes), either in the eigenbasis::

    P = V_G [(V_Gᵀ ∇W V_A) ⊘ (λ_G λ_Aᵀ + γ)] V_Aᵀ

or, with π-corrected factored damping (Martens & Grosse, 2015, §6.3),
``P = (G + √γ/π I)⁻¹ ∇W (A + π√γ I)⁻¹`` with ``π = sqrt((tr A / d_in) / (tr G / d_out))`` (each
factor damped in proportion to its own mean eigenvalue),
available both in the eigenbasis (``pi_correction=True``) and as explicit inverses.

Every op here runs on any device (ATen compositions: LAPACK on CPU, cuSOLVER/cuBLAS on CUDA)
and returns its tensors on the inputs' device, except ``rung``, which is always a CPU tensor (a
host-side decision; reading it never syncs a device). NaN/Inf inputs are rejected with an error
naming the argument: by ``damped_eigh`` and ``kfac_damped_inverses`` before factorising, by the
preconditioning ops from one reduction over their result (one host read per call).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from natgrad import _C  # noqa: F401  (loads the operator registrations)
from natgrad.ops import _checks
from natgrad.ops._common import Rung, not_differentiable, rung_like

__all__ = [
    "DampedInverses",
    "EighResult",
    "Rung",
    "damped_eigh",
    "kfac_damped_inverses",
    "kfac_precondition_diagonal_a",
    "kfac_precondition_ekfac",
    "kfac_precondition_eigen",
    "kfac_precondition_inverse",
]

_ops = torch.ops.natgrad


class EighResult(NamedTuple):
    """Output of :func:`damped_eigh`."""

    eigenvalues: Tensor  #: ``[..., n]`` clamped at 0, plus damping (ascending but on the diagonal rung)
    eigenvectors: Tensor  #: ``[..., n, n]``, one eigenvector per column
    rung: Tensor  #: 0-dim int64, the :class:`Rung` that succeeded


class DampedInverses(NamedTuple):
    """Output of :func:`kfac_damped_inverses`."""

    g_inverse: Tensor  #: ``(G + √γ/π I)⁻¹``
    a_inverse: Tensor  #: ``(A + π√γ I)⁻¹``
    rung: Tensor  #: 0-dim int64, the worse :class:`Rung` of the two factorisations


def damped_eigh(factor: Tensor, damping: float = 0.0) -> EighResult:
    """Eigendecomposition of a symmetric PSD factor that never returns NaN or Inf.

    Both triangles are read (the factor is symmetrised). Eigenvalues are clamped at 0 and then
    shifted by ``damping``; keep ``damping=0`` when the damping is applied later by
    :func:`kfac_precondition_eigen`. Not differentiable.

    Args:
        factor (Tensor): ``[..., n, n]``, float32 or float64, finite.
        damping (float): added to every clamped eigenvalue, >= 0 (default: 0.0).

    Returns:
        EighResult: ``(eigenvalues, eigenvectors, rung)`` in the factor's dtype.

    Raises:
        RuntimeError: if ``factor`` is not square, not floating point, or holds NaN/Inf.
    """
    return EighResult(*_ops.damped_eigh(factor, damping))


def kfac_precondition_eigen(
    grad: Tensor,
    g_eigenvalues: Tensor,
    g_eigenvectors: Tensor,
    a_eigenvalues: Tensor,
    a_eigenvectors: Tensor,
    damping: float,
    pi_correction: bool = False,
) -> Tensor:
    """K-FAC preconditioned gradient in the factors' eigenbases.

    Without ``pi_correction`` this is exactly ``(A ⊗ G + damping·I)⁻¹ vec(∇W)``; with it, the
    damping is split between the factors by π (see the module docstring). Directions whose
    denominator is 0 (no damping, zero eigenvalue) are left unscaled. Differentiable with
    respect to ``grad`` (the preconditioner is self-adjoint); the decompositions are constants.

    Args:
        grad (Tensor): ``[..., d_out, d_in]`` layer gradient, bias as the last column.
        g_eigenvalues (Tensor): ``[..., d_out]`` from :func:`damped_eigh` of G.
        g_eigenvectors (Tensor): ``[..., d_out, d_out]``.
        a_eigenvalues (Tensor): ``[..., d_in]`` from :func:`damped_eigh` of A.
        a_eigenvectors (Tensor): ``[..., d_in, d_in]``.
        damping (float): γ >= 0.
        pi_correction (bool): factored, π-corrected damping (default: False).

    Returns:
        Tensor: the preconditioned gradient, shaped like ``grad``.
    """
    return _ops.kfac_precondition_eigen(
        grad, g_eigenvalues, g_eigenvectors, a_eigenvalues, a_eigenvectors, damping,
        pi_correction,
    )


def kfac_precondition_diagonal_a(
    grad: Tensor,
    a_diagonal: Tensor,
    g_eigenvalues: Tensor,
    g_eigenvectors: Tensor,
    damping: float,
    pi_correction: bool = False,
) -> Tensor:
    """K-FAC preconditioned gradient when A is diagonal (an embedding's token frequencies).

    ``P = V_G [(V_Gᵀ ∇W) ⊘ (λ_G aᵀ + γ)]`` with ``a = max(a_diagonal, 0)``; with
    ``pi_correction`` the denominator is ``(λ_G + √γ/π)(a + π√γ)ᵀ``,
    ``π = sqrt(max(mean a, 1e-30) / max(mean λ_G, 1e-30))``. Zero denominators are left
    unscaled. No host read: NaN/Inf inputs give a NaN result (an Inf eigenvalue or frequency
    included), for the caller to detect with its own finiteness read. Differentiable with
    respect to ``grad`` (the preconditioner is self-adjoint); the factors are constants.

    Args:
        grad (Tensor): ``[..., d_g, d_a]``, e.g. the transposed embedding-weight gradient.
        a_diagonal (Tensor): ``[..., d_a]`` diagonal of A.
        g_eigenvalues (Tensor): ``[..., d_g]`` from :func:`damped_eigh` of G.
        g_eigenvectors (Tensor): ``[..., d_g, d_g]``.
        damping (float): γ >= 0.
        pi_correction (bool): factored, π-corrected damping (default: False).

    Returns:
        Tensor: the preconditioned gradient, shaped like ``grad``.
    """
    return _ops.kfac_precondition_diagonal_a(
        grad, a_diagonal, g_eigenvalues, g_eigenvectors, damping, pi_correction
    )


def kfac_damped_inverses(
    g_factor: Tensor, a_factor: Tensor, damping: float, pi_correction: bool = False
) -> DampedInverses:
    """Damped inverses ``(G + √γ/π I)⁻¹`` and ``(A + π√γ I)⁻¹`` by Cholesky with the ladder.

    Computed once per inverse update; :func:`kfac_precondition_inverse` applies them each step.
    ``π = 1`` unless ``pi_correction``. Not differentiable.

    Args:
        g_factor (Tensor): ``[..., d_out, d_out]`` gradient factor G.
        a_factor (Tensor): ``[..., d_in, d_in]`` activation factor A.
        damping (float): γ > 0.
        pi_correction (bool): split the damping by π (default: False).

    Returns:
        DampedInverses: ``(g_inverse, a_inverse, rung)``.
    """
    return DampedInverses(*_ops.kfac_damped_inverses(g_factor, a_factor, damping, pi_correction))


def kfac_precondition_inverse(grad: Tensor, g_inverse: Tensor, a_inverse: Tensor) -> Tensor:
    """K-FAC preconditioned gradient ``G_inv ∇W A_inv`` from precomputed damped inverses.

    Differentiable with respect to all three arguments.

    Args:
        grad (Tensor): ``[..., d_out, d_in]``.
        g_inverse (Tensor): ``[..., d_out, d_out]`` from :func:`kfac_damped_inverses`.
        a_inverse (Tensor): ``[..., d_in, d_in]``.
    """
    return _ops.kfac_precondition_inverse(grad, g_inverse, a_inverse)


def kfac_precondition_ekfac(grad: Tensor, g_eigenvectors: Tensor, a_eigenvectors: Tensor | None,
                            eigenvalues: Tensor, damping: float) -> Tensor:
    """EKFAC preconditioned gradient (George et al., 2018): an arbitrary eigenvalue matrix in the
    Kronecker eigenbasis.

    ``P = V_G [(V_Gᵀ ∇W V_A) ⊘ (S + γ)] V_Aᵀ`` with ``S = max(eigenvalues, 0)``: exact damping,
    no π correction. ``a_eigenvectors=None`` means ``V_A = I`` (a diagonal A, as an embedding's).
    Zero denominators are left unscaled. NaN/Inf inputs are rejected like
    :func:`kfac_precondition_eigen`'s. Differentiable with respect to ``grad`` (the
    preconditioner is self-adjoint); the decomposition is a constant.

    Args:
        grad (Tensor): ``[..., d_g, d_a]`` layer gradient, bias as the last column.
        g_eigenvectors (Tensor): ``V_G`` ``[..., d_g, d_g]``.
        a_eigenvectors (Tensor or None): ``V_A`` ``[..., d_a, d_a]``; None: the identity.
        eigenvalues (Tensor): ``S`` ``[..., d_g, d_a]`` (:mod:`natgrad.ops.ekfac`).
        damping (float): γ >= 0.

    Returns:
        Tensor: the preconditioned gradient, shaped like ``grad``.
    """
    return _ops.kfac_precondition_ekfac(grad, g_eigenvectors, a_eigenvectors, eigenvalues, damping)


# ---- fake kernels (with the C++ argument checks) -----------------------------------------------


def _check_sides(grad: Tensor, g_side: Tensor, g_name: str, a_side: Tensor, a_name: str) -> None:
    """Grad ``[..., m, n]`` against per-side matrices ``[..., m, m]`` and ``[..., n, n]``."""
    _checks.floating(grad, "grad")
    _checks.dim_ge(grad, 2, "grad", "[..., out_features, in_features (+1 for bias)]")
    _checks.same_device_dtype(g_side, grad, g_name, "grad")
    _checks.same_device_dtype(a_side, grad, a_name, "grad")
    batch = list(grad.shape[:-2])
    m, n = grad.shape[-2], grad.shape[-1]
    _checks.shape_eq(g_side, batch + [m, m], g_name, "[..., d_out, d_out] matching grad")
    _checks.shape_eq(a_side, batch + [n, n], a_name, "[..., d_in, d_in] matching grad")


@torch.library.register_fake("natgrad::damped_eigh")
def _(factor, damping):
    _checks.floating(factor, "factor")
    _checks.square(factor, "factor")
    _checks.damping(damping, strictly_positive=False)
    torch._check(factor.shape[-1] > 0, lambda: f"factor must not be empty, got shape {list(factor.shape)}")
    return factor.new_empty(factor.shape[:-1]), factor.new_empty(factor.shape), rung_like()


@torch.library.register_fake("natgrad::kfac_precondition_eigen")
def _(grad, g_eigenvalues, g_eigenvectors, a_eigenvalues, a_eigenvectors, damping, pi_correction):
    _check_sides(grad, g_eigenvectors, "g_eigenvectors", a_eigenvectors, "a_eigenvectors")
    _checks.same_device_dtype(g_eigenvalues, grad, "g_eigenvalues", "grad")
    _checks.same_device_dtype(a_eigenvalues, grad, "a_eigenvalues", "grad")
    _checks.shape_eq(g_eigenvalues, g_eigenvectors.shape[:-1], "g_eigenvalues",
                     "[..., d_out] matching g_eigenvectors")
    _checks.shape_eq(a_eigenvalues, a_eigenvectors.shape[:-1], "a_eigenvalues",
                     "[..., d_in] matching a_eigenvectors")
    _checks.damping(damping, strictly_positive=False)
    return grad.new_empty(grad.shape)


@torch.library.register_fake("natgrad::kfac_precondition_diagonal_a")
def _(grad, a_diagonal, g_eigenvalues, g_eigenvectors, damping, pi_correction):
    _checks.floating(grad, "grad")
    _checks.dim_ge(grad, 2, "grad", "[..., d_g, d_a]")
    _checks.same_device_dtype(a_diagonal, grad, "a_diagonal", "grad")
    _checks.same_device_dtype(g_eigenvalues, grad, "g_eigenvalues", "grad")
    _checks.same_device_dtype(g_eigenvectors, grad, "g_eigenvectors", "grad")
    batch, d_g, d_a = list(grad.shape[:-2]), grad.shape[-2], grad.shape[-1]
    _checks.shape_eq(a_diagonal, batch + [d_a], "a_diagonal", "[..., d_a] matching grad")
    _checks.shape_eq(g_eigenvalues, batch + [d_g], "g_eigenvalues", "[..., d_g] matching grad")
    _checks.shape_eq(g_eigenvectors, batch + [d_g, d_g], "g_eigenvectors",
                     "[..., d_g, d_g] matching grad")
    _checks.damping(damping, strictly_positive=False)
    return grad.new_empty(grad.shape)


@torch.library.register_fake("natgrad::kfac_precondition_ekfac")
def _(grad, g_eigenvectors, a_eigenvectors, eigenvalues, damping):
    _checks.floating(grad, "grad")
    _checks.dim_ge(grad, 2, "grad", "[..., d_g, d_a]")
    _checks.same_device_dtype(g_eigenvectors, grad, "g_eigenvectors", "grad")
    _checks.same_device_dtype(eigenvalues, grad, "eigenvalues", "grad")
    batch, d_g, d_a = list(grad.shape[:-2]), grad.shape[-2], grad.shape[-1]
    _checks.shape_eq(g_eigenvectors, batch + [d_g, d_g], "g_eigenvectors", "[..., d_g, d_g] matching grad")
    _checks.shape_eq(eigenvalues, grad.shape, "eigenvalues", "[..., d_g, d_a] matching grad")
    if a_eigenvectors is not None:
        _checks.same_device_dtype(a_eigenvectors, grad, "a_eigenvectors", "grad")
        _checks.shape_eq(a_eigenvectors, batch + [d_a, d_a], "a_eigenvectors", "[..., d_a, d_a] matching grad")
    _checks.damping(damping, strictly_positive=False)
    return grad.new_empty(grad.shape)


@torch.library.register_fake("natgrad::kfac_damped_inverses")
def _(g_factor, a_factor, damping, pi_correction):
    _checks.floating(g_factor, "g_factor")
    _checks.square(g_factor, "g_factor")
    _checks.square(a_factor, "a_factor")
    _checks.same_device_dtype(a_factor, g_factor, "a_factor", "g_factor")
    torch._check(
        list(a_factor.shape[:-2]) == list(g_factor.shape[:-2]),
        lambda: "a_factor and g_factor must have the same batch dims, got "
        f"{list(a_factor.shape)} and {list(g_factor.shape)}",
    )
    _checks.damping(damping, strictly_positive=True)
    return g_factor.new_empty(g_factor.shape), a_factor.new_empty(a_factor.shape), rung_like()


@torch.library.register_fake("natgrad::kfac_precondition_inverse")
def _(grad, g_inverse, a_inverse):
    _check_sides(grad, g_inverse, "g_inverse", a_inverse, "a_inverse")
    return grad.new_empty(grad.shape)


# ---- autograd ----------------------------------------------------------------------------------


def _register_self_adjoint(name: str, curvature: int, detach: str) -> None:
    """Autograd of a preconditioner that is linear and symmetric in ``grad`` (its first
    argument): the input gradient is the same op applied to the output gradient. The next
    ``curvature`` arguments (the decomposition) get none; asking for one is an error.
    """
    op = getattr(_ops, name)

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[1:1 + curvature])
        ctx.rest = inputs[1 + curvature:]

    def backward(ctx, grad):
        if any(ctx.needs_input_grad[1:1 + curvature]):
            raise RuntimeError(f"natgrad::{name} is differentiable with respect to grad only; detach {detach}")
        grad_in = op(grad.contiguous(), *ctx.saved_tensors, *ctx.rest)
        return (grad_in,) + (None,) * (curvature + len(ctx.rest))

    torch.library.register_autograd(f"natgrad::{name}", backward, setup_context=setup)


_register_self_adjoint("kfac_precondition_eigen", 4, "the eigenvalues and eigenvectors")
_register_self_adjoint("kfac_precondition_diagonal_a", 3, "a_diagonal, g_eigenvalues and g_eigenvectors")
_register_self_adjoint("kfac_precondition_ekfac", 3, "the eigenvectors and eigenvalues")


def _setup_inverse(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _inverse_backward(ctx, grad):
    x, g_inv, a_inv = ctx.saved_tensors
    d_x = g_inv.mT @ grad @ a_inv.mT if ctx.needs_input_grad[0] else None
    d_g = grad @ (x @ a_inv).mT if ctx.needs_input_grad[1] else None
    d_a = (g_inv @ x).mT @ grad if ctx.needs_input_grad[2] else None
    return d_x, d_g, d_a


torch.library.register_autograd(
    "natgrad::kfac_precondition_inverse", _inverse_backward, setup_context=_setup_inverse
)
for _name in ("damped_eigh", "kfac_damped_inverses"):
    torch.library.register_autograd(
        f"natgrad::{_name}", not_differentiable(_name), setup_context=lambda ctx, inputs, output: None
    )
