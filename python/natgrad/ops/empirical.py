"""Empirical-Fisher operations on per-sample gradients: the Woodbury natural-gradient solve and
the per-sample diagonal Fisher of a Linear layer.

Both run on any device (ATen compositions) and return tensors on the inputs' device, except
``rung``, which is always a CPU tensor. Both reject NaN/Inf inputs with an error naming the
argument.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from natgrad import _C  # noqa: F401  (loads the operator registrations)
from natgrad.ops import _checks
from natgrad.ops._common import not_differentiable, rung_like

__all__ = ["WoodburySolution", "linear_diag_fisher", "woodbury_solve"]

_ops = torch.ops.natgrad


class WoodburySolution(NamedTuple):
    """Output of :func:`woodbury_solve`."""

    solution: Tensor  #: ``(UᵀU/n + λI)⁻¹ rhs``, shaped like ``rhs``
    rung: Tensor  #: 0-dim int64 :class:`natgrad.ops.Rung` of the n×n Cholesky


def woodbury_solve(per_sample_grads: Tensor, rhs: Tensor, damping: float) -> WoodburySolution:
    """Empirical-Fisher natural gradient ``(UᵀU/n + λI)⁻¹ rhs`` without forming the p×p matrix.

    Uses ``(F + λI)⁻¹v = (v − Uᵀ(UUᵀ + nλI)⁻¹Uv)/λ``: O(n²p + n³) time, O(np + n²) memory.
    ``U`` and ``rhs`` are scaled by exact powers of two so that ``UUᵀ`` and ``Uv`` cannot
    overflow the inputs' dtype for finite inputs (float32 rows up to ~1e38 stay correct, with no
    float64 copy of ``U``); the n×n system is solved in float64 by Cholesky through the fallback
    ladder, and the solution is returned in the inputs' dtype. Differentiable with respect to
    ``per_sample_grads`` and ``rhs``.

    Args:
        per_sample_grads (Tensor): ``U``, ``[n, p]``, one flattened per-sample gradient per row.
        rhs (Tensor): ``[p]`` or ``[p, k]``, same dtype and device as ``U``.
        damping (float): λ > 0.

    Returns:
        WoodburySolution: ``(solution, rung)``.
    """
    return WoodburySolution(*_ops.woodbury_solve(per_sample_grads, rhs, damping))


def linear_diag_fisher(
    input: Tensor, grad_output: Tensor, bias: bool = True, grad_scale: float = 1.0
) -> Tensor:
    """Per-sample diagonal empirical Fisher of an nn.Linear layer, with no loop over samples.

    For 2-D data this is ``grad_scale²/N · (g²)ᵀ(a²)`` (bias: ``grad_scale²/N · Σ_n g_n²``), the
    mean of squared per-sample gradients — not the square of the batch-mean gradient. Dims
    between the first and the last are weight-sharing positions (tokens), summed inside each
    sample's gradient before squaring. Not differentiable.

    Args:
        input (Tensor): the layer's input ``[N, ..., in_features]``; dim 0 indexes samples.
        grad_output (Tensor): gradient w.r.t. the output ``[N, ..., out_features]``.
        bias (bool): append the bias column (default: True).
        grad_scale (float): ``N`` for a batch-mean loss, 1 for a summed loss (default: 1.0).

    Returns:
        Tensor: ``[out_features, in_features (+1)]``, shaped like the weight (bias last).
    """
    return _ops.linear_diag_fisher(input, grad_output, bias, grad_scale)


# ---- fake kernels (with the C++ argument checks) -----------------------------------------------


@torch.library.register_fake("natgrad::woodbury_solve")
def _(per_sample_grads, rhs, damping):
    u = per_sample_grads
    _checks.floating(u, "per_sample_grads")
    _checks.dim_eq(u, 2, "per_sample_grads", "[n_samples, n_params]")
    _checks.nonempty_rows(u.shape[0], "per_sample_grads")
    _checks.same_device_dtype(rhs, u, "rhs", "per_sample_grads")
    torch._check(
        rhs.dim() in (1, 2) and rhs.shape[0] == u.shape[1],
        lambda: f"rhs must have shape [n_params] or [n_params, k] with n_params = {u.shape[1]} "
        f"(per_sample_grads.size(1)), got {list(rhs.shape)}",
    )
    _checks.damping(damping, strictly_positive=True)
    return rhs.new_empty(rhs.shape), rung_like()


@torch.library.register_fake("natgrad::linear_diag_fisher")
def _(input, grad_output, bias, grad_scale):
    _checks.floating(input, "input")
    _checks.dim_ge(input, 2, "input", "[N, ..., in_features] (dim 0 indexes samples)")
    _checks.same_device_dtype(grad_output, input, "grad_output", "input")
    lead = list(input.shape[:-1])
    torch._check(
        grad_output.dim() == input.dim() and list(grad_output.shape[:-1]) == lead,
        lambda: f"grad_output must have the leading dims of input {lead} followed by "
        f"out_features, got {list(grad_output.shape)}",
    )
    _checks.nonempty_rows(input.shape[0], "input")
    _checks.grad_scale(grad_scale)
    return input.new_empty(grad_output.shape[-1], input.shape[-1] + int(bias))


def _setup_woodbury(ctx, inputs, output):
    u, rhs, damping = inputs
    ctx.save_for_backward(u, output[0])
    ctx.damping = damping


def _woodbury_backward(ctx, grad, _grad_rung):
    # x = M⁻¹v with M = UᵀU/n + λI (symmetric): dv = M⁻¹ḡ = y, dU = −(U x yᵀ + U y xᵀ)/n.
    u, x = ctx.saved_tensors
    y, _ = _ops.woodbury_solve(u, grad.contiguous(), ctx.damping)
    d_u = None
    if ctx.needs_input_grad[0]:
        xm, ym = (x, y) if x.dim() == 2 else (x[:, None], y[:, None])
        d_u = -((u @ xm) @ ym.mT + (u @ ym) @ xm.mT) / u.shape[0]
    return d_u, y if ctx.needs_input_grad[1] else None, None


torch.library.register_autograd(
    "natgrad::woodbury_solve", _woodbury_backward, setup_context=_setup_woodbury
)
torch.library.register_autograd(
    "natgrad::linear_diag_fisher",
    not_differentiable("linear_diag_fisher"),
    setup_context=lambda ctx, inputs, output: None,
)
