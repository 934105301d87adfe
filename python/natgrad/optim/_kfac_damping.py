"""natgrad.KFAC's Levenberg–Marquardt damping adaptation (Martens & Grosse, 2015, §6.5): compare
the loss reduction of a step with the reduction its quadratic model predicted."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from natgrad.optim.kfac import KFAC


def adapt_damping(opt: KFAC, closure, loss_before, before: dict, grads: dict) -> None:
    """Levenberg–Marquardt: compare the loss reduction with the quadratic model's."""
    deltas = {p: p.detach() - old for p, old in before.items()}
    predicted = sum(float((grads[p] * d).sum()) for p, d in deltas.items())
    curvature = 0.0
    for p, d in deltas.items():
        curvature += opt._damping(p) * float(d.pow(2).sum())
    for block in opt._blocks:
        if block.has_factors and all(p in deltas for p in block.params):
            curvature += float(block.quad_form([deltas[p] for p in block.params]))
    model_change = predicted + 0.5 * curvature
    opt._suspend_capture = True
    try:
        with torch.enable_grad():
            loss_after = closure()
    finally:
        opt._suspend_capture = False
    change = opt._comm.mean_scalar(float(loss_after)) - opt._comm.mean_scalar(float(loss_before))
    rho = change / model_change if model_change < 0 else -math.inf
    opt.last_reduction_ratio = rho
    omega = opt.damping_adaptation_decay ** opt.damping_adaptation_interval
    if rho > 0.75:
        opt._damping_multiplier *= omega
    elif rho < 0.25:
        opt._damping_multiplier /= omega
    opt._damping_multiplier = min(max(opt._damping_multiplier, 1e-8), 1e8)
