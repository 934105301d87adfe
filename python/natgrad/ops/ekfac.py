"""EKFAC (George et al., 2018): the Fisher's diagonal in the Kronecker eigenbasis, re-estimated
from per-sample gradients (csrc/factors/ekfac_diagonal.h).

With ``G = V_G diag(λ_G) V_Gᵀ`` and ``A = V_A diag(λ_A) V_Aᵀ``, and ``∇W_n`` the per-sample
gradient of sample ``n`` (bias folded in as the last column, as for the factor ops), the
corrected diagonal is ``S = E_n[(V_Gᵀ ∇W_n V_A)²]`` (elementwise square), which replaces
``λ_G λ_Aᵀ`` in the preconditioner (:func:`natgrad.ops.kfac_precondition_ekfac`).

Conventions:

* dim 0 of the input counts the ``N`` samples; a sample's weight-sharing positions (Linear: the
  middle dims of ``[N, ..., d_in]``; Conv2d: output pixels; Embedding: the indices of
  ``[N, ...]``) are summed into its gradient, ``∇W_n = grad_scale · Σ_r g_nr ã_nrᵀ``.
* ``grad_output`` may hold ``P·N`` samples along dim 0, pass-major (``P`` gradient passes over
  one forward); their squares are summed, and the mean is over the ``N`` samples.
* ``grad_scale`` turns captured output gradients into per-sample ones (``N`` for a batch-mean
  loss, 1 for a summed one); unlike the factor ops' it carries no ``sqrt(positions)``: positions
  are summed exactly here.
* In place: ``S ← decay·S + (1 − decay)·Ŝ`` (``decay=0`` replaces, even a NaN ``S``). Inputs are
  converted to ``S``'s dtype; the eigenvectors must have it. When ``Ŝ`` is not finite, ``S`` is
  left unchanged, decided on the device; each op returns a 0-d bool tensor, whether ``S`` was
  updated (not read back).
* A Linear layer without positions costs one GEMM, ``((G V_G)²)ᵀ ((X V_A)²) / N``; with
  positions (and Conv2d) the per-sample rotated gradients are batched matmuls over chunks of
  samples. Not differentiable (buffer updates).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.modules.utils import _pair

from natgrad import _C  # noqa: F401  (loads the operator registrations)
from natgrad.ops import _checks
from natgrad.ops._common import not_differentiable

__all__ = ["conv2d_ekfac_diagonal_ema_", "ekfac_rebase", "embedding_ekfac_diagonal_ema_",
           "linear_ekfac_diagonal_ema_"]

_ops = torch.ops.natgrad
_IntOrPair = int | tuple[int, int]


def linear_ekfac_diagonal_ema_(diagonal: Tensor, input: Tensor, grad_output: Tensor, g_eigenvectors: Tensor,
                               a_eigenvectors: Tensor, bias: bool = True, grad_scale: float = 1.0,
                               decay: float = 0.95) -> Tensor:
    """EMA of an nn.Linear layer's corrected diagonal, in place.

    Args:
        diagonal (Tensor): ``S`` ``[out_features, in_features (+1)]``, updated in place.
        input (Tensor): the layer's input ``[N, ..., in_features]`` (middle dims: positions).
        grad_output (Tensor): ``[P·N, ..., out_features]``, the same positions.
        g_eigenvectors (Tensor): ``V_G`` ``[out_features, out_features]``.
        a_eigenvectors (Tensor): ``V_A`` ``[in_features (+1), in_features (+1)]``.
        bias (bool): the layer has a bias (the ones column) (default: True).
        grad_scale (float): per-sample scale of the output gradients (default: 1.0).
        decay (float): EMA decay ρ in [0, 1] (default: 0.95).

    Returns:
        Tensor: 0-d bool, whether ``diagonal`` was updated (False: the update was not finite).
    """
    return _ops.linear_ekfac_diagonal_ema_(diagonal, input, grad_output, g_eigenvectors, a_eigenvectors, bias,
                                           grad_scale, decay)


def conv2d_ekfac_diagonal_ema_(diagonal: Tensor, input: Tensor, grad_output: Tensor, g_eigenvectors: Tensor,
                               a_eigenvectors: Tensor, kernel_size: _IntOrPair, stride: _IntOrPair = 1,
                               padding: _IntOrPair = 0, dilation: _IntOrPair = 1, bias: bool = True,
                               grad_scale: float = 1.0, decay: float = 0.95) -> Tensor:
    """EMA of an nn.Conv2d layer's (groups=1) corrected diagonal, in place.

    Args:
        diagonal (Tensor): ``S`` ``[C_out, C·kh·kw (+1)]``, updated in place.
        input (Tensor): ``[N, C, H, W]``.
        grad_output (Tensor): ``[P·N, C_out, OH, OW]``.
        g_eigenvectors (Tensor): ``V_G`` ``[C_out, C_out]``.
        a_eigenvectors (Tensor): ``V_A`` over the patches (+1 for the bias).
        kernel_size (int or (int, int)): the layer's kernel size.
        stride (int or (int, int)): the layer's stride (default: 1).
        padding (int or (int, int)): the layer's explicit zero padding (default: 0).
        dilation (int or (int, int)): the layer's dilation (default: 1).
        bias (bool): the layer has a bias (default: True).
        grad_scale (float): per-sample scale of the output gradients (default: 1.0).
        decay (float): EMA decay ρ in [0, 1] (default: 0.95).

    Returns:
        Tensor: 0-d bool, whether ``diagonal`` was updated.
    """
    return _ops.conv2d_ekfac_diagonal_ema_(diagonal, input, grad_output, g_eigenvectors, a_eigenvectors,
                                           _pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation),
                                           bias, grad_scale, decay)


def embedding_ekfac_diagonal_ema_(diagonal: Tensor, indices: Tensor, grad_output: Tensor, g_eigenvectors: Tensor,
                                  grad_scale: float = 1.0, decay: float = 0.95) -> Tensor:
    """EMA of an nn.Embedding layer's corrected diagonal (``A`` diagonal: ``V_A = I``), in the
    block's transposed layout, in place.

    Args:
        diagonal (Tensor): ``S`` ``[embedding_dim, num_embeddings]``, updated in place.
        indices (Tensor): ``[N, ...]`` int64/int32, each in ``[0, num_embeddings)``.
        grad_output (Tensor): ``[P·N, ..., embedding_dim]``.
        g_eigenvectors (Tensor): ``V_G`` ``[embedding_dim, embedding_dim]``.
        grad_scale (float): per-sample scale of the output gradients (default: 1.0).
        decay (float): EMA decay ρ in [0, 1] (default: 0.95).

    Returns:
        Tensor: 0-d bool, whether ``diagonal`` was updated.
    """
    return _ops.embedding_ekfac_diagonal_ema_(diagonal, indices, grad_output, g_eigenvectors, grad_scale, decay)


def ekfac_rebase(eigenvalues: Tensor, old_g_eigenvectors: Tensor, g_eigenvectors: Tensor,
                 old_a_eigenvectors: Tensor | None = None, a_eigenvectors: Tensor | None = None) -> Tensor:
    """The corrected diagonal carried into a refreshed eigenbasis.

    ``S_new = (R_G ∘ R_G) S (R_A ∘ R_A)ᵀ`` with ``R_G = V_Gᵀ V_G,old`` and ``R_A = V_Aᵀ V_A,old``:
    the diagonal, in the new basis, of the matrix ``Q_old diag(S) Q_oldᵀ`` the old diagonal stands
    for (``Q = V_G ⊗ V_A``). The mixing matrices are doubly stochastic, so ``S_new`` is
    non-negative with ``S``'s total. Not differentiable.

    Args:
        eigenvalues (Tensor): ``S`` ``[d_g, d_a]`` in the old basis (clamped at 0).
        old_g_eigenvectors (Tensor): ``V_G,old`` ``[d_g, d_g]``, the basis of ``eigenvalues``.
        g_eigenvectors (Tensor): ``V_G`` ``[d_g, d_g]``, the new basis.
        old_a_eigenvectors (Tensor or None): ``V_A,old`` ``[d_a, d_a]``; None (with
            ``a_eigenvectors``): ``V_A = I``, an embedding (default: None).
        a_eigenvectors (Tensor or None): ``V_A`` ``[d_a, d_a]`` (default: None).

    Returns:
        Tensor: ``S_new`` ``[d_g, d_a]``.
    """
    return _ops.ekfac_rebase(eigenvalues, old_g_eigenvectors, g_eigenvectors, old_a_eigenvectors, a_eigenvectors)


# ---- fake kernels (shapes, dtypes, devices and the C++ argument checks) ---------------------------


def _passes(grad_samples, samples) -> None:
    torch._check(grad_samples >= samples and grad_samples % samples == 0, lambda: (
        f"grad_output must hold a whole number of passes over the input's {samples} samples along "
        f"dim 0, got {grad_samples}"))


def _check_basis(diagonal, g_eigenvectors, a_eigenvectors, data, data_name, d_g, d_a) -> Tensor:
    _checks.floating(diagonal, "diagonal")
    torch._check(diagonal.device == data.device, lambda: (
        f"diagonal must be on the same device as {data_name} ({data.device}), got {diagonal.device}"))
    _checks.shape_eq(diagonal, (d_g, d_a), "diagonal", "[out_features, in_features (+1 for bias)] matching the layer")
    _checks.same_device_dtype(g_eigenvectors, diagonal, "g_eigenvectors", "diagonal")
    _checks.shape_eq(g_eigenvectors, (d_g, d_g), "g_eigenvectors", "[d_out, d_out]")
    if a_eigenvectors is not None:
        _checks.same_device_dtype(a_eigenvectors, diagonal, "a_eigenvectors", "diagonal")
        _checks.shape_eq(a_eigenvectors, (d_a, d_a), "a_eigenvectors", "[d_in (+1), d_in (+1)]")
    return torch.empty((), dtype=torch.bool, device=diagonal.device)


@torch.library.register_fake("natgrad::linear_ekfac_diagonal_ema_")
def _(diagonal, input, grad_output, g_eigenvectors, a_eigenvectors, bias, grad_scale, decay):
    _checks.floating(input, "input")
    _checks.floating(grad_output, "grad_output")
    _checks.dim_ge(input, 2, "input", "[N, ..., in_features]")
    torch._check(grad_output.dim() == input.dim(), lambda: (
        f"grad_output must have the input's dims ([P * N, ..., out_features]), got shapes "
        f"{list(grad_output.shape)} and {list(input.shape)}"))
    torch._check(list(grad_output.shape[1:-1]) == list(input.shape[1:-1]), lambda: (
        f"grad_output must have the input's positions (middle dims), got shapes {list(grad_output.shape)} "
        f"and {list(input.shape)}"))
    _checks.nonempty_rows(input.shape[0], "input")
    _checks.grad_scale(grad_scale)
    _checks.decay(decay)
    _passes(grad_output.shape[0], input.shape[0])
    return _check_basis(diagonal, g_eigenvectors, a_eigenvectors, input, "input", grad_output.shape[-1],
                        input.shape[-1] + int(bias))


@torch.library.register_fake("natgrad::conv2d_ekfac_diagonal_ema_")
def _(diagonal, input, grad_output, g_eigenvectors, a_eigenvectors, kernel_size, stride, padding, dilation,
      bias, grad_scale, decay):
    patch_dim, positions = _checks.conv_geometry(input, kernel_size, stride, padding, dilation)
    _checks.floating(grad_output, "grad_output")
    _checks.dim_eq(grad_output, 4, "grad_output", "[P * N, C_out, OH, OW]")
    torch._check(grad_output.shape[2] * grad_output.shape[3] == positions, lambda: (
        f"grad_output must have the convolution's {positions} output positions, got shape "
        f"{list(grad_output.shape)}"))
    _checks.grad_scale(grad_scale)
    _checks.decay(decay)
    _passes(grad_output.shape[0], input.shape[0])
    return _check_basis(diagonal, g_eigenvectors, a_eigenvectors, input, "input", grad_output.shape[1],
                        patch_dim + int(bias))


@torch.library.register_fake("natgrad::embedding_ekfac_diagonal_ema_")
def _(diagonal, indices, grad_output, g_eigenvectors, grad_scale, decay):
    torch._check(indices.dtype in (torch.int64, torch.int32), lambda: (
        f"indices must have an integer dtype (int64 or int32), got {_checks.dtype_name(indices.dtype)}"))
    _checks.dim_ge(indices, 1, "indices", "[N, ...]")
    _checks.floating(grad_output, "grad_output")
    torch._check(grad_output.dim() == indices.dim() + 1 and list(grad_output.shape[1:-1]) == list(indices.shape[1:]),
                 lambda: (f"grad_output must be [P * N, ..., embedding_dim] over the indices' positions, got "
                          f"shapes {list(grad_output.shape)} and {list(indices.shape)}"))
    _checks.nonempty_rows(indices.shape[0], "indices")
    _checks.grad_scale(grad_scale)
    _checks.decay(decay)
    _checks.dim_eq(diagonal, 2, "diagonal", "[embedding_dim, num_embeddings]")
    _passes(grad_output.shape[0], indices.shape[0])
    return _check_basis(diagonal, g_eigenvectors, None, indices, "indices", grad_output.shape[-1], diagonal.shape[1])


@torch.library.register_fake("natgrad::ekfac_rebase")
def _(eigenvalues, old_g_eigenvectors, g_eigenvectors, old_a_eigenvectors, a_eigenvectors):
    _checks.floating(eigenvalues, "eigenvalues")
    _checks.dim_eq(eigenvalues, 2, "eigenvalues", "[d_g, d_a]")
    d_g, d_a = eigenvalues.shape
    for t, name in ((old_g_eigenvectors, "old_g_eigenvectors"), (g_eigenvectors, "g_eigenvectors")):
        _checks.same_device_dtype(t, eigenvalues, name, "eigenvalues")
        _checks.shape_eq(t, (d_g, d_g), name, "[d_g, d_g]")
    torch._check((old_a_eigenvectors is None) == (a_eigenvectors is None), lambda: (
        "old_a_eigenvectors and a_eigenvectors must both be given or both be None"))
    if a_eigenvectors is not None:
        for t, name in ((old_a_eigenvectors, "old_a_eigenvectors"), (a_eigenvectors, "a_eigenvectors")):
            _checks.same_device_dtype(t, eigenvalues, name, "eigenvalues")
            _checks.shape_eq(t, (d_a, d_a), name, "[d_a, d_a]")
    return eigenvalues.new_empty(eigenvalues.shape)


torch.library.register_autograd("natgrad::ekfac_rebase", not_differentiable("ekfac_rebase"),
                                setup_context=lambda ctx, inputs, output: None)
