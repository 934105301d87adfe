"""The diagonal-Fisher EWC penalty ``Σ F (θ − θ*)²`` with its gradient, in one fused pass.

On CPU tensors a fused C++ loop reads each element once; on any other device the op runs an
ATen composition (CompositeExplicitAutograd) with the same float64 accumulation.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from natgrad import _C  # noqa: F401  (loads the operator registrations)
from natgrad.ops import _checks

__all__ = ["ewc_penalty", "ewc_penalty_and_grad"]

_ops = torch.ops.natgrad


def ewc_penalty_and_grad(
    params: Sequence[Tensor], fisher: Sequence[Tensor], anchor: Sequence[Tensor]
) -> tuple[Tensor, list[Tensor]]:
    """Penalty ``Σ_t Σ_i F_t,i (θ_t,i − θ*_t,i)²`` and its gradients ``2 F_t (θ_t − θ*_t)``.

    On CPU, one C++ loop over the tensors, one fused pass over each tensor's elements; on other
    devices an ATen composition. Accumulated in float64; no λ and no ½ are applied (callers
    scale). Differentiable: the penalty's backward
    reuses the gradients already computed.

    Args:
        params (sequence of Tensor): current parameters θ_t (one dtype and device).
        fisher (sequence of Tensor): diagonal Fisher F_t, shaped like ``params[t]``.
        anchor (sequence of Tensor): consolidated parameters θ*_t, shaped like ``params[t]``.

    Returns:
        (Tensor, list of Tensor): the 0-dim penalty and one gradient per parameter.
    """
    params, fisher, anchor = list(params), list(fisher), list(anchor)
    if not params:  # an empty Tensor[] gives the dispatcher no device to dispatch on
        raise ValueError("params must hold at least one tensor")
    penalty, grads = _ops.ewc_penalty(params, fisher, anchor)
    return penalty, list(grads)


def ewc_penalty(
    params: Sequence[Tensor], fisher: Sequence[Tensor], anchor: Sequence[Tensor]
) -> Tensor:
    """The 0-dim penalty of :func:`ewc_penalty_and_grad`, for use in a loss (differentiable)."""
    return ewc_penalty_and_grad(params, fisher, anchor)[0]


@torch.library.register_fake("natgrad::ewc_penalty")
def _(params, fisher, anchor):
    torch._check(len(params) > 0, lambda: "params must hold at least one tensor")
    for lst, name in ((fisher, "fisher"), (anchor, "anchor")):
        torch._check(
            len(lst) == len(params),
            lambda: f"{name} must hold one tensor per parameter ({len(params)}), got {len(lst)}",
        )
    ref = params[0]
    _checks.floating(ref, "params[0]")
    for t in range(len(params)):
        for lst, name in ((params, "params"), (fisher, "fisher"), (anchor, "anchor")):
            x = lst[t]
            torch._check(
                x.dtype == ref.dtype and x.device == ref.device,
                lambda: f"{name}[{t}] must have dtype {_checks.dtype_name(ref.dtype)} on "
                f"{ref.device} like params[0], got {_checks.dtype_name(x.dtype)} on {x.device}",
            )
            torch._check(
                list(x.shape) == list(params[t].shape),
                lambda: f"{name}[{t}] must have the shape of params[{t}] {list(params[t].shape)}, "
                f"got {list(x.shape)}",
            )
    return ref.new_empty(()), [p.new_empty(p.shape) for p in params]


def _setup(ctx, inputs, output):
    params, fisher, anchor = inputs
    ctx.n = len(params)
    ctx.save_for_backward(*params, *fisher, *anchor, *output[1])


def _backward(ctx, grad_penalty, grad_grads):
    n = ctx.n
    saved = ctx.saved_tensors
    params, fisher, anchor, grads = (saved[i * n:(i + 1) * n] for i in range(4))
    d_params, d_fisher = [], []
    for t in range(n):
        diff = params[t] - anchor[t]
        d_p = grad_penalty * grads[t]
        d_f = grad_penalty * diff * diff
        gg = grad_grads[t] if grad_grads is not None else None
        if gg is not None:  # the grads output 2F(θ−θ*) also fed the loss
            d_p = d_p + 2 * fisher[t] * gg
            d_f = d_f + 2 * diff * gg
        d_params.append(d_p)
        d_fisher.append(d_f)
    return d_params, d_fisher, [-d for d in d_params]


torch.library.register_autograd("natgrad::ewc_penalty", _backward, setup_context=_setup)
