"""The per-step K-FAC work of every layer in one call (csrc/precondition/kfac_step.h).

* :func:`kfac_directions_eigen` / :func:`kfac_directions_inverse`: the preconditioned directions
  of a list of layers, the inner products ``⟨u, g⟩`` the KL trust region needs, and per-layer
  finite flags, returned together so that a step reads the host once. Weight gradients are
  matrices ``[d_out, d_in]`` (view a Conv2d weight as ``[C_out, -1]``); a layer's bias gradient
  is passed separately (``None`` without bias) and enters as the last column of the packed
  layout of :func:`natgrad.ops.kfac_precondition_eigen` without being concatenated.
* :func:`kfac_momentum_step_`: ``b ← μ b + (s u + ω θ)``, ``θ ← θ − η b`` for a list of
  parameters in place (torch.optim.SGD's heavy-ball form).

Unlike the single-layer preconditioning ops, a layer with NaN/Inf does not raise: ``stats``
(``[L, 4]`` float64) holds, per layer, ``grad finite``, ``direction finite``, ``⟨u_w, g_w⟩``,
``⟨u_b, g_b⟩`` (the direction and gradient both times ``grad_scale``), and the caller skips the
layer. Given the layers' momentum buffers (``weight_buffers``, ``bias_buffers``: one entry per
layer, None where a layer has none yet), two columns ``⟨b_w, g_w⟩``, ``⟨b_b, g_b⟩`` (gradient times
``grad_scale``) are appended, ``[L, 6]``, computed in the same pass as ``⟨u, g⟩``: what the KL trust
region on the momentum-accumulated step needs (natgrad.KFAC), with no further reduction. Every direction
and momentum buffer is flushed of subnormal numbers, and gradients
holding any are read through a flushed copy; the floating-point mode is never changed (see
csrc/common/subnormal.h). Not differentiable.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from natgrad import _C  # noqa: F401  (loads the operator registrations)
from natgrad.ops import _checks
from natgrad.ops._common import not_differentiable

__all__ = ["Directions", "kfac_directions_eigen", "kfac_directions_inverse", "kfac_momentum_step_"]

_ops = torch.ops.natgrad


class Directions(NamedTuple):
    """Output of :func:`kfac_directions_eigen` and :func:`kfac_directions_inverse`."""

    weight: list[Tensor]  #: one per layer, shaped like its weight gradient
    bias: list[Tensor]  #: one per layer that has a bias gradient, in layer order
    #: ``[L, 4]`` float64: grad finite, direction finite, ⟨u_w, g_w⟩, ⟨u_b, g_b⟩; with momentum
    #: buffers ``[L, 6]``: then ⟨b_w, g_w⟩, ⟨b_b, g_b⟩
    stats: Tensor


def kfac_directions_eigen(weight_grads: Sequence[Tensor], bias_grads: Sequence[Tensor | None],
                          g_eigenvalues: Sequence[Tensor], g_eigenvectors: Sequence[Tensor],
                          a_eigenvalues: Sequence[Tensor], a_eigenvectors: Sequence[Tensor],
                          damping: Sequence[float], pi_correction: bool = False,
                          grad_scale: float = 1.0, weight_buffers: Sequence[Tensor | None] | None = None,
                          bias_buffers: Sequence[Tensor | None] | None = None) -> Directions:
    """Eigenbasis K-FAC directions of every layer (see the module docstring); per layer the
    result equals ``grad_scale * kfac_precondition_eigen([W, b], ...)`` split into weight and
    bias. ``weight_buffers`` / ``bias_buffers`` (momentum buffers shaped like the gradients)
    append ``⟨b, g⟩`` to ``stats``.
    """
    w, b, stats = _ops.kfac_directions_eigen(list(weight_grads), list(bias_grads), list(g_eigenvalues),
                                             list(g_eigenvectors), list(a_eigenvalues),
                                             list(a_eigenvectors), [float(d) for d in damping],
                                             bool(pi_correction), float(grad_scale),
                                             _optional(weight_buffers), _optional(bias_buffers))
    return Directions(w, b, stats)


def kfac_directions_inverse(weight_grads: Sequence[Tensor], bias_grads: Sequence[Tensor | None],
                            g_inverses: Sequence[Tensor], a_inverses: Sequence[Tensor],
                            grad_scale: float = 1.0, weight_buffers: Sequence[Tensor | None] | None = None,
                            bias_buffers: Sequence[Tensor | None] | None = None) -> Directions:
    """Inverse-form K-FAC directions ``G⁻¹ [W, b] A⁻¹`` of every layer, from
    :func:`natgrad.ops.kfac_damped_inverses` (see the module docstring); momentum buffers as
    for :func:`kfac_directions_eigen`.
    """
    w, b, stats = _ops.kfac_directions_inverse(list(weight_grads), list(bias_grads), list(g_inverses),
                                               list(a_inverses), float(grad_scale),
                                               _optional(weight_buffers), _optional(bias_buffers))
    return Directions(w, b, stats)


def _optional(buffers: Sequence[Tensor | None] | None) -> list[Tensor | None] | None:
    return None if buffers is None else list(buffers)


def kfac_momentum_step_(params: Sequence[Tensor], momentum_buffers: Sequence[Tensor],
                        directions: Sequence[Tensor], lr: float, momentum: float,
                        weight_decay: float = 0.0, direction_scale: float = 1.0) -> None:
    """In place, per parameter: ``d = direction_scale·u + weight_decay·θ``,
    ``b ← momentum·b + d``, ``θ ← θ − lr·b`` (``b = d`` with an empty ``momentum_buffers``, which
    needs ``momentum == 0``). Start buffers at zeros.
    """
    _ops.kfac_momentum_step_(list(params), list(momentum_buffers), list(directions), float(lr),
                             float(momentum), float(weight_decay), float(direction_scale))


# ---- fake kernels (with the C++ argument checks) -----------------------------------------------


def _lengths(layers: int, **lists) -> None:
    for name, values in lists.items():
        torch._check(len(values) == layers, lambda: f"{name} must hold one entry per layer "
                     f"({layers} weight_grads), got {len(values)}")


def _layer(i: int, w: Tensor, b: Tensor | None, a_dim: int, g_dim: int, basis: Tensor) -> None:
    _checks.floating(w, f"weight_grads[{i}]")
    _checks.dim_eq(w, 2, f"weight_grads[{i}]", "[d_out, d_in] (a Conv2d weight viewed as [C_out, -1])")
    torch._check(w.device == basis.device, lambda: f"weight_grads[{i}] must be on the device of its "
                 f"decomposition ({basis.device}), got {w.device}")
    if b is not None:
        _checks.same_device_dtype(b, w, f"bias_grads[{i}]", f"weight_grads[{i}]")
        _checks.shape_eq(b, [w.shape[0]], f"bias_grads[{i}]", "[d_out] matching the weight gradient")
    need_a = w.shape[1] + (b is not None)
    torch._check(w.shape[0] == g_dim and need_a == a_dim, lambda: (
        f"layer {i}: the gradient {list(w.shape)} {'with' if b is not None else 'without'} bias needs "
        f"decompositions of sizes {w.shape[0]} (G side) and {need_a} (A side), got {g_dim} and {a_dim}"))


def _matrix(t: Tensor, name: str, ref: Tensor) -> None:
    _checks.floating(t, name)
    _checks.square(t, name)
    torch._check(t.dim() == 2, lambda: f"{name} must be a matrix, got shape {list(t.shape)}")
    _checks.same_device_dtype(t, ref, name, "the layer's other decomposition tensors")


def _buffers(weight_grads, bias_grads, weight_buffers, bias_buffers) -> None:
    layers = len(weight_grads)
    if not weight_buffers:
        torch._check(not bias_buffers, lambda: "bias_buffers needs weight_buffers (one entry per layer, "
                     "None where a layer has no momentum buffer yet)")
        return
    _lengths(layers, weight_buffers=weight_buffers)
    torch._check(not bias_buffers or len(bias_buffers) == layers, lambda: "bias_buffers must be empty or "
                 f"hold one entry per layer ({layers} weight_grads), got {len(bias_buffers)}")
    for i, w in enumerate(weight_grads):
        bw = weight_buffers[i]
        bb = bias_buffers[i] if bias_buffers else None
        if bw is not None:
            _checks.same_device_dtype(bw, w, f"weight_buffers[{i}]", "its weight gradient")
            _checks.shape_eq(bw, list(w.shape), f"weight_buffers[{i}]", "shaped like its weight gradient")
        if bb is not None:
            b = bias_grads[i]
            torch._check(b is not None, lambda: f"bias_buffers[{i}] is given but layer {i} has no bias gradient")
            _checks.same_device_dtype(bb, b, f"bias_buffers[{i}]", "its bias gradient")
            _checks.shape_eq(bb, list(b.shape), f"bias_buffers[{i}]", "shaped like its bias gradient")


def _outputs(weight_grads, bias_grads, weight_buffers=None):
    w = [g.new_empty(g.shape) for g in weight_grads]
    b = [g.new_empty(g.shape) for g in bias_grads if g is not None]
    device = weight_grads[0].device if weight_grads else torch.device("cpu")
    width = 6 if weight_buffers else 4
    return w, b, torch.empty(len(weight_grads), width, dtype=torch.float64, device=device)


@torch.library.register_fake("natgrad::kfac_directions_eigen")
def _(weight_grads, bias_grads, g_eigenvalues, g_eigenvectors, a_eigenvalues, a_eigenvectors, damping,
      pi_correction, grad_scale, weight_buffers=None, bias_buffers=None):
    layers = len(weight_grads)
    _lengths(layers, bias_grads=bias_grads, g_eigenvalues=g_eigenvalues, g_eigenvectors=g_eigenvectors,
             a_eigenvalues=a_eigenvalues, a_eigenvectors=a_eigenvectors, damping=damping)
    _checks.grad_scale(grad_scale)
    for i in range(layers):
        vg, va = g_eigenvectors[i], a_eigenvectors[i]
        _matrix(vg, f"g_eigenvectors[{i}]", vg)
        _matrix(va, f"a_eigenvectors[{i}]", vg)
        _checks.same_device_dtype(g_eigenvalues[i], vg, f"g_eigenvalues[{i}]", "g_eigenvectors")
        _checks.same_device_dtype(a_eigenvalues[i], vg, f"a_eigenvalues[{i}]", "g_eigenvectors")
        _checks.shape_eq(g_eigenvalues[i], [vg.shape[0]], f"g_eigenvalues[{i}]", "one per eigenvector")
        _checks.shape_eq(a_eigenvalues[i], [va.shape[0]], f"a_eigenvalues[{i}]", "one per eigenvector")
        _checks.damping(damping[i], strictly_positive=False)
        _layer(i, weight_grads[i], bias_grads[i], va.shape[0], vg.shape[0], vg)
    _buffers(weight_grads, bias_grads, weight_buffers, bias_buffers)
    return _outputs(weight_grads, bias_grads, weight_buffers)


@torch.library.register_fake("natgrad::kfac_directions_inverse")
def _(weight_grads, bias_grads, g_inverses, a_inverses, grad_scale, weight_buffers=None, bias_buffers=None):
    layers = len(weight_grads)
    _lengths(layers, bias_grads=bias_grads, g_inverses=g_inverses, a_inverses=a_inverses)
    _checks.grad_scale(grad_scale)
    for i in range(layers):
        _matrix(g_inverses[i], f"g_inverses[{i}]", g_inverses[i])
        _matrix(a_inverses[i], f"a_inverses[{i}]", g_inverses[i])
        _layer(i, weight_grads[i], bias_grads[i], a_inverses[i].shape[0], g_inverses[i].shape[0],
               g_inverses[i])
    _buffers(weight_grads, bias_grads, weight_buffers, bias_buffers)
    return _outputs(weight_grads, bias_grads, weight_buffers)


@torch.library.register_fake("natgrad::kfac_momentum_step_")
def _(params, momentum_buffers, directions, lr, momentum, weight_decay, direction_scale):
    n = len(params)
    torch._check(len(directions) == n, lambda: f"directions must hold one entry per parameter ({n} params), "
                 f"got {len(directions)}")
    torch._check(len(momentum_buffers) in (0, n), lambda: "momentum_buffers must be empty (no momentum) or "
                 f"hold one entry per parameter ({n}), got {len(momentum_buffers)}")
    torch._check(len(momentum_buffers) > 0 or momentum == 0.0,
                 lambda: f"momentum {momentum} needs momentum_buffers (zeros before the first step)")
    for i, p in enumerate(params):
        _checks.floating(p, f"params[{i}]")
        _checks.same_device_dtype(directions[i], p, f"directions[{i}]", "its parameter")
        _checks.shape_eq(directions[i], list(p.shape), f"directions[{i}]", "shaped like its parameter")
        if momentum_buffers:
            _checks.same_device_dtype(momentum_buffers[i], p, f"momentum_buffers[{i}]", "its parameter")
            _checks.shape_eq(momentum_buffers[i], list(p.shape), f"momentum_buffers[{i}]",
                             "shaped like its parameter")


for _name in ("kfac_directions_eigen", "kfac_directions_inverse"):
    torch.library.register_autograd(
        f"natgrad::{_name}", not_differentiable(_name), setup_context=lambda ctx, inputs, output: None
    )
